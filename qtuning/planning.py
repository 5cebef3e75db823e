"""What an arm will do before it trains: its pruning plan, a static arm's selection, the tokens its rule prunes.

- `pruning_plan(cfg, scores)`: what an arm will do, in numbers (pool, K, steps, the base model's quadrants).
- `static_selection(scores, pruning)`: a static arm's kept rows, triaged once on the whole set with the base
  model's EU scores; `write_ids(...)` writes their sample ids and `static_experiment(...)` is the run that trains
  on the same tokenized set narrowed to them (`data.subset`), with the micro-batch rule the arm states.
- `token_view(...)`: which response tokens the arm's token rule prunes in a few samples, for the HTML view.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qtuning.config import FULL_DATA, SCORE_CHUNK_TOKENS, ExperimentConfig, PruningConfig
from qtuning.pruning import prune_tokens
from qtuning.rules import Selection
from qtuning.triage import keep_count
from qtuning.report import eu_thresholds, eu_triage, quadrant_shares


def pruning_plan(cfg: ExperimentConfig, scores: pd.DataFrame | None, mode: str = "dynamic", world: int = 1) -> dict[str, Any]:
    """The plan of one arm: rules, budgets, optimizer steps, and where the base model puts the data."""
    from qtuning.train import plan_steps

    p, n = cfg.pruning, (len(scores) if scores is not None else None)
    plan: dict[str, Any] = {
        "arm": cfg.name,
        "mode": mode,
        "sample_rule": p.sample,
        "token_rule": p.token,
        "sample_ratio": p.sample_ratio,
        "token_ratio": p.token_ratio,
        "lam": p.lam,
        "token_budget": p.token_budget,
        "budget": p.budget,
        "pool_size": cfg.pool_size,
        "kept_per_pool": cfg.pool_size if p.sample == "all" else keep_count(cfg.pool_size, p.sample_ratio),
        "train_on": p.train_on,
        "rows": n,
    }
    if n:
        pools_per_epoch, total_pools, steps = plan_steps(n, cfg, world)
        plan.update(pools_per_epoch=pools_per_epoch, total_pools=total_pools, optimizer_steps=steps)
    if scores is not None and p.sample == "qtuning":
        t = eu_triage(scores, p.sample_ratio, p.bisect_iters, p.bisect_tol)
        shares = quadrant_shares(t)
        plan["base_model_quadrants"] = shares
        plan["base_model_thresholds"] = eu_thresholds(scores, t.alpha)
        # loss tokens a pruned arm keeps of the response tokens, if every pool looked like the whole set
        resp = scores["response_length"].to_numpy(dtype=float)
        kept_q2 = t.keep & t.q2  # token-pruned rows, fill-ins that count as Q2 included
        kept_tokens = np.ceil(p.token_ratio * resp[kept_q2] - 1e-9).sum() + resp[t.keep & ~kept_q2].sum()
        if p.token == "all" or p.token_ratio >= 1.0:
            kept_tokens = resp[t.keep].sum()
        plan["expected_loss_token_share"] = float(kept_tokens / max(resp.sum(), 1.0))
    return plan


# --------------------------------------------------------------------------- static pruning
def static_selection(scores: pd.DataFrame, pruning: PruningConfig) -> pd.DataFrame:
    """Triage the whole scored set once at `pruning.sample_ratio`: sample_id, quadrant (geometric, before fill-in),
    filled (added by the fill-in), keep, q2 (kept and counted as Q2)."""
    t = eu_triage(scores, pruning.sample_ratio, pruning.bisect_iters, pruning.bisect_tol)
    return pd.DataFrame({"sample_id": scores["sample_id"].to_numpy(), "quadrant": t.quadrant, "filled": t.fill_in,
                         "keep": t.keep, "q2": t.q2})


def write_ids(sample_ids: list[str], path: Path) -> Path:
    """One sample id per line (the format `data.subset` reads)."""
    path.write_text("".join(f"{sid}\n" for sid in sample_ids), encoding="utf-8")
    return path


def static_experiment(cfg: ExperimentConfig, ids_path: Path, batch: str = "scaled") -> ExperimentConfig:
    """The run a static arm trains: the same tokenized set narrowed to its kept ids (`data.subset`), rows whole (no
    further pruning), with the arm's batch rule (`ArmConfig.static_batch`): 'scaled' trains round(pool x sample_ratio)
    rows per optimizer step, so the arm takes the full-data arm's number of steps and trains as many rows as a
    dynamic arm; 'same' keeps the configured pool and micro-batch (fewer optimizer steps)."""
    t = cfg.training
    raw = cfg.model_dump(mode="json")
    raw["data"] = {**raw["data"], "subset": str(ids_path)}
    raw["pruning"] = {**raw["pruning"], **FULL_DATA, "token_budget": "per_sample"}
    if batch == "scaled":
        rows_per_step = keep_count(cfg.pool_size, cfg.pruning.sample_ratio)
        micro = min(t.micro_batch_size, rows_per_step)
        raw["training"] = {**raw["training"], "micro_batch_size": micro}
        raw["pruning"]["selection_batch_size"] = rows_per_step if rows_per_step > micro else None
    return ExperimentConfig.model_validate(raw)


# --------------------------------------------------------------------------- pruned tokens of a few samples
def token_view(
    model,
    tokenizer,
    dataset,
    scores: pd.DataFrame,
    pruning: PruningConfig,
    n_samples: int = 4,
    chunk_tokens: int = SCORE_CHUNK_TOKENS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Prompt, kept and pruned tokens of up to `n_samples` rows under the arm's token rule, scored by `model`.

    Rows: the Q2 rows of the whole-set triage for sample rule qtuning (the rows Q-Tuning token-prunes), else
    the first rows. Each row keeps ceil(token_ratio * T) of its T response tokens (the per_sample budget;
    a batch_global arm's budget depends on its pools and is shown per row).
    """
    import torch

    from qtuning.data import collate
    from qtuning.scoring import IGNORE, score_tokens

    if pruning.token == "all" or n_samples == 0:
        return []
    order = {sid: i for i, sid in enumerate(dataset["sample_id"])}
    t = eu_triage(scores, pruning.sample_ratio, pruning.bisect_iters, pruning.bisect_tol) if pruning.sample == "qtuning" else None
    if t is not None:
        candidates = scores["sample_id"].to_numpy()[t.q2]
        quadrant = dict(zip(scores["sample_id"], t.role))  # as treated: a fill-in shows as the Q2 it counts as
    else:
        candidates, quadrant = scores["sample_id"].to_numpy(), {}
    picked = [sid for sid in candidates if sid in order][:n_samples]
    if not picked:
        return []
    idx = [order[sid] for sid in picked]
    rows = dataset.select(idx)
    batch = collate(list(rows["input_ids"]), list(rows["labels"]), tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sc = score_tokens(
        model, batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device),
        entropy_scope=pruning.entropy_scope, chunk_tokens=chunk_tokens,
    )
    model.train(was_training)
    every = torch.ones(len(idx), dtype=torch.bool)
    sel = Selection(keep=every, prune_tokens=every.clone(), weight=torch.ones(len(idx)))
    view_cfg = pruning.model_copy(update={"token_budget": "per_sample"})
    gen = torch.Generator().manual_seed(seed)
    pruned = prune_tokens(batch.labels.to(device), sc.nll, batch.attention_mask.to(device), sel, view_cfg, gen).cpu()
    nll, ppl_rows, ent_rows = sc.nll.cpu(), sc.sample_ppl().cpu().tolist(), sc.sample_ent().cpu().tolist()
    response = sc.response_mask.cpu()
    out = []
    for r, sid in enumerate(picked):
        length = int(batch.attention_mask[r].sum())
        ids = batch.input_ids[r, :length].tolist()
        roles, token_ppl = [], []
        for pos in range(length):
            if not bool(response[r, pos]):
                roles.append("prompt")
                token_ppl.append(None)
            else:
                roles.append("pruned" if int(pruned[r, pos]) == IGNORE else "kept")
                token_ppl.append(float(math.exp(min(float(nll[r, pos]), 80.0))))
        out.append(
            {
                "sample_id": sid,
                "tokens": [tokenizer.decode([i]) for i in ids],
                "roles": roles,
                "token_ppl": token_ppl,
                "ppl": ppl_rows[r],
                "ent": ent_rows[r],
                "quadrant": int(quadrant.get(sid, 0)),
            }
        )
    return out
