"""SFT data: response-only labels with the real SmolLM2 chat template, validation messages, fingerprints, collation."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qtuning.config import DataConfig
from qtuning.data import IGNORE_INDEX, DataError, build_sft_dataset, collate, fingerprint, load_rows

GOOD = {"prompt": "What is 2+2?", "response": "2+2 equals 4."}


def build(path, tokenizer, **overrides):
    return build_sft_dataset(DataConfig(source=str(path), **overrides), tokenizer, progress=False)


def labelled_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """The contiguous runs of labelled tokens, checking each label equals its input token."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


# ---- labels -----------------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_response_and_its_end_of_turn(write_jsonl, tokenizer):
    row = build(write_jsonl([GOOD]), tokenizer).dataset[0]
    ids, labels = row["input_ids"], row["labels"]

    (run,) = labelled_runs(ids, labels)
    assert tokenizer.decode(run) == "2+2 equals 4.<|im_end|>"
    first = labels.index(run[0])
    prompt = tokenizer.decode(ids[:first])
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert tokenizer.decode(ids[first + len(run) :]) == "\n"  # the template's newline after eos: not a target
    assert row["length"] == len(ids) and row["response_length"] == len(run)


def test_system_field_replaces_the_default_system_prompt(write_jsonl, tokenizer):
    path = write_jsonl([{**GOOD, "system": "You are terse."}])
    text = tokenizer.decode(build(path, tokenizer, system_field="system").dataset[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")


def test_multi_turn_messages_label_every_assistant_turn(write_jsonl, tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    row = build(write_jsonl([{"messages": chat}]), tokenizer).dataset[0]
    runs = labelled_runs(row["input_ids"], row["labels"])
    assert [tokenizer.decode(r) for r in runs] == ["Blue.<|im_end|>", "Green.<|im_end|>"]


def test_a_long_chat_renders_only_the_turns_before_the_cut(write_jsonl, tokenizer):
    """400 exchanges cut at 128 tokens: the labels are those of the whole chat cut at 128, and only the turns
    that start before the cut are rendered (each rendering re-renders the chat before it: rendering them all
    cost the turns squared, 52 s for one such row)."""
    from qtuning.data import Example, tokenize_rows

    chat = []
    for i in range(400):
        chat += [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]
    rendered = []

    class Counting:  # the real tokenizer, its chat renderings counted
        def __init__(self, tok):
            self._tok = tok

        def apply_chat_template(self, messages, **kw):
            rendered.append(len(messages))
            return self._tok.apply_chat_template(messages, **kw)

        def __call__(self, *a, **kw):
            return self._tok(*a, **kw)

        def __getattr__(self, name):
            return getattr(self._tok, name)

    ex = Example(sample_id="long", messages=chat)
    cut, _, _ = tokenize_rows([ex], Counting(tokenizer), max_length=128, progress=False)
    assert rendered[0] == 800 and len(rendered) < 60 and max(rendered[1:]) < 60  # the chat once, then the turns in 128
    # the first 128 tokens of a chat are those of its first 40 exchanges (prefix-stable), labelled by every turn
    whole, _, _ = tokenize_rows([Example(sample_id="short", messages=chat[:80])], tokenizer, max_length=10**6, progress=False)
    assert cut["input_ids"][0] == whole["input_ids"][0][:128]
    assert cut["labels"][0] == whole["labels"][0][:128]
    assert sum(l != IGNORE_INDEX for l in cut["labels"][0]) > 10  # several turns labelled before the cut


def test_truncation_cuts_the_response_and_drops_rows_left_without_one(write_jsonl, tokenizer):
    long_prompt = {"prompt": "word " * 100, "response": "ok"}
    long_response = {"prompt": "Count.", "response": " ".join(str(i) for i in range(200))}
    data = build(write_jsonl([long_prompt, long_response]), tokenizer, max_length=64)

    assert data.skipped == {"response truncated away": 1}
    (row,) = data.dataset
    assert row["sample_id"] == "row-1"
    assert row["length"] == len(row["input_ids"]) == len(row["labels"]) == 64
    assert 0 < row["response_length"] < 64 and row["labels"][-1] == row["input_ids"][-1]


# ---- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "hi", "response": ', "row 2: not valid JSON"),
        (json.dumps({"prompt": "hi"}), "row 2: field 'response': missing"),
        (
            json.dumps({"prompt": "hi", "response": "  "}),
            "row 2: field 'response': expected a non-empty string, got an empty string",
        ),
        (json.dumps({"prompt": "hi", "response": 7}), "row 2: field 'response': expected a non-empty string, got int"),
        (json.dumps({"prompt": None, "response": "x"}), "row 2: field 'prompt': expected a non-empty string, got null"),
        (json.dumps(["hi", "there"]), "row 2: expected an object, got list"),
    ],
)
def test_a_bad_row_raises_naming_file_row_and_field(write_jsonl, tokenizer, bad_line, message):
    path = write_jsonl([GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as err:
        build(path, tokenizer)
    assert f"{path}: {message}" in str(err.value)


def test_all_bad_rows_are_reported_at_once_or_skipped_and_counted(write_jsonl, tokenizer):
    rows = [GOOD, "{broken", {"prompt": "hi"}, GOOD, {"prompt": "hi", "response": 3}, {"prompt": "hi", "response": ""}]
    path = write_jsonl(rows)
    with pytest.raises(DataError) as err:
        build(path, tokenizer)
    assert str(err.value).startswith(f"4 bad row(s) in {path}")
    assert [f"row {n}:" in str(err.value) for n in (2, 3, 5, 6)] == [True] * 4

    data = build(path, tokenizer, on_bad_row="skip")
    assert data.dataset["sample_id"] == ["row-0", "row-3"]  # ids are source positions, unchanged by skips
    assert data.skipped == {
        "broken JSON": 1,
        "missing field 'response'": 1,
        "wrong type in field 'response'": 1,
        "empty field 'response'": 1,
    }


@pytest.mark.parametrize(
    ("chat", "message"),
    [
        (
            [{"role": "human", "content": "hi"}],
            "field 'messages[0].role': expected one of system, user, assistant, got 'human'",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 1}],
            "field 'messages[1].content': expected a string, got int",
        ),
        ([{"role": "user", "content": "hi"}], "field 'messages': no assistant message with content"),
        (
            [{"role": "assistant", "content": "hi"}],
            "field 'messages': the first non-system message must be a user message",
        ),
        ("hi", "field 'messages': expected a list of messages, got str"),
    ],
)
def test_bad_messages_name_the_message_and_field(write_jsonl, tokenizer, chat, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl([good, {"messages": chat}])
    with pytest.raises(DataError) as err:
        build(path, tokenizer)
    assert f"{path}: row 2: {message}" in str(err.value)


def test_id_field_gives_ids_and_refuses_duplicates(write_jsonl, tokenizer):
    path = write_jsonl([{**GOOD, "uid": "a"}, {**GOOD, "uid": 7}])
    assert build(path, tokenizer, id_field="uid").dataset["sample_id"] == ["a", "7"]

    path = write_jsonl([{**GOOD, "uid": "a"}, {**GOOD, "uid": "a"}], name="dup.jsonl")
    with pytest.raises(DataError, match="row 2: field 'uid': duplicate id 'a' \\(first at row 1\\)"):
        build(path, tokenizer, id_field="uid")


def test_json_and_parquet_sources_read_like_jsonl(tmp_path, write_jsonl, tokenizer):
    rows = [GOOD, {"prompt": "Say hi.", "response": "Hi!"}]
    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps(rows))
    as_parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), as_parquet)

    expected = build(write_jsonl(rows), tokenizer).dataset.to_dict()
    assert build(as_json, tokenizer).dataset.to_dict() == expected
    assert build(as_parquet, tokenizer).dataset.to_dict() == expected

    as_parquet.unlink()
    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "hi", "response": None}]), as_parquet)
    with pytest.raises(
        DataError, match=r"train\.parquet: index 1: field 'response': expected a non-empty string, got null"
    ):
        build(as_parquet, tokenizer)


