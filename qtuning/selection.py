"""The selection log: what every pool decided about every sample it held, one row per (step, pool, sample).

The training loop writes it to `selection.parquet` in the run folder. Its columns:

| column | meaning |
|---|---|
| step | optimizer step (1-based) the pool trained in |
| epoch | 0-based pass over the data the pool belongs to |
| pool | global pool index (epoch x pools per epoch + position; unique across processes) |
| sample_id | the row's id (`data.id_field`, else `row-<position in source>`) |
| ppl, ent | sample perplexity and mean entropy the pool was judged on (NaN when no rule scored: full data, random) |
| quadrant | geometric quadrant of the triage at its final thresholds, before fill-in: 1..4, 0 between the thresholds or no triage |
| kept | the sample trained in this step |
| filled_in | kept by the triage's fill-in rule (its quadrant says where it lies) |
| token_pruned | kept and handed to the token rule (Q2 and Q2-like fill-ins for Q-Tuning; every kept row otherwise) |
| response_tokens | the row's response (label) tokens |
| loss_tokens | of which carried loss in this step (0 when dropped; fewer than response_tokens when token-pruned) |

Crash-safe without coupling to checkpoints: each process appends its rows, step by step, to
`selection.partial/rank-<r>.jsonl` (cheap appends, like metrics.jsonl); on resume the rows past the
checkpoint's step are dropped (they will be redone), so nothing is lost or duplicated; when training ends the
main process writes `selection.parquet` (atomically) and removes the staging folder.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FILE = "selection.parquet"
STAGING = "selection.partial"
COLUMNS = {  # name -> pyarrow type name
    "step": "int64", "epoch": "int64", "pool": "int64", "sample_id": "string", "ppl": "float64", "ent": "float64",
    "quadrant": "int8", "kept": "bool_", "filled_in": "bool_", "token_pruned": "bool_", "response_tokens": "int64",
    "loss_tokens": "int64",
}


def log_rows(step: int, epoch: int, pool: int, sample_ids: Sequence[str], response_tokens: Sequence[int], sel: Any,
              loss_tokens: Sequence[int]) -> list[dict[str, Any]]:
    """The log rows of one pool, in pool order, from its stage-1 `qtuning.rules.Selection` (CPU tensors)."""
    n = len(sample_ids)
    nan = [math.nan] * n
    ppl = sel.ppl.tolist() if sel.ppl is not None else nan
    ent = sel.ent.tolist() if sel.ent is not None else nan
    keep, fill, prune, quadrant = sel.keep.tolist(), sel.fill_in.tolist(), sel.prune_tokens.tolist(), sel.quadrant.tolist()
    return [
        {"step": step, "epoch": epoch, "pool": pool, "sample_id": sample_ids[r], "ppl": float(ppl[r]), "ent": float(ent[r]),
         "quadrant": int(quadrant[r]), "kept": bool(keep[r]), "filled_in": bool(fill[r]), "token_pruned": bool(keep[r] and prune[r]),
         "response_tokens": int(response_tokens[r]), "loss_tokens": int(loss_tokens[r])}
        for r in range(n)
    ]


class SelectionLog:
    """Appends each step's rows to this process's staging file; the main process turns them into the parquet file.

    `keep_until`: the step the run (re)starts from; rows of later steps, left by a run that stopped after its last
    checkpoint, are dropped. Only the main process touches other processes' files, before the first step
    (callers put a barrier after construction) and after the last one.
    """

    def __init__(self, out: Path, rank: int, main: bool, keep_until: int):
        self.out, self.main = Path(out), main
        self.staging = self.out / STAGING
        self.path = self.staging / f"rank-{rank}.jsonl"
        if main:
            rows = [r for r in _read_all(self.out) if r["step"] <= keep_until]
            shutil.rmtree(self.staging, ignore_errors=True)
            (self.out / FILE).unlink(missing_ok=True)  # rewritten when training ends
            self.staging.mkdir(parents=True, exist_ok=True)
            _append(self.path, rows)

    def record(self, rows: list[dict[str, Any]]) -> None:
        """One step's rows of this process (an append: a crash loses at most the step being written)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        _append(self.path, rows)

    def close(self) -> Path | None:
        """Main process, after every process's last step: write selection.parquet, drop the staging folder."""
        if not self.main:
            return None
        rows = _read_all(self.out)
        path = write_parquet(rows, self.out / FILE)
        shutil.rmtree(self.staging, ignore_errors=True)
        return path


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    if rows:
        with path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def _read_all(out: Path) -> list[dict[str, Any]]:
    """Rows of a finished log and of every staging file, sorted by (step, pool), pool order kept."""
    rows: list[dict[str, Any]] = []
    if (out / FILE).exists():
        rows += read_selection(out / FILE).to_dict(orient="records")
    for path in sorted((out / STAGING).glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a process killed mid-write
                continue
    return sorted(rows, key=lambda r: (r["step"], r["pool"]))  # stable: pool order within a pool


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    """The rows as parquet with the log's schema, written to a temporary name and renamed (never half a file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_selection(path: str | Path):
    """A selection log (the parquet file, or a run folder holding one) as a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    return pd.read_parquet(path / FILE if path.is_dir() else path)
