"""The seeded reference runs of tests/test_reference_run.py: how a run's pruning decisions are captured, replayed
and recorded.

`tests/data/reference_run.json` holds, for each of five configs (Q-Tuning per sample; Q-Tuning batch_global
over two accumulated pools of 16; pool-local InfoBatch + random tokens; InfoBatch as published + random tokens,
with its score table's threshold and annealing; full data), every call of the pruning stages
(`qtuning.pruning.prune_pool`) with its inputs (the pool's rows and labels, the sample scores PPL and Ent and
the response tokens' NLLs as the scoring forward computed them, the pool's generator seed, the loop's threshold
and annealing flag) and its decisions
(rows kept, quadrants, fill-ins, weights, which response tokens were pruned), and every step's metrics but the
wall-clock ones.

Re-record it (after a change that moves decisions on purpose) with

    .venv/bin/python tests/reference.py

which keeps the configs in the file and replaces the rest. The scores carry the recording CPU's rounding; the
test asserts only what holds on any CPU (see its docstring).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

FILE = Path(__file__).parent / "data" / "reference_run.json"
IGNORE = -100
WALL_CLOCK = ("time/", "per_second")  # metric names that measure this machine's speed, not the run


def load() -> dict:
    return json.loads(FILE.read_text())


def _floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [float(x) for x in t.detach().float().cpu()]


def encode_decision(labels: torch.Tensor, decision) -> dict:
    """A PoolDecision as JSON: the selection and, per row, the response positions token pruning took."""
    sel, out = decision.sel, decision.labels.cpu()
    labels = labels.cpu()
    dropped = (labels != IGNORE) & (out == IGNORE)
    return {
        "keep": sel.keep.int().tolist(),
        "quadrant": sel.quadrant.tolist(),
        "fill_in": sel.fill_in.int().tolist(),
        "prune_tokens": sel.prune_tokens.int().tolist(),
        "weight": _floats(sel.weight),
        "alpha": None if math.isnan(sel.alpha) else float(sel.alpha),
        "filled": int(sel.filled),
        "excluded": int(decision.excluded),
        "budget_tokens": decision.budget_tokens,
        "dropped": [r.nonzero().flatten().tolist() for r in dropped],
    }


def encode_call(stats, labels: torch.Tensor, nll: torch.Tensor | None, attention_mask: torch.Tensor, seed: int, decision) -> dict:
    """One prune_pool call: its inputs (rows cut to their length, NLLs of the label positions) and decision."""
    labels, mask = labels.cpu(), attention_mask.cpu()
    lengths = [int(x) for x in mask.sum(1)]
    return {
        "generator_seed": seed,
        "labels": [labels[r, :n].tolist() for r, n in enumerate(lengths)],
        "ppl": _floats(stats.ppl),
        "ent": _floats(stats.ent),
        "nll": None if nll is None else [[float(x) for x in nll[r].cpu()[labels[r] != IGNORE]] for r in range(len(lengths))],
        "threshold": stats.threshold,  # what the loop knew beyond the pool (InfoBatch's score table, its annealing)
        "anneal": stats.anneal,
        "decision": encode_decision(labels, decision),
    }


def replay(call: dict, pruning) -> dict:
    """prune_pool on a recorded call's inputs (right-padded as collate pads): the decision it takes here."""
    from qtuning.pruning import prune_pool
    from qtuning.rules import PoolStats

    b, width = len(call["labels"]), max(len(row) for row in call["labels"])
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    nll = None if call["nll"] is None else torch.zeros((b, width), dtype=torch.float32)
    for r, row in enumerate(call["labels"]):
        labels[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        if nll is not None:
            nll[r, : len(row)][labels[r, : len(row)] != IGNORE] = torch.tensor(call["nll"][r], dtype=torch.float32)
    as_tensor = lambda x: None if x is None else torch.tensor(x, dtype=torch.float32)  # noqa: E731
    stats = PoolStats(lengths=mask.sum(1), response_lengths=(labels[:, 1:] != IGNORE).sum(1),
                      ppl=as_tensor(call["ppl"]), ent=as_tensor(call["ent"]),
                      threshold=call.get("threshold"), anneal=call.get("anneal", False))
    gen = torch.Generator().manual_seed(call["generator_seed"])
    return encode_decision(labels, prune_pool(stats, labels, nll, mask, pruning, gen))


def run(raw: dict, out_dir: Path, layout: str = "padded") -> dict:
    """Train one seeded config (no checkpoint, no final model): {"calls": every prune_pool call encoded,
    "metrics": every step's metrics but the wall-clock ones}."""
    import qtuning.train as T
    from qtuning.config import ExperimentConfig

    raw = json.loads(json.dumps(raw))
    raw["training"]["output_dir"] = str(out_dir)
    raw["training"]["layout"] = layout
    cfg = ExperimentConfig.model_validate(raw)
    calls: list[dict] = []
    prune_pool = T.prune_pool

    def spy(stats, labels, nll, attention_mask, pruning, gen):
        seed = gen.initial_seed()  # a fresh generator per pool: replaying from its seed draws the same numbers
        decision = prune_pool(stats, labels, nll, attention_mask, pruning, gen)
        calls.append(encode_call(stats, labels, nll, attention_mask, seed, decision))
        return decision

    T.prune_pool = spy
    try:
        T.train(cfg, progress=False, save=False)
    finally:
        T.prune_pool = prune_pool
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in m.items() if not any(w in k for w in WALL_CLOCK)} for m in metrics]
    return {"calls": calls, "metrics": metrics}


def main() -> int:
    import tempfile

    ref = load()
    for name, entry in ref.items():
        with tempfile.TemporaryDirectory() as tmp:
            got = run(entry["config"], Path(tmp) / name)
        ref[name] = {"config": entry["config"], **got}
        print(f"{name}: {len(got['calls'])} pools, {len(got['metrics'])} steps")
    FILE.write_text(json.dumps(ref, separators=(",", ":")) + "\n")
    print(f"wrote {FILE} ({FILE.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
