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

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from qtuning import assets
from qtuning.config import DATA_PRESETS, DataConfig

IGNORE_INDEX = -100  # label value the loss ignores (torch.nn.CrossEntropyLoss default)
ROLES = ("system", "user", "assistant")
_MAX_REPORTED = 10  # bad rows listed in one DataError
_TOKENIZE_CHUNK = 256  # rows rendered and tokenized per batched tokenizer call

Messages = list[dict[str, str]]


class DataError(ValueError):
    """Malformed data; the message names the file, the row and the field."""


@dataclass(frozen=True)
class Example:
    """One validated row, normalised to a chat."""

    sample_id: str
    messages: Messages


@dataclass(frozen=True)
class LoadedRows:
    """Rows that passed validation, in the order training sees them, and what was skipped."""

    examples: list[Example]
    skipped: dict[str, int]
    source: str  # the resolved source: a file path or a hub id


@dataclass(frozen=True)
class SFTData:
    """A tokenized SFT set: written once (``save``), read by every later step (``load``), never tokenized again.

    ``dataset`` columns: ``sample_id`` (str), ``input_ids`` and ``labels`` (list[int], labels -100 off the
    response), ``length`` (tokens) and ``response_length`` (labelled tokens).
    """

    dataset: datasets.Dataset
    fingerprint: str  # sha256 of source content + data config + tokenizer; keys caches across processes
    skipped: dict[str, int]  # reason -> rows dropped (bad rows, "response truncated away")
    source: str  # the resolved source: a file path or a hub id
    config: DataConfig  # what it was built from (``subset`` is applied later, by ``select_ids``)

    META = "sft_data.json"  # beside the arrow files: fingerprint, skipped, source, config

    def save(self, path: str | Path) -> Path:
        """The dataset's arrow files and ``sft_data.json`` into the folder `path` (created; its content replaced)."""
        path = Path(path)
        self.dataset.save_to_disk(str(path))
        meta = {"fingerprint": self.fingerprint, "skipped": self.skipped, "source": self.source,
                "config": self.config.model_dump(mode="json")}
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
        return cls(datasets.load_from_disk(str(path)), meta["fingerprint"], meta["skipped"], meta["source"],
                   DataConfig.model_validate(meta["config"]))

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
        return SFTData(self.dataset.select(rows), digest, self.skipped, self.source, self.config)


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


def load_rows(cfg: DataConfig) -> LoadedRows:
    """Read and validate every row of ``cfg.source``, then apply the seeded shuffle and ``cfg.limit``.

    With ``on_bad_row: error`` all rows are still checked, so one DataError lists the first problems and
    their total; with ``skip`` bad rows are dropped and counted by reason.
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
                fmt = "messages" if cfg.messages_field in row else "pairs"
            messages = _messages_from(row, fmt or "pairs", cfg)
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
        examples.append(Example(sample_id, messages))

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
    if cfg.limit is not None:
        random.Random(cfg.seed).shuffle(examples)
        examples = examples[: cfg.limit]
    return LoadedRows(examples, dict(skipped), str(src))


def _raw_rows(src: Path | str, split: str) -> Iterator[tuple[int, str, Any]]:
    """(position in source, where to point a user, row or _BadRow) for every row of a file, folder or hub set."""
    if isinstance(src, str) or src.is_dir():
        ds = datasets.load_dataset(str(src), split=split)
        for i, row in enumerate(ds):
            yield i, f"index {i}", row
    elif src.suffix == ".jsonl":
        yield from _jsonl_rows(src)
    elif src.suffix == ".json":
        try:
            data = json.loads(src.read_text(encoding="utf-8"))
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
    """Rows of a JSON-lines file, one ``json.loads`` per line so a broken line is reported by its number."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as e:
                row = _BadRow("broken JSON", f"not valid JSON ({e.msg}, column {e.colno})")
            yield lineno - 1, f"row {lineno}", row


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


