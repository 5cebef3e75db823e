"""Stages 1 and 2 of the pruning on one pool: the sample rule (with non-finite scores handled), then the token rule
applied to the loss mask under the configured budget.

Which rows may lose tokens comes from stage 1 (`Selection.prune_tokens`: the Q2 rows of Q-Tuning, every
kept row of the other sample rules); which tokens go first comes from the token rule's drop priority
(`qtuning.rules.TOKEN_RULES`); how many go is the budget (`pruning.token_budget`, and `pruning.budget:
equal_tokens`, which gives any rule the loss tokens Q-Tuning would train on the same pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qtuning.config import PruningConfig
from qtuning.data import IGNORE_INDEX as IGNORE
from qtuning.rules import SAMPLE_RULES, TOKEN_RULES, PoolStats, Selection


class NonFiniteScores(ValueError):
    """Sample scores (PPL or Ent) that are NaN or infinite; `rows` are their positions in the pool."""

    def __init__(self, rows: list[int], ppl: list[float], ent: list[float]):
        self.rows, self.ppl, self.ent = rows, ppl, ent
        super().__init__(self.describe([f"pool row {r}" for r in rows]))

    def with_names(self, names: list[str]) -> NonFiniteScores:
        """The same error, naming the samples (e.g. their sample ids) instead of their pool rows."""
        self.names = names
        self.args = (self.describe(names),)
        return self

    def describe(self, names: list[str]) -> str:
        shown = ", ".join(f"{n} (ppl={p}, ent={e})" for n, p, e in zip(names[:10], self.ppl, self.ent))
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        return (
            f"non-finite EU scores for {len(names)} sample(s): {shown}{more}; every quantile comparison would be "
            "false and the triage would keep arbitrary rows. Check these samples (empty or degenerate responses, "
            "a diverged model), or set pruning.on_nonfinite: exclude to leave such rows out of the pool and count them"
        )


@dataclass
class PoolDecision:
    """What stages 1 and 2 decided for one pool."""

    sel: Selection
    labels: Tensor  # (b, T) the pool's labels with pruned response tokens set to IGNORE (dropped rows untouched)
    excluded: int = 0  # rows left out for non-finite scores (pruning.on_nonfinite: exclude)
    budget_tokens: int | None = None  # pruning.budget: equal_tokens: the loss tokens Q-Tuning would train here


def select_samples(stats: PoolStats, cfg: PruningConfig, gen: torch.Generator | None) -> tuple[Selection, int]:
    """Stage 1: the sample rule on the pool; rows with non-finite scores stop the run or are left out (and counted)."""
    rule = SAMPLE_RULES[cfg.sample].fn
    if stats.ppl is None:
        return rule(stats, cfg.sample_ratio, cfg, gen), 0
    finite = torch.isfinite(stats.ppl) & torch.isfinite(stats.ent)
    if bool(finite.all()):
        return rule(stats, cfg.sample_ratio, cfg, gen), 0
    bad = (~finite).nonzero().flatten()
    if cfg.on_nonfinite == "error":
        raise NonFiniteScores(bad.tolist(), stats.ppl[bad].tolist(), stats.ent[bad].tolist())
    if not bool(finite.any()):  # nothing left to select from: the pool trains nothing (the step may be skipped)
        none = torch.zeros(stats.size, dtype=torch.bool)
        return Selection(keep=none, prune_tokens=none.clone(), weight=torch.zeros(stats.size)), stats.size
    return rule(stats.subset(finite), cfg.sample_ratio, cfg, gen).scatter(finite, stats.size), len(bad)


def qtuning_loss_tokens(stats: PoolStats, labels: Tensor, nll: Tensor, attention_mask: Tensor, cfg: PruningConfig) -> int:
    """Loss tokens Q-Tuning (sample and token rule qtuning, same r_s, r_t, lambda and token_budget) trains on this pool.

    Triage and the context-aware token score use no randomness, so no generator is drawn from.
    """
    shadow = cfg.model_copy(update={"sample": "qtuning", "token": "qtuning", "budget": "own"})
    sel, _ = select_samples(stats, shadow, None)
    pruned = prune_tokens(labels, nll, attention_mask, sel, shadow, None)
    return int(((pruned[:, 1:] != IGNORE) & sel.keep.to(labels.device)[:, None]).sum())


def prune_pool(
    stats: PoolStats,
    labels: Tensor,  # (b, T)
    nll: Tensor | None,  # (b, T) fp32, or None when no rule needs scores
    attention_mask: Tensor,  # (b, T)
    cfg: PruningConfig,
    gen: torch.Generator,
) -> PoolDecision:
    """Stages 1 and 2 for one pool: which rows train, with which loss weight, and which of their tokens carry loss."""
    sel, excluded = select_samples(stats, cfg, gen)
    sel.ppl, sel.ent = stats.ppl, stats.ent  # (b,) or None: kept with the decision for the selection log
    budget = None
    if cfg.budget == "equal_tokens":
        budget = qtuning_loss_tokens(stats, labels, nll, attention_mask, cfg)
    # Q-Tuning itself meets its own count by its own budget (per_sample stays per sample)
    is_qtuning = cfg.sample == "qtuning" and cfg.token == "qtuning"
    labels = prune_tokens(labels, nll, attention_mask, sel, cfg, gen, budget_tokens=None if is_qtuning else budget)
    return PoolDecision(sel, labels, excluded, budget)


def prune_tokens(
    labels: Tensor,  # (b, T)
    nll: Tensor | None,  # (b, T) fp32, or None for rules that need no scores
    attention_mask: Tensor,  # (b, T)
    sel: Selection,
    cfg: PruningConfig,
    gen: torch.Generator | None,
    budget_tokens: int | None = None,
) -> Tensor:
    """Stage 2: labels with the pruned response tokens of `sel.prune_tokens` rows set to IGNORE.

    Pruned tokens leave the loss only; they stay in input_ids and the attention
    mask, so later tokens keep their context. At token_ratio 1.0 a rule's own
    budget prunes nothing (the authors' code skips token pruning at r_t = 1).
    `budget_tokens` (pruning.budget: equal_tokens): the kept rows train at most
    this many loss tokens, at any token_ratio (at r_t = 1 too: Q-Tuning's rows
    may hold fewer tokens than a baseline's); the surplus goes by one top-k of the
    drop priority over the pool's candidate tokens.
    """
    score_fn = TOKEN_RULES[cfg.token].fn
    if score_fn is None or (cfg.token_ratio >= 1.0 and budget_tokens is None):
        return labels
    response = labels != IGNORE
    response[:, 0] = False
    candidates = response & sel.prune_tokens.to(labels.device)[:, None]  # (b, T)
    if nll is None:
        nll = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    drop_score = score_fn(nll, response, cfg, gen).masked_fill(~candidates, -torch.inf)

    if budget_tokens is not None:  # equal_tokens: what the kept rows would train, less Q-Tuning's count
        trained = int((response & sel.keep.to(labels.device)[:, None]).sum())
        n_drop = max(0, min(trained - budget_tokens, int(candidates.sum())))
        drop = _top(drop_score, candidates, n_drop)
    elif cfg.token_budget == "per_sample":
        n_resp = candidates.sum(1)  # (b,)
        n_drop = n_resp - torch.ceil(cfg.token_ratio * n_resp - 1e-9).long()  # ceil(r_t T) kept
        order = torch.argsort(drop_score, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        drop = candidates & (rank < n_drop[:, None])
    else:  # batch_global: the pool keeps round(N * r_s * r_t) of its N real tokens
        real = attention_mask.bool()
        n_real = int(real.sum())
        already = int((real & ~sel.keep.to(real.device)[:, None]).sum())
        n_drop = n_real - round(n_real * cfg.sample_ratio * cfg.token_ratio) - already
        n_drop = max(0, min(n_drop, int(candidates.sum())))
        drop = _top(drop_score, candidates, n_drop)
    return labels.masked_fill(drop, IGNORE)


def _top(drop_score: Tensor, candidates: Tensor, n_drop: int) -> Tensor:
    """(b, T) bool: the `n_drop` candidate tokens of highest drop priority across the whole pool."""
    drop = torch.zeros_like(candidates)
    if n_drop:
        flat = torch.argsort(drop_score.flatten(), descending=True, stable=True)[:n_drop]
        drop.view(-1)[flat] = True
    return drop
