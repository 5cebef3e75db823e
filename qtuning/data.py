"""SFT rows -> token sequences whose labels cover the assistant's tokens only.

The pipeline is ``load_rows`` (read, validate, shuffle/limit) -> ``tokenize_rows`` (chat template, labels,
truncation) -> an ``SFTData`` whose ``fingerprint`` keys caches. ``collate`` pads a batch.

Two invariants the rest of qtuning relies on:

- ``labels[t] == input_ids[t]`` exactly on assistant-turn tokens (content plus its end-of-turn token), -100
  elsewhere; the model shifts them itself. Q-Tuning's per-token scores and pruning act on these positions.
- padding is masked by *position*, never by token id: SmolLM2's pad token is its eos ``<|im_end|>``, which
  also ends every response and must keep its label.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from qtuning import assets
from qtuning.config import DATA_FORMATS, DATA_PRESETS, DataConfig

IGNORE_INDEX = -100  # label value the loss ignores (torch.nn.CrossEntropyLoss default)
ROLES = ("system", "user", "assistant")
_MAX_REPORTED = 10  # bad rows listed in one DataError
_TOKENIZE_CHUNK = 256  # rows rendered and tokenized per batched tokenizer call
HELDOUT_DIR = "heldout"  # SFTData.save: the held-out rows' sub-folder

Messages = list[dict[str, str]]


class DataError(ValueError):
    """Malformed data; the message names the file, the row and the field."""


@dataclass(frozen=True)
class Example:
    """One validated row: a chat (rendered with the chat template), or plain-text segments (no template).

    Chat: assistant messages from index `loss_from` on carry loss (0 but for conversational prompt/completion,
    whose prompt's own turns do not). Plain text: each segment is (text, carries loss); eos ends the sequence.
    """

    sample_id: str
    messages: Messages
    segments: tuple[tuple[str, bool], ...] = ()
    loss_from: int = 0

    def to_row(self) -> dict[str, Any]:
        """The example as a row that ``load_rows`` reads back as itself (format auto): for exported subsets."""
        if self.segments:
            if len(self.segments) == 1:
                return {"text": self.segments[0][0]}
            return {"prompt": self.segments[0][0], "completion": self.segments[1][0]}
        if self.loss_from:
            return {"prompt": self.messages[: self.loss_from], "completion": self.messages[self.loss_from :]}
        return {"messages": self.messages}


@dataclass(frozen=True)
class LoadedRows:
    """Rows that passed validation, in the order training sees them, and what was skipped."""

    examples: list[Example]
    skipped: dict[str, int]
    source: str  # the resolved source: a file path or a hub id
    format: str = ""  # the format the rows were read as (data.format, or what auto recognised)
    heldout: list[Example] = field(default_factory=list)  # data.eval_rows / data.eval_source: never trained on


@dataclass(frozen=True)
class SFTData:
    """A tokenized SFT set: written once (``save``), read by every later step (``load``), never tokenized again.

    ``dataset`` columns: ``sample_id`` (str), ``input_ids`` and ``labels`` (list[int], labels -100 off the
    response), ``length`` (tokens) and ``response_length`` (labelled tokens). ``heldout``: the rows held out of
    training (``data.eval_rows`` / ``data.eval_source``), same columns, saved in the ``heldout/`` sub-folder;
    ``select_ids`` keeps it whole, so every arm of a comparison measures the same held-out rows.
    """

    dataset: datasets.Dataset
    fingerprint: str  # sha256 of source content + data config + tokenizer; keys caches across processes
    skipped: dict[str, int]  # reason -> rows dropped (bad rows, "response truncated away")
    source: str  # the resolved source: a file path or a hub id
    config: DataConfig  # what it was built from (``subset`` is applied later, by ``select_ids``)
    format: str = ""  # the format the rows were read as (data.format, or what auto recognised)
    truncated: int = 0  # rows kept but cut to data.max_length (their tail trains nothing)
    heldout: datasets.Dataset | None = None  # rows held out of training: the held-out loss (None: no split)

    META = "sft_data.json"  # beside the arrow files: fingerprint, skipped, truncated, source, config, format

    def save(self, path: str | Path) -> Path:
        """The dataset's arrow files and ``sft_data.json`` into the folder `path` (created; its content replaced)."""
        path = Path(path)
        self.dataset.save_to_disk(str(path))
        if self.heldout is not None:
            self.heldout.save_to_disk(str(path / HELDOUT_DIR))
        meta = {"fingerprint": self.fingerprint, "skipped": self.skipped, "source": self.source,
                "config": self.config.model_dump(mode="json"), "format": self.format, "truncated": self.truncated,
                "heldout_rows": len(self.heldout) if self.heldout is not None else 0}
        (path / self.META).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SFTData:
        """A set written by ``save`` (memory-mapped arrow files: opening it costs no tokenization)."""
        path = Path(path)
        meta_path = path / cls.META
        if not meta_path.is_file():
            raise DataError(f"{path}: not a tokenized qtuning data set (no {cls.META}); prepare it with qtuning.data")
        meta = json.loads(meta_path.read_text())
        heldout = datasets.load_from_disk(str(path / HELDOUT_DIR)) if (path / HELDOUT_DIR).is_dir() else None
        return cls(datasets.load_from_disk(str(path)), meta["fingerprint"], meta["skipped"], meta["source"],
                   DataConfig.model_validate(meta["config"]), meta.get("format", ""), meta.get("truncated", 0), heldout)

    def select_ids(self, ids_file: str | Path) -> SFTData:
        """The rows whose sample_id is listed in `ids_file` (one per line), in the data set's order.

        The subset is a new data set: its fingerprint covers the parent's and the ids. An id that is not in
        the data set is an error naming the file and line (a subset of another data set, most likely).
        """
        path = Path(ids_file)
        wanted = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        position = {sid: i for i, sid in enumerate(self.dataset["sample_id"])}
        unknown = [(n, sid) for n, sid in enumerate(wanted, 1) if sid not in position]
        if unknown:
            n, sid = unknown[0]
            raise DataError(f"{path}: line {n}: sample id {sid!r} is not in the data set ({len(unknown)} unknown id(s)); "
                            "the subset file belongs to another data set")
        rows = sorted(position[sid] for sid in set(wanted))
        digest = hashlib.sha256((self.fingerprint + "\n" + "\n".join(sorted(set(wanted)))).encode()).hexdigest()
        return SFTData(self.dataset.select(rows), digest, self.skipped, self.source, self.config, self.format, self.truncated,
                       self.heldout)


# ---- reading and validating -------------------------------------------------------------------------------


class _BadRow(Exception):
    """A row that fails validation: `reason` is the short key skipped rows are counted by."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def resolve_source(source: str) -> Path | str:
    """A preset name -> its cached JSONL; an existing local path -> that Path; anything else is a hub id."""
    if source in DATA_PRESETS:
        return assets.preset_path(source)
    path = Path(source).expanduser()
    return path if path.exists() else source


def load_rows(cfg: DataConfig, log: Callable[[str], None] | None = None) -> LoadedRows:
    """Read and validate every row of ``cfg.source``, then apply the seeded shuffle and ``cfg.limit``.

    With ``on_bad_row: error`` all rows are still checked, so one DataError lists the first problems and
    their total; with ``skip`` bad rows are dropped and counted by reason. ``format: auto`` is decided on the
    first row that is an object, and said once through `log`.
    """
    src = resolve_source(cfg.source)
    name = str(src) if cfg.source in DATA_PRESETS else cfg.source  # what error messages call the source
    fmt = None if cfg.format == "auto" else cfg.format
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    problems: list[str] = []
    first_row_of_id: dict[str, str] = {}

    for index, where, row in _raw_rows(src, cfg.split):
        try:
            if isinstance(row, _BadRow):
                raise row
            if fmt is None and isinstance(row, dict):
                fmt = detect_format(row, cfg)
                if fmt is None:
                    raise DataError(
                        f"{name}: {where}: cannot tell the data format from the fields {sorted(row)}; set data.format "
                        f"to one of {', '.join(f for f in DATA_FORMATS if f != 'auto')} (and its field names)"
                    )
                if log:
                    log(f"{name}: data.format auto: reading the rows as '{fmt}' (fields of {where}: {', '.join(sorted(row))})")
            example = _example_from(row, fmt or "pairs", cfg)
            sample_id = _sample_id(row, index, cfg.id_field)
            if sample_id in first_row_of_id:
                raise _BadRow(
                    "duplicate id",
                    f"field '{cfg.id_field}': duplicate id {sample_id!r} (first at {first_row_of_id[sample_id]})",
                )
            first_row_of_id[sample_id] = where
        except _BadRow as bad:
            skipped[bad.reason] += 1
            if len(problems) < _MAX_REPORTED:
                problems.append(f"{name}: {where}: {bad.detail}")
            continue
        if cfg.first_turn_only:
            example = _first_turn(example)
        examples.append(Example(sample_id, example.messages, example.segments, example.loss_from))

    n_bad = sum(skipped.values())
    if n_bad and cfg.on_bad_row == "error":
        more = f"\n  ... and {n_bad - len(problems)} more" if n_bad > len(problems) else ""
        raise DataError(
            f"{n_bad} bad row(s) in {name} (fix them, or set data.on_bad_row: skip to drop them):\n  "
            + "\n  ".join(problems)
            + more
        )
    if not examples:
        raise DataError(f"{name}: no usable rows (skipped: {dict(skipped) or 'none'})")
    examples, heldout = _split(examples, cfg, name)
    if cfg.eval_source is not None:  # held-out rows from their own file, read like the training rows
        held_cfg = cfg.model_copy(update={"source": cfg.eval_source, "eval_source": None, "eval_rows": 0,
                                          "limit": cfg.eval_rows or None, "subset": None})
        heldout = load_rows(held_cfg, log).examples
    return LoadedRows(examples, dict(skipped), str(src), fmt or cfg.format, heldout)


def _split(examples: list[Example], cfg: DataConfig, name: str) -> tuple[list[Example], list[Example]]:
    """(training rows, held-out rows). The seeded shuffle (data.seed) orders the rows; the last ``eval_rows`` of it
    are held out (so they never meet the first ``limit``, whatever ``limit`` is) and training takes the first
    ``limit`` of the others, or all of them in source order without ``limit``."""
    n_hold = cfg.eval_rows if cfg.eval_source is None else 0
    if cfg.limit is None and not n_hold:
        return examples, []
    if n_hold >= len(examples):
        raise DataError(
            f"{name}: data.eval_rows={n_hold} would hold out all {len(examples)} usable rows; lower data.eval_rows "
            "(or use data.eval_source, a separate file of held-out rows)"
        )
    shuffled = list(examples)
    random.Random(cfg.seed).shuffle(shuffled)
    rest, heldout = shuffled[: len(shuffled) - n_hold], shuffled[len(shuffled) - n_hold :]
    if cfg.limit is not None:
        return rest[: cfg.limit], heldout
    held = {ex.sample_id for ex in heldout}
    return [ex for ex in examples if ex.sample_id not in held], heldout


def detect_format(row: Mapping[str, Any], cfg: DataConfig) -> str | None:
    """The format a row's fields say, first match in the order of DataConfig.format's description; None if none."""
    if cfg.messages_field in row:
        return "messages"
    if cfg.conversations_field in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if cfg.prompt_field in row and "completion" in row:
        return "prompt_completion"
    if cfg.prompt_field in row or cfg.response_field in row:
        return "pairs"
    if cfg.text_field in row:
        return "text"
    return None


def _first_turn(ex: Example) -> Example:
    """A chat cut after its first trained assistant message (plain text is left as is)."""
    for i, msg in enumerate(ex.messages):
        if i >= ex.loss_from and msg["role"] == "assistant":
            return Example(ex.sample_id, ex.messages[: i + 1], ex.segments, ex.loss_from)
    return ex


def _raw_rows(src: Path | str, split: str) -> Iterator[tuple[int, str, Any]]:
    """(position in source, where to point a user, row or _BadRow) for every row of a file, folder or hub set."""
    if isinstance(src, str) or src.is_dir():
        ds = datasets.load_dataset(str(src), split=split)
        for i, row in enumerate(ds):
            yield i, f"index {i}", row
    elif src.suffix == ".jsonl":
        yield from _jsonl_rows(src)
    elif src.suffix == ".json":
        raw = src.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"{src}: row {line}: {_not_utf8(raw, e)}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yield from _jsonl_rows(src)  # not one JSON document: JSON lines with a .json name
            return
        if not isinstance(data, list):
            raise DataError(f"{src}: expected a JSON list of objects (or JSON lines), got {_type_name(data)}")
        for i, row in enumerate(data):
            yield i, f"index {i}", row
    elif src.suffix == ".parquet":
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(src).iter_batches():
            for row in batch.to_pylist():
                yield i, f"index {i}", row
                i += 1
    else:
        raise DataError(f"{src}: unsupported file type {src.suffix!r}; use .jsonl, .json or .parquet")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Rows of a JSON-lines file, one ``json.loads`` per line so a broken line is reported by its number.

    Lines are decoded one by one: a line that is not UTF-8 is a bad row named by its number and byte offset
    (never echoed: a binary file would flood the log)."""
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno - 1, f"row {lineno}", _BadRow("not UTF-8", _not_utf8(raw, e, start))
                continue
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as e:
                row = _BadRow("broken JSON", f"not valid JSON ({e.msg}, column {e.colno})")
            yield lineno - 1, f"row {lineno}", row


def _not_utf8(raw: bytes, e: UnicodeDecodeError, start: int = 0) -> str:
    """What is wrong with bytes that are not UTF-8: where, and which byte (not the content around it)."""
    return (f"not UTF-8 text (byte offset {start + e.start} in the file: 0x{raw[e.start]:02x}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _type_name(value: Any) -> str:
    """JSON-ish type names for messages: null, str, int, list, dict..."""
    return "null" if value is None else type(value).__name__


def _text(row: Mapping[str, Any], key: str) -> str:
    """row[key] as a non-empty string, or _BadRow naming the field and what was there instead."""
    if key not in row:
        raise _BadRow(f"missing field '{key}'", f"field '{key}': missing")
    value = row[key]
    if not isinstance(value, str):
        raise _BadRow(
            f"wrong type in field '{key}'", f"field '{key}': expected a non-empty string, got {_type_name(value)}"
        )
    if not value.strip():
        raise _BadRow(f"empty field '{key}'", f"field '{key}': expected a non-empty string, got an empty string")
    return value


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def _example_from(row: Any, fmt: str, cfg: DataConfig) -> Example:
    """Validate one row in `fmt` and normalise it to an Example (its sample_id is set by the caller)."""
    if not isinstance(row, dict):
        raise _BadRow("not an object", f"expected an object, got {_type_name(row)}")
    if fmt == "pairs":
        messages = [{"role": "user", "content": _text(row, cfg.prompt_field)}]
        messages.append({"role": "assistant", "content": _text(row, cfg.response_field)})
        if cfg.system_field is not None and row.get(cfg.system_field) not in (None, ""):
            messages.insert(0, {"role": "system", "content": _text(row, cfg.system_field)})
        return Example("", messages)
    if fmt == "messages":
        return Example("", _checked_chat(_chat(row, cfg.messages_field, "role", "content", ROLES), cfg.messages_field))
    if fmt == "sharegpt":
        key = cfg.conversations_field
        return Example("", _checked_chat(_chat(row, key, "from", "value", tuple(SHAREGPT_ROLES)), key))
    if fmt == "alpaca":
        return Example("", _alpaca(row))
    if fmt == "prompt_completion":
        return _prompt_completion(row, cfg.prompt_field)
    if fmt == "text":
        return Example("", [], ((_text(row, cfg.text_field), True),))
    raise ValueError(f"unknown data format {fmt!r}")  # unreachable: DataConfig.format is a Literal


def _chat(row: Mapping[str, Any], key: str, role_key: str, content_key: str, roles: Sequence[str]) -> Messages:
    """row[key] as a list of {role, content}, read from {role_key, content_key} objects whose role is in `roles`."""
    if key not in row:
        raise _BadRow(f"missing field '{key}'", f"field '{key}': missing")
    chat = row[key]
    if not isinstance(chat, list):
        raise _BadRow(
            f"wrong type in field '{key}'", f"field '{key}': expected a list of messages, got {_type_name(chat)}"
        )
    messages = []
    for i, msg in enumerate(chat):
        at = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise _BadRow(
                f"bad message in field '{key}'",
                f"field '{at}': expected an object with {role_key} and {content_key}, got {_type_name(msg)}",
            )
        if msg.get(role_key) not in roles:
            raise _BadRow(
                f"bad message in field '{key}'",
                f"field '{at}.{role_key}': expected one of {', '.join(roles)}, got {msg.get(role_key)!r}",
            )
        if not isinstance(msg.get(content_key), str):
            raise _BadRow(
                f"bad message in field '{key}'",
                f"field '{at}.{content_key}': expected a string, got {_type_name(msg.get(content_key))}",
            )
        messages.append({"role": SHAREGPT_ROLES[msg[role_key]], "content": msg[content_key]})
    return messages


def _checked_chat(messages: Messages, key: str, loss_from: int = 0) -> Messages:
    """A chat that trains: an assistant message with content (from `loss_from` on), a user message first."""
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages[loss_from:]):
        raise _BadRow(f"no assistant turn in field '{key}'", f"field '{key}': no assistant message with content")
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] != "user":
        # An assistant turn needs a prompt before it; chat templates also render a leading one inconsistently.
        raise _BadRow(
            f"bad message in field '{key}'", f"field '{key}': the first non-system message must be a user message"
        )
    return messages