def _messages_from(row: Any, fmt: str, cfg: DataConfig) -> Messages:
    """Validate one row in `fmt` and normalise it to a chat of {role, content}."""
    if not isinstance(row, dict):
        raise _BadRow("not an object", f"expected an object, got {_type_name(row)}")
    if fmt == "pairs":
        messages = [{"role": "user", "content": _text(row, cfg.prompt_field)}]
        messages.append({"role": "assistant", "content": _text(row, cfg.response_field)})
        if cfg.system_field is not None and row.get(cfg.system_field) not in (None, ""):
            messages.insert(0, {"role": "system", "content": _text(row, cfg.system_field)})
        return messages

    key = cfg.messages_field
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
                f"field '{at}': expected an object with role and content, got {_type_name(msg)}",
            )
        if msg.get("role") not in ROLES:
            raise _BadRow(
                f"bad message in field '{key}'",
                f"field '{at}.role': expected one of {', '.join(ROLES)}, got {msg.get('role')!r}",
            )
        if not isinstance(msg.get("content"), str):
            raise _BadRow(
                f"bad message in field '{key}'",
                f"field '{at}.content': expected a string, got {_type_name(msg.get('content'))}",
            )
        messages.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _BadRow(f"no assistant turn in field '{key}'", f"field '{key}': no assistant message with content")
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] != "user":
        # An assistant turn needs a prompt before it; chat templates also render a leading one inconsistently.
        raise _BadRow(
            f"bad message in field '{key}'", f"field '{key}': the first non-system message must be a user message"
        )
    return messages


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
    examples: Sequence[Example], tokenizer: Any, max_length: int, progress: bool = True
) -> tuple[dict[str, list], dict[str, int]]:
    """Chat-template each example; label each assistant turn; cut to `max_length`.

    An assistant turn i spans the tokens between ``template(messages[:i], add_generation_prompt=True)`` and
    ``template(messages[:i+1])``, so the header ``<|im_start|>assistant\\n`` stays unlabelled and the turn's
    end-of-turn token is labelled (the model must learn to stop); template text after the eos token (a
    newline) is left out. This relies on each rendering being a token prefix of the full conversation,
    which is checked: a template that breaks it raises DataError instead of mislabelling silently.

    Returns the dataset columns and the rows dropped by reason ("response truncated away").
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; qtuning formats SFT rows with the "
            "model's chat template: use an instruct/chat model or set tokenizer.chat_template"
        )
    eos = tokenizer.eos_token_id
    columns: dict[str, list] = {"sample_id": [], "input_ids": [], "labels": [], "length": [], "response_length": []}
    dropped: Counter[str] = Counter()
    bar = tqdm(total=len(examples), desc="Tokenizing", unit="row", disable=not progress, mininterval=1.0)
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        chunk = examples[start : start + _TOKENIZE_CHUNK]
        # Render every string of the chunk first, then tokenize them in one batched (parallel, Rust) call.
        texts: list[str] = []
        for ex in chunk:
            texts.append(tokenizer.apply_chat_template(ex.messages, tokenize=False))
            for i, msg in enumerate(ex.messages):
                if msg["role"] == "assistant":
                    texts.append(
                        tokenizer.apply_chat_template(ex.messages[:i], tokenize=False, add_generation_prompt=True)
                    )
                    texts.append(tokenizer.apply_chat_template(ex.messages[: i + 1], tokenize=False))
        # The last assistant turn's rendering usually is the whole conversation: tokenize each text once.
        unique = list(dict.fromkeys(texts))
        ids_of = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
        encoded = (ids_of[text] for text in texts)
        for ex in chunk:
            ids = next(encoded)
            labels = [IGNORE_INDEX] * len(ids)
            for msg in ex.messages:
                if msg["role"] != "assistant":
                    continue
                before, through = next(encoded), next(encoded)
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
            ids, labels = ids[:max_length], labels[:max_length]
            n_response = sum(label != IGNORE_INDEX for label in labels)
            if n_response == 0:
                dropped["response truncated away"] += 1
                continue
            columns["sample_id"].append(ex.sample_id)
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["length"].append(len(ids))
            columns["response_length"].append(n_response)
        bar.update(len(chunk))
    bar.close()
    return columns, dict(dropped)


_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "response_length": datasets.Value("int32"),
    }
)


def build_sft_dataset(cfg: DataConfig, tokenizer: Any, progress: bool = True) -> SFTData:
    """Load, validate and tokenize ``cfg.source`` into an SFTData ready for ``collate`` (then ``cfg.subset``, if set)."""
    rows = load_rows(cfg)
    columns, dropped = tokenize_rows(rows.examples, tokenizer, cfg.max_length, progress)
    skipped = Counter(rows.skipped) + Counter(dropped)
    if not columns["sample_id"]:
        raise DataError(
            f"{cfg.source}: no row keeps a response token within data.max_length={cfg.max_length}; "
            "raise data.max_length"
        )
    base = cfg.model_copy(update={"subset": None})
    data = SFTData(
        dataset=datasets.Dataset.from_dict(columns, features=_FEATURES),
        fingerprint=fingerprint(base, tokenizer),
        skipped=dict(skipped),
        source=rows.source,
        config=base,
    )
    return data.select_ids(cfg.subset) if cfg.subset else data


def fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """sha256 over the source's content, the data config and the tokenizer: equal inputs, equal key, any process.

    Local files are hashed by content in 1 MiB chunks (a 40 MB preset takes ~0.1 s), so a cache keyed on it
    notices an edited file at any path; hub data sets contribute their ``_fingerprint``.
    """
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
    h.update(
        json.dumps(
            {"tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer), "chat_template": tokenizer.chat_template},
            sort_keys=True,
        ).encode()
    )
    src = resolve_source(cfg.source)
    if isinstance(src, str):
        h.update(datasets.load_dataset(src, split=cfg.split)._fingerprint.encode())
    else:
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
        for path in files:
            h.update(str(path.relative_to(src)).encode() if src.is_dir() else b"")
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
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
        width = int(mask.sum(1).max())  # a host sync: once per pool
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
