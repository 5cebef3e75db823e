"""Two-stage pruning: which samples of a pool train (stage 1), which of their tokens carry loss (stage 2).

Stage 1 rules (`SAMPLE_RULES`) and stage 2 rules (`TOKEN_RULES`) compose freely,
like the rows of the paper's tables; Q-Tuning is the pair (qtuning, qtuning).
Every sample rule keeps K = max(1, round(b * r_s)) rows of a pool of b (the
quadrant triage may keep a few more, as the spec says), so every method gets its
budget once, on the same pools and the same number of optimizer steps.

Adding a rule is one function and one registry line:

    @sample_rule("shortest", needs_scores=False)
    def _shortest(pool: PoolStats, ratio: float, cfg, gen) -> Selection:
        return Selection.top_k(-pool.lengths.float(), keep_count(pool.size, ratio))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from qtuning.config import PruningConfig, keep_count
from qtuning.data import IGNORE_INDEX as IGNORE
from qtuning.scoring import MAX_NLL

# Quadrant codes of the EU plane. 0: between the thresholds, in no quadrant.
Q1_NOISE, Q2_MISCONCEPTION, Q3_MASTERED, Q4_CALIBRATION = 1, 2, 3, 4


# --------------------------------------------------------------------------- stage 1
@dataclass
class Triage:
    """Quadrant triage of one pool (numpy, on CPU: b is small)."""

    keep: np.ndarray  # (b,) bool
    q2: np.ndarray  # (b,) bool, kept rows whose tokens are pruned (Q2 and Q2-like fill-ins)
    quadrant: np.ndarray  # (b,) int, 1..4 or 0; fill-ins carry the quadrant they count as
    alpha: float  # alpha = beta reached by the bisection
    filled: int  # rows added by the fill-in rule


def _quadrants(ppl: np.ndarray, ent: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    beta = alpha
    q2 = (ppl > np.quantile(ppl, 1 - alpha)) & (ent <= np.quantile(ent, beta))
    q4 = (ppl <= np.quantile(ppl, alpha)) & (ent > np.quantile(ent, 1 - beta))
    q1 = (ppl > np.quantile(ppl, 1 - alpha)) & (ent > np.quantile(ent, 1 - beta))
    q3 = (ppl <= np.quantile(ppl, alpha)) & (ent <= np.quantile(ent, beta))
    return q1, q2, q3, q4


def triage(ppl, ent, ratio: float, *, iters: int = 10, tol: float = 0.01) -> Triage:
    """Stage 1 of Q-Tuning: keep the misconception (Q2) and calibration (Q4) quadrants.

    alpha = beta is bisected in [0, 0.49] until the kept share is within `tol` of
    `ratio` (at most `iters` steps; the last masks are used). If fewer than
    K = max(1, round(b * ratio)) are kept, the rest is filled with the samples
    furthest from the diagonal of the min-max normalised plane; a kept set larger
    than K is not cut.
    """
    ppl = np.asarray(ppl, dtype=np.float64)
    ent = np.asarray(ent, dtype=np.float64)
    b = len(ppl)
    lo, hi = 0.0, 0.49
    for _ in range(iters):
        alpha = (lo + hi) / 2
        q1, q2, q3, q4 = _quadrants(ppl, ent, alpha)
        share = (q2 | q4).sum() / b
        if abs(share - ratio) <= tol:
            break
        lo, hi = (alpha, hi) if share < ratio else (lo, alpha)

    quadrant = np.zeros(b, dtype=np.int64)
    for code, mask in ((Q1_NOISE, q1), (Q3_MASTERED, q3), (Q2_MISCONCEPTION, q2), (Q4_CALIBRATION, q4)):
        quadrant[mask] = code
    keep = q2 | q4
    k = keep_count(b, ratio)
    filled = 0
    if keep.sum() < k:
        ppl_n = _minmax(ppl)
        ent_n = _minmax(ent)
        gap = np.abs(ppl_n - ent_n)
        gap[keep] = -np.inf
        order = np.argsort(-gap, kind="stable")
        for i in order[: k - keep.sum()]:
            keep[i] = True
            quadrant[i] = Q2_MISCONCEPTION if ppl_n[i] >= ent_n[i] else Q4_CALIBRATION
            filled += 1
    q2_rows = keep & (quadrant == Q2_MISCONCEPTION)
    return Triage(keep=keep, q2=q2_rows, quadrant=quadrant, alpha=float(alpha), filled=filled)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


@dataclass
class PoolStats:
    """What a sample rule may look at, for one pool of b samples (tensors on CPU)."""

    lengths: Tensor  # (b,) real tokens per row
    response_lengths: Tensor  # (b,) label tokens per row
    ppl: Tensor | None = None  # (b,) sample perplexity; None when the rule set needs no scoring
    ent: Tensor | None = None  # (b,) sample entropy

    @property
    def size(self) -> int:
        return len(self.lengths)


@dataclass
class Selection:
    """The outcome of stage 1 for one pool."""

    keep: Tensor  # (b,) bool
    prune_tokens: Tensor  # (b,) bool, rows the token rule may prune
    weight: Tensor  # (b,) float, per-row loss weight (1 but for InfoBatch)
    quadrant: Tensor = field(default=None)  # (b,) int 0..4, zeros when the rule does not triage
    alpha: float = float("nan")
    filled: int = 0

    def __post_init__(self):
        if self.quadrant is None:
            self.quadrant = torch.zeros(len(self.keep), dtype=torch.long)

    @classmethod
    def from_mask(cls, keep: Tensor) -> Selection:
        """Rows in `keep` train whole-sample; the token rule may prune all of them."""
        return cls(keep=keep, prune_tokens=keep.clone(), weight=torch.ones(len(keep)))

    @classmethod
    def top_k(cls, score: Tensor, k: int) -> Selection:
        keep = torch.zeros(len(score), dtype=torch.bool)
        keep[torch.argsort(score, descending=True, stable=True)[:k]] = True
        return cls.from_mask(keep)


SampleFn = Callable[[PoolStats, float, PruningConfig, torch.Generator], Selection]


@dataclass(frozen=True)
class SampleRule:
    fn: SampleFn
    needs_scores: bool


SAMPLE_RULES: dict[str, SampleRule] = {}


def sample_rule(name: str, *, needs_scores: bool):
    def register(fn: SampleFn) -> SampleFn:
        SAMPLE_RULES[name] = SampleRule(fn, needs_scores)
        return fn

    return register


@sample_rule("all", needs_scores=False)
def _all(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    return Selection.from_mask(torch.ones(pool.size, dtype=torch.bool))


@sample_rule("random", needs_scores=False)
def _random(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    return Selection.top_k(torch.rand(pool.size, generator=gen), keep_count(pool.size, ratio))


@sample_rule("longest", needs_scores=False)
def _longest(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """The longest examples (prompt and response), not the shortest prompts of the official baseline."""
    return Selection.top_k(pool.lengths.float(), keep_count(pool.size, ratio))


@sample_rule("ppl", needs_scores=True)
def _ppl(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """Highest perplexity under the current model."""
    return Selection.top_k(pool.ppl, keep_count(pool.size, ratio))


@sample_rule("entropy", needs_scores=True)
def _entropy(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """Highest mean predictive entropy of the model (not the prompt's character entropy)."""
    return Selection.top_k(pool.ent, keep_count(pool.size, ratio))


@sample_rule("infobatch", needs_scores=True)
def _infobatch(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """InfoBatch (Qin et al. 2024) at a fixed budget, on the loss the scoring pass just measured.

    Rows whose loss is at least the pool mean are kept first (at random if they
    exceed K); the remaining slots go to low-loss rows at random. Each kept row's
    loss is scaled by 1 / its survival probability, so the expected gradient is
    that of the whole pool.
    """
    k = keep_count(pool.size, ratio)
    loss = torch.log(pool.ppl)
    high = loss >= loss.mean()
    r = torch.rand(pool.size, generator=gen)
    # high-loss rows first (priority +1), random order within each group
    keep = torch.zeros(pool.size, dtype=torch.bool)
    keep[torch.argsort(r + high.float(), descending=True, stable=True)[:k]] = True
    n_high, n_low = int(high.sum()), int((~high).sum())
    p_high = min(1.0, k / n_high) if n_high else 1.0
    p_low = max(0, k - n_high) / n_low if n_low else 1.0
    weight = torch.where(high, 1.0 / p_high, 1.0 / max(p_low, 1e-12)) * keep
    return Selection(keep=keep, prune_tokens=keep.clone(), weight=weight)


@sample_rule("qtuning", needs_scores=True)
def _qtuning(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """Quadrant triage on the EU plane; only misconception rows (Q2) are token-pruned."""
    t = triage(pool.ppl.numpy(), pool.ent.numpy(), ratio, iters=cfg.bisect_iters, tol=cfg.bisect_tol)
    keep = torch.from_numpy(t.keep)
    return Selection(
        keep=keep,
        prune_tokens=torch.from_numpy(t.q2),
        weight=keep.float(),
        quadrant=torch.from_numpy(t.quadrant),
        alpha=t.alpha,
        filled=t.filled,
    )


# --------------------------------------------------------------------------- stage 2
def context_scores(nll: Tensor, response_mask: Tensor, lam: float) -> Tensor:
    """s_i = (1 - lam) * ppl_i + lam * (ppl_{i-1} + ppl_{i+1}); neighbours off the response count 0."""
    ppl = torch.exp(nll.clamp(max=MAX_NLL)) * response_mask  # (B, T)
    left = torch.nn.functional.pad(ppl[:, :-1], (1, 0))  # ppl_{i-1}
    right = torch.nn.functional.pad(ppl[:, 1:], (0, 1))  # ppl_{i+1}
    return (1 - lam) * ppl + lam * (left + right)


# A token rule gives a drop priority per token: the highest are removed first.
DropScoreFn = Callable[[Tensor, Tensor, PruningConfig, torch.Generator], Tensor]
TOKEN_RULES: dict[str, DropScoreFn | None] = {
    "all": None,  # no token pruning
    "qtuning": lambda nll, mask, cfg, gen: context_scores(nll, mask, cfg.lam),  # surprising in context: drop
    "ppl": lambda nll, mask, cfg, gen: -nll,  # keep the highest-loss tokens (Rho-1 style, reference-free)
    "random": lambda nll, mask, cfg, gen: torch.rand(nll.shape, generator=gen).to(nll.device),
}


def prune_tokens(
    labels: Tensor,  # (b, T)
    nll: Tensor | None,  # (b, T) fp32, or None for rules that need no scores
    attention_mask: Tensor,  # (b, T)
    sel: Selection,
    cfg: PruningConfig,
    gen: torch.Generator,
) -> Tensor:
    """Stage 2: labels with the pruned response tokens of `sel.prune_tokens` rows set to IGNORE.

    Pruned tokens leave the loss only; they stay in input_ids and the attention
    mask, so later tokens keep their context.
    """
    score_fn = TOKEN_RULES[cfg.token]
    if score_fn is None:
        return labels
    response = labels != IGNORE
    response[:, 0] = False
    candidates = response & sel.prune_tokens.to(labels.device)[:, None]  # (b, T)
    if nll is None:
        nll = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    drop_score = score_fn(nll, response, cfg, gen).masked_fill(~candidates, -torch.inf)

    if cfg.token_budget == "per_sample":
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
        drop = torch.zeros_like(candidates)
        if n_drop:
            flat = torch.argsort(drop_score.flatten(), descending=True, stable=True)[:n_drop]
            drop.view(-1)[flat] = True
    return labels.masked_fill(drop, IGNORE)


def per_sample_keep(n_tokens: int, ratio: float) -> int:
    return math.ceil(ratio * n_tokens - 1e-9)