def _alpaca(row: Mapping[str, Any]) -> Messages:
    """instruction (+ newline + input) -> output, after the optional system prompt and history pairs."""
    messages: Messages = []
    if row.get("system") not in (None, ""):
        messages.append({"role": "system", "content": _text(row, "system")})
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise _BadRow("wrong type in field 'history'",
                          f"field 'history': expected a list of [user, assistant] pairs, got {_type_name(history)}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                got = f"a list of {len(pair)}" if isinstance(pair, list) and len(pair) != 2 else _type_name(pair)
                if isinstance(pair, list) and len(pair) == 2:
                    got = f"[{', '.join(_type_name(t) for t in pair)}]"
                raise _BadRow("bad pair in field 'history'",
                              f"field 'history[{i}]': expected a [user, assistant] pair of strings, got {got}")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _text(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _BadRow("wrong type in field 'input'", f"field 'input': expected a string, got {_type_name(extra)}")
    if extra and extra.strip():
        prompt = f"{prompt}\n{extra}"
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
    return messages


def _prompt_completion(row: Mapping[str, Any], prompt_key: str) -> Example:
    """TRL's prompt/completion: two strings (plain text, loss on the completion) or two message lists."""
    if isinstance(row.get(prompt_key), list) or isinstance(row.get("completion"), list):
        prompt = _chat(row, prompt_key, "role", "content", ROLES)
        if not isinstance(row.get("completion"), list):
            raise _BadRow("wrong type in field 'completion'",
                          f"field 'completion': expected a list of messages like '{prompt_key}', "
                          f"got {_type_name(row.get('completion'))}")
        completion = _chat(row, "completion", "role", "content", ROLES)
        messages = prompt + completion
        if not any(m["role"] == "assistant" and m["content"].strip() for m in completion):
            raise _BadRow("no assistant turn in field 'completion'", "field 'completion': no assistant message with content")
        if not any(m["role"] != "system" for m in prompt):
            raise _BadRow(f"bad message in field '{prompt_key}'", f"field '{prompt_key}': no user message")
        return Example("", _checked_chat(messages, prompt_key, len(prompt)), loss_from=len(prompt))
    return Example("", [], ((_text(row, prompt_key), False), (_text(row, "completion"), True)))


def _sample_id(row: Mapping[str, Any], index: int, id_field: str | None) -> str:
    """The row's stable id: its `id_field` value, else ``row-<position in source>`` (unchanged by skips)."""
    if id_field is None:
        return f"row-{index}"
    if id_field not in row:
        raise _BadRow(f"missing field '{id_field}'", f"field '{id_field}': missing")
    value = row[id_field]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise _BadRow(
            f"wrong type in field '{id_field}'",
            f"field '{id_field}': expected a non-empty string or int id, got {value!r}",
        )
    return str(value)


# ---- tokenizing -------------------------------------------------------------------------------------------


def tokenize_rows(
    examples: Sequence[Example], tokenizer: Any, max_length: int, progress: bool = True, train_on_prompt: bool = False
) -> tuple[dict[str, list], dict[str, int]]:
    """Chat-template each chat example and label its assistant turns; tokenize plain-text ones; cut to `max_length`.

    An assistant turn i spans the tokens between ``template(messages[:i], add_generation_prompt=True)`` and
    ``template(messages[:i+1])``, so the header ``<|im_start|>assistant\\n`` stays unlabelled and the turn's
    end-of-turn token is labelled (the model must learn to stop); template text after the eos token (a
    newline) is left out. This relies on each rendering being a token prefix of the full conversation,
    which is checked: a template that breaks it raises DataError instead of mislabelling silently.

    Plain-text examples are their segments' tokens (special tokens such as bos only before the first) and
    eos, which carries loss. `train_on_prompt` labels every token.

    Returns the dataset columns, the rows dropped by reason ("response truncated away") and how many kept rows
    were cut to `max_length`.
    """
    if getattr(tokenizer, "chat_template", None) is None and any(not ex.segments for ex in examples):
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; qtuning formats chat rows with the "
            "model's chat template: use an instruct/chat model, set model.chat_template (a Jinja template or a file, "
            "e.g. ChatML) or use a plain-text format (text, or prompt/completion strings)"
        )
    eos = tokenizer.eos_token_id
    columns: dict[str, list] = {"sample_id": [], "input_ids": [], "labels": [], "length": [], "response_length": []}
    dropped: Counter[str] = Counter()
    truncated = 0
    bar = tqdm(total=len(examples), desc="Tokenizing", unit="row", disable=not progress, mininterval=1.0)
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        chunk = examples[start : start + _TOKENIZE_CHUNK]
        # Render every string of the chunk first, then tokenize them in one batched (parallel, Rust) call.
        texts: list[Any] = []  # strings, and _TURNS_END after each chat's turns
        first_segments: list[str] = []  # tokenized with the tokenizer's special tokens (bos)
        # The whole conversations first, with where their max_length-th token ends: a turn that starts past
        # that point is cut away, so it is never rendered (each turn's rendering re-renders the conversation
        # before it, and rendering every turn of a long chat costs its turns squared).
        chats = [tokenizer.apply_chat_template(ex.messages, tokenize=False) for ex in chunk if not ex.segments]
        full_ids, cut_chars = _encode_with_cut(tokenizer, chats, max_length)
        chat_no = 0
        for ex in chunk:
            if ex.segments:
                first_segments.append(ex.segments[0][0])
                texts.extend(text for text, _ in ex.segments[1:])
                continue
            cut_at, chat_no = cut_chars[chat_no], chat_no + 1
            for i, msg in enumerate(ex.messages):
                if msg["role"] == "assistant" and i >= ex.loss_from:
                    before = tokenizer.apply_chat_template(ex.messages[:i], tokenize=False, add_generation_prompt=True)
                    if len(before) >= cut_at:  # this turn and every later one start past the cut
                        break
                    texts += [before, tokenizer.apply_chat_template(ex.messages[: i + 1], tokenize=False)]
            texts.append(_TURNS_END)
        # The last assistant turn's rendering usually is the whole conversation: tokenize each text once.
        unique = [t for t in dict.fromkeys(texts) if t is not _TURNS_END]
        ids_of = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True)) if unique else {}
        encoded = (text if text is _TURNS_END else ids_of[text] for text in texts)
        firsts = iter(tokenizer(first_segments)["input_ids"] if first_segments else [])
        fulls = iter(full_ids)
        for ex in chunk:
            if ex.segments:
                ids, labels = _plain_text(ex, next(firsts), encoded, eos, train_on_prompt)
            else:
                ids, labels = _chat_labels(ex, next(fulls), encoded, eos, tokenizer, train_on_prompt)
            cut = len(ids) > max_length
            ids, labels = ids[:max_length], labels[:max_length]
            n_response = sum(label != IGNORE_INDEX for label in labels[1:])  # position 0 is never predicted
            if n_response == 0:
                dropped["response truncated away"] += 1
                continue
            truncated += cut
            columns["sample_id"].append(ex.sample_id)
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["length"].append(len(ids))
            columns["response_length"].append(sum(label != IGNORE_INDEX for label in labels))
        bar.update(len(chunk))
    bar.close()
    return columns, dict(dropped), truncated


