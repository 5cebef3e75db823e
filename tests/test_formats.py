"""The data formats people have: alpaca, ShareGPT, TRL prompt/completion, messages, plain text; auto-detection,
bad rows naming file/row/field, a chat template for base models, train_on_prompt, first_turn_only, and every
example file of examples/data/ training through `python -m qtuning.train` with no code."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mlflow_store, prefect_home
from qtuning.config import DataConfig, ModelConfig
from qtuning.data import IGNORE_INDEX, DataError, build_sft_dataset, load_rows
from qtuning.modeling import load_tokenizer, read_chat_template, tiny_model_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
EXAMPLE_FORMATS = {  # file -> the format auto must recognise
    "alpaca.jsonl": "alpaca",
    "sharegpt.jsonl": "sharegpt",
    "prompt_completion.jsonl": "prompt_completion",
    "prompt_completion_chat.jsonl": "prompt_completion",
    "messages.jsonl": "messages",
    "text.jsonl": "text",
}
EOS = "<|im_end|>"


def build(path, tokenizer, **overrides):
    return build_sft_dataset(DataConfig(source=str(path), **overrides), tokenizer, progress=False)


def runs(tokenizer, row) -> list[str]:
    """The decoded runs of labelled tokens of a tokenized row (each label equal to its input token)."""
    out, previous = [], IGNORE_INDEX
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                out.append([])
            out[-1].append(label)
        previous = label
    return [tokenizer.decode(r) for r in out]


# ---- one test per format: rows as a user writes them -> labels exactly on the assistant's tokens ------------


def test_alpaca_with_input_system_and_history(write_jsonl, tokenizer):
    rows = [
        {"instruction": "Translate to French.", "input": "The cat.", "output": "Le chat."},
        {"system": "You are a tutor.", "instruction": "And 9 times 9?", "input": "", "output": "81.",
         "history": [["What is 7 times 8?", "56."]]},
    ]
    data = build(write_jsonl(rows), tokenizer)
    assert data.format == "alpaca"
    first, second = data.dataset
    assert runs(tokenizer, first) == [f"Le chat.{EOS}"]
    assert "<|im_start|>user\nTranslate to French.\nThe cat.<|im_end|>" in tokenizer.decode(first["input_ids"])
    assert runs(tokenizer, second) == [f"56.{EOS}", f"81.{EOS}"]  # history turns are trained too
    text = tokenizer.decode(second["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a tutor.<|im_end|>\n<|im_start|>user\nWhat is 7 times 8?")


def test_sharegpt_multi_turn_trains_every_gpt_turn(write_jsonl, tokenizer):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."},
            {"from": "gpt", "value": "Blue."}, {"from": "user", "value": "Another?"},
            {"from": "assistant", "value": "Green."}]
    data = build(write_jsonl([{"id": "c1", "conversations": conv}]), tokenizer, id_field="id")
    (row,) = data.dataset
    assert data.format == "sharegpt" and row["sample_id"] == "c1"
    assert runs(tokenizer, row) == [f"Blue.{EOS}", f"Green.{EOS}"]
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")

    first = build(write_jsonl([{"conversations": conv}], "first.jsonl"), tokenizer, first_turn_only=True).dataset[0]
    assert runs(tokenizer, first) == [f"Blue.{EOS}"] and "Green" not in tokenizer.decode(first["input_ids"])


def test_prompt_completion_strings_are_plain_text_with_loss_on_the_completion(write_jsonl, tokenizer):
    (row,) = build(write_jsonl([{"prompt": "The capital of France is", "completion": " Paris."}]), tokenizer).dataset
    assert tokenizer.decode(row["input_ids"]) == f"The capital of France is Paris.{EOS}"  # no chat template
    assert runs(tokenizer, row) == [f" Paris.{EOS}"]  # eos carries loss: the model learns to stop


def test_conversational_prompt_completion_trains_the_completion_only(write_jsonl, tokenizer):
    row = {"prompt": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "In Spanish."}],
           "completion": [{"role": "assistant", "content": "Hola."}]}
    data = build(write_jsonl([row]), tokenizer)
    assert data.format == "prompt_completion"
    assert runs(tokenizer, data.dataset[0]) == [f"Hola.{EOS}"]  # the prompt's own assistant turn is context


def test_messages_label_every_assistant_turn(write_jsonl, tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    data = build(write_jsonl([{"messages": chat}]), tokenizer)
    assert data.format == "messages"
    assert runs(tokenizer, data.dataset[0]) == [f"Hello.{EOS}", f"Goodbye.{EOS}"]


def test_text_trains_on_every_token(write_jsonl, tokenizer):
    data = build(write_jsonl([{"text": "Light travels fast."}]), tokenizer)
    (row,) = data.dataset
    assert data.format == "text"
    assert row["labels"] == row["input_ids"]
    assert tokenizer.decode(row["input_ids"]) == f"Light travels fast.{EOS}"


def test_train_on_prompt_labels_every_token(write_jsonl, tokenizer):
    path = write_jsonl([{"prompt": "What is 2+2?", "response": "4."}])
    row = build(path, tokenizer, train_on_prompt=True).dataset[0]
    assert row["labels"] == row["input_ids"] and row["response_length"] == row["length"]
    plain = build(write_jsonl([{"prompt": "Q:", "completion": " A."}], "pc.jsonl"), tokenizer, train_on_prompt=True)
    assert plain.dataset[0]["labels"] == plain.dataset[0]["input_ids"]


# ---- bad rows name the file, the row and the field ----------------------------------------------------------


@pytest.mark.parametrize(
    ("good", "bad", "message"),
    [
        ({"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5},
         "row 2: field 'output': expected a non-empty string, got int"),
        ({"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b", "history": [["q", "a", "x"]]},
         "row 2: field 'history[0]': expected a [user, assistant] pair of strings, got a list of 3"),
        ({"instruction": "a", "output": "b"}, {"instruction": "a", "input": 3, "output": "b"},
         "row 2: field 'input': expected a string, got int"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
         {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
         "row 2: field 'conversations[1].from': expected one of human, gpt, system, user, assistant, got 'bot'"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
         {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": None}]},
         "row 2: field 'conversations[1].value': expected a string, got null"),
        ({"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""},
         "row 2: field 'completion': expected a non-empty string, got an empty string"),
        ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]},
         {"prompt": [{"role": "user", "content": "a"}], "completion": "b"},
         "row 2: field 'completion': expected a list of messages like 'prompt', got str"),
        ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]},
         {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "robot", "content": "b"}]},
         "row 2: field 'completion[0].role': expected one of system, user, assistant, got 'robot'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
         "row 2: field 'messages[1].content': expected a string, got null"),
        ({"text": "a b c"}, {"text": ["a"]}, "row 2: field 'text': expected a non-empty string, got list"),
    ],
    ids=["alpaca", "alpaca-history", "alpaca-input", "sharegpt-from", "sharegpt-value", "completion",
         "conversational-completion", "conversational-role", "messages", "text"],
)
def test_a_bad_row_names_file_row_and_field(write_jsonl, tokenizer, good, bad, message):
    path = write_jsonl([good, bad, good])
    with pytest.raises(DataError) as err:
        build(path, tokenizer)
    assert f"{path}: {message}" in str(err.value)


def test_undetectable_rows_say_which_formats_exist(write_jsonl):
    path = write_jsonl([{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"row 1: cannot tell the data format from the fields \['answer', 'question'\]; "
                                        "set data.format to one of pairs, messages, sharegpt, alpaca"):
        load_rows(DataConfig(source=str(path)))


# ---- auto-detection: each example file, said once -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLE_FORMATS))
def test_auto_recognises_each_example_file_and_says_so(name):
    said: list[str] = []
    rows = load_rows(DataConfig(source=str(EXAMPLES / name)), log=said.append)
    assert rows.format == EXAMPLE_FORMATS[name]
    assert len(said) == 1 and f"reading the rows as '{EXAMPLE_FORMATS[name]}'" in said[0]
    assert 5 <= len(rows.examples) <= 10
    explicit = load_rows(DataConfig(source=str(EXAMPLES / name), format=EXAMPLE_FORMATS[name]), log=said.append)
    assert explicit.examples == rows.examples and len(said) == 1  # an explicit format is not announced


@pytest.mark.parametrize("name", sorted(EXAMPLE_FORMATS))
def test_to_row_reads_back_as_the_same_example(tmp_path, name):
    """An exported subset is written with Example.to_row; reading it back must give the same examples."""
    rows = load_rows(DataConfig(source=str(EXAMPLES / name))).examples
    path = tmp_path / "subset.jsonl"
    path.write_text("".join(json.dumps({"id": ex.sample_id, **ex.to_row()}) + "\n" for ex in rows))
    again = load_rows(DataConfig(source=str(path), id_field="id")).examples
    assert again == rows


# ---- a chat template for a base model without one -----------------------------------------------------------

QA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}### Answer:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Answer:\n{% endif %}"
)


def test_chat_template_override_for_a_tokenizer_without_one(write_jsonl, tokenizer, tmp_path):
    base = copy.deepcopy(tokenizer)
    base.chat_template = None  # a base model's tokenizer
    chat = write_jsonl([{"prompt": "Name a colour.", "response": "Blue."}])
    with pytest.raises(DataError, match="has no chat template.*set model.chat_template"):
        build(chat, base)
    assert build(write_jsonl([{"text": "Plain text needs none."}], "t.jsonl"), base).dataset[0]["length"] > 0

    template_file = tmp_path / "qa.jinja"
    template_file.write_text(QA_TEMPLATE)
    model = ModelConfig(**{**tiny_model_config().model_dump(), "chat_template": str(template_file)})
    loaded = load_tokenizer(model)  # what qtuning.train does: the override rides on the tokenizer (and is saved)
    assert loaded.chat_template == QA_TEMPLATE == read_chat_template(QA_TEMPLATE)
    row = build(chat, loaded).dataset[0]
    assert tokenizer.decode(row["input_ids"]).startswith("### user:\nName a colour.\n### Answer:\nBlue.")
    assert runs(tokenizer, row) == [f"Blue.{EOS}"]
    with pytest.raises(ValueError, match="model.chat_template: 'missing.jinja' is neither a Jinja template"):
        ModelConfig(chat_template="missing.jinja")


# ---- every example file trains through the command line, no code ---------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLE_FORMATS))
def test_each_example_file_trains_through_the_cli(tmp_path, monkeypatch, name, capsys):
    from qtuning.train_cli import main

    monkeypatch.chdir(REPO)  # the shipped YAML names its data relative to the repository
    out = tmp_path / "out"
    rc = main(["--config", "examples/formats-cpu.yaml", "--no-progress",
               "--set", f"data.source=examples/data/{name}", f"training.output_dir={out}"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 1 and summary["loss_tokens"] > 0
    assert 5 <= summary["data_rows"] <= 10


def test_python_m_qtuning_train_on_sharegpt_with_a_base_model_template(tmp_path):
    template = tmp_path / "qa.jinja"
    template.write_text(QA_TEMPLATE)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "qtuning.train", "--config", "examples/formats-cpu.yaml", "--no-progress", "--set",
         "data.source=examples/data/sharegpt.jsonl", f"model.chat_template={template}", f"training.output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reading the rows as 'sharegpt'" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 1
    saved = json.loads((out / "final" / "tokenizer_config.json").read_text())
    on_disk = saved.get("chat_template") or (out / "final" / "chat_template.jinja").read_text()
    assert on_disk == QA_TEMPLATE  # the fine-tuned model keeps the template it was trained with


# --------------------------------------------------------------------------- through `qtuning run`, as a user would
@pytest.mark.parametrize("name", sorted(EXAMPLE_FORMATS))
def test_each_example_file_passes_qtuning_runs_data_check_and_prepare_stage(tmp_path, monkeypatch, name):
    """`qtuning run --config examples/formats-compare.yaml --set data.source=...`: the command's pre-flight data
    check accepts every format, and the pipeline's prepare_data stage tokenizes it (no code change)."""
    from prefect.logging import disable_run_logger

    from commands.lifecycle import check_data
    from commands.run import build_config, build_parser
    from tasks.data import prepare_data

    monkeypatch.chdir(REPO)
    cfg = build_config(build_parser().parse_args([
        "--config", "examples/formats-compare.yaml", "--set", f"data.source=examples/data/{name}",
        f"pipeline.runs_dir={tmp_path / 'runs'}",
    ]))
    assert check_data(cfg.data, "qtuning run") is None
    with disable_run_logger():
        record = prepare_data.fn(cfg.data, cfg.model, cfg.pipeline)
    assert 5 <= record.rows <= 10 and record.response_tokens > 0


@pytest.mark.slow
def test_qtuning_run_trains_a_multi_turn_sharegpt_file_end_to_end(tmp_path, prefect_server):
    """The whole `qtuning run` (Prefect flow, both arms trained, lm-eval, MLflow) on a user's ShareGPT file, on the
    test process's Prefect server with a home of its own (the launcher is python: what is under test is the file,
    and `accelerate launch` has its own end-to-end tests)."""
    env = {**prefect_server["env"], "PREFECT_HOME": str(prefect_home(tmp_path / "prefect"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, "-m", "commands.cli", "run", "--config", "examples/formats-compare.yaml", "--no-progress",
         "--json", str(out), "--set", "data.source=examples/data/sharegpt.jsonl", f"pipeline.runs_dir={tmp_path / 'runs'}",
         f"pipeline.tracking_uri={mlflow_store(tmp_path / 'mlflow.db')}", "pipeline.launcher=python"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    arms = {a["name"]: a for a in json.loads(out.read_text())["arms"]}
    assert set(arms) == {"full", "qtuning-25x50"}
    assert 0 < arms["qtuning-25x50"]["loss_tokens"] < arms["full"]["loss_tokens"]
