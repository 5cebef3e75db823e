"""What one optimizer step did, summed over its pools and every process: the counts the loop keeps in its
TrainState, the metrics it logs, and the append-only metrics.jsonl they go to.

Each count has a name from the pools to the metrics: the step's numbers are gathered into one named table,
reduced across processes in one collective (one host sync), and read back by name.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from qtuning.checkpoints import TrainState

if TYPE_CHECKING:  # the loop's own types (qtuning.train imports this module)
    from qtuning.train import Learned, Pruned

# Per-step counts summed over a step's pools (and processes). q1..q4: geometric quadrants before fill-in;
# filled_from_*: fill-ins by the quadrant they lie in (fill-ins come from Q1, Q3 or between the thresholds);
# filled_as_q2: fill-ins that count as Q2 (token-pruned; the others train whole, as Q4).
POOL_COUNTS = ("pool", "kept", "response", "real", "q1", "q2", "q3", "q4", "filled", "filled_from_q1", "filled_from_q3",
               "filled_from_none", "filled_as_q2", "nonfinite", "budget_tokens")
QUADRANT_COUNTS = POOL_COUNTS[4:-1]  # logged as prune/<name>


def pool_counts(pools: list[Pruned]) -> dict[str, float]:
    """The POOL_COUNTS of a step's pools, summed, by name (host-side: selections live on CPU)."""
    totals = dict.fromkeys(POOL_COUNTS, 0.0)
    for p in pools:
        s = p.sel
        fill = s.fill_in
        row = {
            "pool": s.keep.numel(), "kept": s.keep.sum(), "response": p.response_tokens, "real": p.real_tokens,
            **{f"q{q}": (s.quadrant == q).sum() for q in (1, 2, 3, 4)},
            "filled": fill.sum(), "filled_from_q1": (fill & (s.quadrant == 1)).sum(),
            "filled_from_q3": (fill & (s.quadrant == 3)).sum(), "filled_from_none": (fill & (s.quadrant == 0)).sum(),
            "filled_as_q2": (fill & s.prune_tokens).sum(), "nonfinite": p.excluded, "budget_tokens": p.budget_tokens or 0,
        }
        for name in POOL_COUNTS:
            totals[name] += float(row[name])
    return totals


def reduce_named(accelerator, on_device: dict[str, torch.Tensor], on_host: dict[str, float]) -> dict[str, float]:
    """Every value summed over the processes, by name: the device scalars and the host numbers go as one tensor
    through one reduction (one collective, one host sync)."""
    device_part = torch.stack([v.double() for v in on_device.values()])
    host_part = torch.tensor(list(on_host.values()), dtype=torch.float64).to(device_part.device)
    totals = accelerator.reduce(torch.cat([device_part, host_part]), reduction="sum").tolist()
    return dict(zip([*on_device, *on_host], totals, strict=True))


def record_step(accelerator, state: TrainState, pools: list[Pruned], learned: Learned, lr: float,
                seconds: tuple[float, float, float], pools_per_epoch: int, budget: bool) -> dict[str, float]:
    """Adds the step's counts, summed over its pools and every process, to `state`; returns its metrics.

    `seconds`: (scoring, learning, this process's CPU time) of the step: the step's loss and loss tokens (on
    device), the pools' counts (host) and the positions the forwards computed, reduced together by name.
    """
    q2_tokens = torch.stack([p.q2_tokens for p in pools]).sum(0)  # (2,) before, after token pruning
    on_device = {"loss": learned.loss, "loss_tokens": torch.stack([p.loss_tokens for p in pools]).sum(),
                 "q2_before": q2_tokens[0], "q2_after": q2_tokens[1]}
    on_host = {**pool_counts(pools),
               "fed": learned.fed_tokens + sum(p.score_fed_tokens for p in pools),  # positions the forwards computed
               "fed_real": learned.real_tokens + sum(p.score_real_tokens for p in pools)}  # of which real tokens
    c = reduce_named(accelerator, on_device, on_host)
    loss_value = c["loss"] / accelerator.num_processes
    score_s, learn_s, cpu_s = seconds

    state.loss_tokens += int(c["loss_tokens"])
    state.samples_trained += int(c["kept"])
    state.samples_seen += int(c["pool"])
    state.nonfinite += int(c["nonfinite"])
    state.score_seconds += score_s
    state.learn_seconds += learn_s
    state.loop_cpu_seconds += cpu_s
    state.fed_tokens += int(c["fed"])
    state.fed_real_tokens += int(c["fed_real"])
    state.budget_tokens += int(c["budget_tokens"])
    if learned.skipped:
        state.skipped_steps += 1
    else:
        state.last_loss = loss_value

    metrics = {
        "train/loss": loss_value,
        "train/lr": lr,
        "train/epoch": state.pools_done / pools_per_epoch,
        "train/loss_tokens": state.loss_tokens,
        "train/samples_trained": state.samples_trained,
        "train/skipped_steps": state.skipped_steps,
        "prune/kept_samples": c["kept"] / c["pool"],
        "prune/kept_tokens": c["loss_tokens"] / max(c["response"], 1),  # share of the pools' response tokens that trained
        **{f"prune/{k}": c[k] for k in QUADRANT_COUNTS},
        "time/score_seconds": score_s,
        "time/learn_seconds": learn_s,
        "time/tokens_per_second": c["real"] / max(score_s + learn_s, 1e-9),
        # every forward of the step (scoring and training): padding is what the layout wastes
        "train/padding_share": 1 - c["fed_real"] / max(c["fed"], 1),
        "train/real_tokens_per_second": c["fed_real"] / max(score_s + learn_s, 1e-9),
    }
    if learned.skipped:  # no loss was computed: leave the curve a gap rather than a 0
        del metrics["train/loss"]
    alphas = [p.sel.alpha for p in pools if not math.isnan(p.sel.alpha)]
    if alphas:
        metrics["prune/alpha"] = float(np.mean(alphas))
    if c["q2_before"]:  # kept response tokens of token-pruned rows / their response tokens: ~r_t under per_sample
        metrics["prune/q2_token_keep"] = c["q2_after"] / c["q2_before"]
    if budget:
        metrics["prune/budget_tokens"] = c["budget_tokens"]
    return metrics


class MetricsFile:
    """Append-only metrics.jsonl; on resume, lines past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        kept, torn = [], []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:  # a line cut short by a full disk or a kill mid-write
                torn.append(number)
                continue
            if isinstance(record, dict) and record.get("step", keep_until + 1) <= keep_until:
                kept.append(line)
        if torn:
            print(f"qtuning.train: {path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}), "
                  "written when the run stopped mid-write; their steps are redone", file=sys.stderr, flush=True)
        path.write_text("".join(l + "\n" for l in kept))

    def write(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