_TURNS_END = object()  # among the rendered texts: the end of one chat's turns


def _encode_with_cut(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[list[int]], list[float]]:
    """Token ids of `texts`, and for each the character offset where its first `max_length` tokens end (inf when
    it is not longer, or when the tokenizer cannot map tokens to characters: every turn is then rendered)."""
    if not texts:
        return [], []
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a slow (Python) tokenizer has no offsets
        return tokenizer(texts, add_special_tokens=False)["input_ids"], [math.inf] * len(texts)
    cuts = [float(offsets[max_length - 1][1]) if len(ids) > max_length else math.inf
            for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return enc["input_ids"], cuts


def _chat_labels(ex: Example, ids: list[int], encoded: Iterator[Any], eos: int | None, tokenizer: Any,
                 train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """A chat's token ids and labels: its trained assistant turns (each through its eos), or every token. The
    turns rendered are those that start before the cut (`_TURNS_END` follows the last)."""
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(ex.messages):
        if msg["role"] != "assistant" or i < ex.loss_from:
            continue
        before = next(encoded)
        if before is _TURNS_END:  # the remaining turns start past max_length: cut away
            break
        through = next(encoded)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise DataError(
                f"sample {ex.sample_id}: the chat template of {tokenizer.name_or_path!r} is not prefix-stable "
                "(rendering the conversation up to an assistant turn does not give a prefix of the whole "
                "conversation), so assistant tokens cannot be located; use single-turn pairs or another "
                "template"
            )
        end = len(through)
        if eos is not None and eos in through[len(before) :]:
            end = len(through) - through[::-1].index(eos)  # just after the turn's last eos
        labels[len(before) : end] = ids[len(before) : end]
    else:
        if next(encoded) is not _TURNS_END:
            raise RuntimeError(f"sample {ex.sample_id}: rendered turns out of step with the labelling")
    return ids, (list(ids) if train_on_prompt else labels)


def _plain_text(ex: Example, first: list[int], encoded: Iterator[list[int]], eos: int | None,
                train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Plain-text segments, no template: their tokens in order, then eos (labelled, so the model learns to stop)."""
    ids: list[int] = []
    labels: list[int] = []
    for k, (_, loss) in enumerate(ex.segments):
        part = first if k == 0 else next(encoded)
        ids += part
        labels += part if (loss or train_on_prompt) else [IGNORE_INDEX] * len(part)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return ids, labels


_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "response_length": datasets.Value("int32"),
    }
)


def build_sft_dataset(
    cfg: DataConfig, tokenizer: Any, progress: bool = True, log: Callable[[str], None] | None = None
) -> SFTData:
    """Load, validate and tokenize ``cfg.source`` into an SFTData ready for ``collate`` (then ``cfg.subset``, if set).

    `log` receives the one line that says which format ``format: auto`` chose (default: standard error).
    """
    rows = load_rows(cfg, log=log or _stderr)
    columns, dropped, truncated = tokenize_rows(rows.examples, tokenizer, cfg.max_length, progress, cfg.train_on_prompt)
    skipped = Counter(rows.skipped) + Counter(dropped)
    if not columns["sample_id"]:
        raise DataError(
            f"{cfg.source}: no row keeps a response token within data.max_length={cfg.max_length}; "
            "raise data.max_length"
        )
    heldout = None
    if rows.heldout:  # tokenized like the training rows; a row whose response is cut away cannot be measured
        held_columns, held_dropped, *_ = tokenize_rows(rows.heldout, tokenizer, cfg.max_length, False, cfg.train_on_prompt)
        skipped.update({f"held-out: {reason}": n for reason, n in held_dropped.items()})
        if not held_columns["sample_id"]:
            raise DataError(f"{cfg.eval_source or cfg.source}: no held-out row keeps a response token within "
                            f"data.max_length={cfg.max_length}; raise data.max_length")
        heldout = datasets.Dataset.from_dict(held_columns, features=_FEATURES)
    base = cfg.model_copy(update={"subset": None})
    data = SFTData(
        heldout=heldout,
        dataset=datasets.Dataset.from_dict(columns, features=_FEATURES),
        fingerprint=fingerprint(base, tokenizer),
        skipped=dict(skipped),
        source=rows.source,
        config=base,
        format=rows.format,
        truncated=truncated,
    )
    return data.select_ids(cfg.subset) if cfg.subset else data


def write_rows(cfg: DataConfig, ids: Sequence[str], path: str | Path) -> Path:
    """The rows of `cfg` whose sample ids are in `ids`, as JSON lines a new run reads back as themselves (format
    auto, each row's id under ``id``: set ``data.id_field: id`` to keep the ids): an exported subset to train on."""
    wanted = set(ids)
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for ex in load_rows(cfg).examples:
            if ex.sample_id in wanted:
                f.write(json.dumps({"id": ex.sample_id, **ex.to_row()}, ensure_ascii=False) + "\n")
    return path


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@functools.lru_cache(maxsize=1024)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content, memoised on (path, size, modification time): a process reads a file once
    however many cache keys name it (a file rewritten changes its size or time, and is read again)."""
    p = Path(path)
    st = p.stat()
    return _file_sha(str(p.resolve()), st.st_size, st.st_mtime_ns)


def fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """sha256 over the source's content, the data config and the tokenizer: equal inputs, equal key, any process.

    Local files count by the sha256 of their content (`file_sha256`: a 40 MB preset takes ~0.1 s, once per
    process), so a cache keyed on it notices an edited file at any path; hub data sets contribute their
    ``_fingerprint``.

    No absolute path of this machine enters it: a local source and the held-out file count by content (not by
    where they lie), a local tokenizer by its folder's name, its vocabulary and its template, so a data set on a
    shared folder mounted at another path on another machine has the same fingerprint.
    """
    src = resolve_source(cfg.source)
    located = {"source": "local" if isinstance(src, Path) else cfg.source,
               "eval_source": None if cfg.eval_source is None else "local"}
    name = tokenizer.name_or_path
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json") | located, sort_keys=True).encode())
    h.update(
        json.dumps(
            {"tokenizer": Path(name).name if Path(name).expanduser().exists() else name, "vocab": len(tokenizer),
             "chat_template": tokenizer.chat_template},
            sort_keys=True,
        ).encode()
    )
    if cfg.eval_source is not None:  # the held-out file, by content
        h.update(file_sha256(Path(cfg.eval_source).expanduser()).encode())
    if isinstance(src, str):
        h.update(datasets.load_dataset(src, split=cfg.split)._fingerprint.encode())
    else:
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
        for path in files:
            h.update(str(path.relative_to(src)).encode() if src.is_dir() else b"")
            h.update(file_sha256(path).encode())
    return h.hexdigest()


# ---- batching ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A right-padded batch; padding is masked by position, never by token id (pad = eos in SmolLM2)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 on real tokens
    labels: torch.Tensor  # (B, T), IGNORE_INDEX off the response and on padding

    def rows(self, keep: torch.Tensor) -> "Batch":
        """The rows in `keep`, with the padding columns none of them needs trimmed away."""
        mask = self.attention_mask[keep]
        width = int(mask.sum(1).max()) if len(mask) else 0  # a host sync: once per pool; no row kept: an empty batch
        return Batch(self.input_ids[keep, :width], mask[:, :width], self.labels[keep, :width])

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels)))


def collate(rows_ids: Sequence[Sequence[int]], rows_labels: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Right-pad token rows to the longest one."""
    width = max(len(r) for r in rows_ids)
    input_ids = torch.full((len(rows_ids), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    for b, (ids, lab) in enumerate(zip(rows_ids, rows_labels, strict=True)):
        input_ids[b, : len(ids)] = torch.as_tensor(ids)
        labels[b, : len(ids)] = torch.as_tensor(lab)
        attention_mask[b, : len(ids)] = 1
    return Batch(input_ids, attention_mask, labels)