def test_limit_is_a_seeded_shuffle(write_jsonl):
    path = write_jsonl([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(50)])

    def ids(**kw):
        return [ex.sample_id for ex in load_rows(DataConfig(source=str(path), **kw)).examples]

    assert ids() == [f"row-{i}" for i in range(50)]  # no limit: source order
    assert ids(limit=10, seed=1) == ids(limit=10, seed=1)
    assert len(set(ids(limit=10, seed=1))) == 10
    assert ids(limit=10, seed=1) != ids(limit=10, seed=2)


def test_arc_preset_loads(tokenizer):
    data = build_sft_dataset(DataConfig(source="arc", limit=20), tokenizer, progress=False)
    assert len(data.dataset) == 20 and data.skipped == {}
    assert data.source.endswith("arc.jsonl")
    for row in data.dataset:
        (run,) = labelled_runs(row["input_ids"], row["labels"])
        assert tokenizer.decode(run).startswith("The answer is ")


# ---- fingerprint ------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_follows_content_and_config(write_jsonl, tokenizer):
    path = write_jsonl([GOOD])
    cfg = DataConfig(source=str(path))
    first = build(path, tokenizer).fingerprint
    assert first == build(path, tokenizer).fingerprint == fingerprint(cfg, tokenizer)
    assert len(first) == 64

    assert fingerprint(cfg.model_copy(update={"max_length": 512}), tokenizer) != first
    write_jsonl([{**GOOD, "response": "Four."}])  # same path, new content
    assert fingerprint(cfg, tokenizer) != first


# ---- collator ---------------------------------------------------------------------------------------------


def test_collate_pads_by_position_so_the_final_eos_keeps_its_label(write_jsonl, tokenizer):
    path = write_jsonl(
        [GOOD, {"prompt": "Tell me a long story please.", "response": "Once upon a time there was a fox."}]
    )
    dataset = build(path, tokenizer).dataset
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # the trap this guards against

    batch = collate(dataset["input_ids"], dataset["labels"], tokenizer.pad_token_id)
    n0, n1 = dataset["length"]
    assert n0 < n1
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (2, n1)
    short_ids, short_labels = batch.input_ids[0], batch.labels[0]
    last_eos = n0 - 2  # the row ends "<|im_end|>" "\n"
    assert short_ids[last_eos] == eos and short_labels[last_eos] == eos
    assert (short_ids[n0:] == eos).all() and (short_labels[n0:] == IGNORE_INDEX).all()
    assert batch.attention_mask[0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert (batch.labels != IGNORE_INDEX).sum().item() == sum(dataset["response_length"])
    # selecting the short row trims the padding columns only the long row needed
    short = batch.rows(torch.tensor([True, False]))
    assert short.input_ids.shape == (1, n0) and torch.equal(short.labels[0], batch.labels[0, :n0])
