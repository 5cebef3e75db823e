"""The registry of pruning rules: which samples of a pool train (sample rules), which tokens carry loss (token rules).

This registry is the only list of rule names: `qtuning.config` builds its `pruning.sample` and
`pruning.token` choices from it, and `PruningConfig.needs_scores` reads each rule's `needs_scores`.
Sample and token rules compose freely, like the rows of the paper's tables; Q-Tuning is the pair
(qtuning, qtuning). Every sample rule keeps K = max(1, round(b * r_s)) rows of a pool of b (the quadrant
triage may keep a few more, as the spec says; published InfoBatch keeps a random number), so every method
gets its budget once, on the same pools and the same number of optimizer steps. With `pruning.budget:
equal_tokens` the token stage also gives every rule the loss tokens Q-Tuning would train (qtuning.pruning).

Adding a rule is one function:

    @sample_rule("shortest", needs_scores=False)
    def _shortest(pool: PoolStats, ratio: float, cfg, gen) -> Selection:
        "The shortest examples."
        return Selection.top_k(-pool.lengths.float(), keep_count(pool.size, ratio))

    @token_rule("last", needs_scores=False)
    def _last(nll, response_mask, cfg, gen):
        "Drop the earliest response tokens first (a drop priority per token: the highest go)."
        return -torch.arange(nll.shape[1], device=nll.device).expand_as(nll).float()

The config module imports this one to validate names, so it loads without torch: the rule bodies import
torch when they run (a pool is triaged on CPU tensors of a few dozen rows; the cost is one dict lookup).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qtuning.triage import keep_count, triage

if TYPE_CHECKING:  # annotations only: importing torch here would make every config load pay for it
    import torch
    from torch import Tensor

    from qtuning.config import PruningConfig


# --------------------------------------------------------------------------- what a rule sees and returns
@dataclass
class PoolStats:
    """What a sample rule may look at, for one pool of b samples (tensors on CPU)."""

    lengths: Tensor  # (b,) real tokens per row
    response_lengths: Tensor  # (b,) label tokens per row
    ppl: Tensor | None = None  # (b,) sample perplexity; None when the rule set needs no scoring
    ent: Tensor | None = None  # (b,) sample entropy
    # What the training loop knows beyond the pool (InfoBatch as published): the mean over the data set of each
    # sample's loss when last seen (None: nothing seen yet), and whether this step is in the annealing phase.
    threshold: float | None = None
    anneal: bool = False

    @property
    def size(self) -> int:
        return len(self.lengths)

    def subset(self, rows: Tensor) -> PoolStats:
        """The stats of the rows in `rows` (bool (b,)), in pool order."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return PoolStats(self.lengths[rows], self.response_lengths[rows], pick(self.ppl), pick(self.ent),
                         self.threshold, self.anneal)


@dataclass
class Selection:
    """The outcome of stage 1 for one pool."""

    keep: Tensor  # (b,) bool
    prune_tokens: Tensor  # (b,) bool, rows the token rule may prune
    weight: Tensor  # (b,) float, per-row loss weight (1 but for InfoBatch)
    quadrant: Tensor = field(default=None)  # (b,) int 0..4: geometric quadrant before fill-in; zeros if no triage
    alpha: float = float("nan")
    filled: int = 0  # rows the triage's fill-in added
    fill_in: Tensor = field(default=None)  # (b,) bool, those rows (all False without triage)
    ppl: Tensor | None = None  # (b,) the sample scores the pool was judged on (set by qtuning.pruning.prune_pool;
    ent: Tensor | None = None  # None when no rule scored): what the selection log records

    def __post_init__(self):
        import torch

        if self.quadrant is None:
            self.quadrant = torch.zeros(len(self.keep), dtype=torch.long)
        if self.fill_in is None:
            self.fill_in = torch.zeros(len(self.keep), dtype=torch.bool)

    @classmethod
    def from_mask(cls, keep: Tensor) -> Selection:
        """Rows in `keep` train whole-sample; the token rule may prune all of them."""
        import torch

        return cls(keep=keep, prune_tokens=keep.clone(), weight=torch.ones(len(keep)))

    @classmethod
    def top_k(cls, score: Tensor, k: int) -> Selection:
        import torch

        keep = torch.zeros(len(score), dtype=torch.bool)
        keep[torch.argsort(score, descending=True, stable=True)[:k]] = True
        return cls.from_mask(keep)

    def scatter(self, rows: Tensor, size: int) -> Selection:
        """This selection of a sub-pool (`rows`: bool (size,)) as a selection of the whole pool: other rows dropped."""
        import torch

        def put(x: Tensor, fill) -> Tensor:
            out = torch.full((size,), fill, dtype=x.dtype)
            out[rows] = x
            return out

        return Selection(
            keep=put(self.keep, False), prune_tokens=put(self.prune_tokens, False), weight=put(self.weight, 0),
            quadrant=put(self.quadrant, 0), alpha=self.alpha, filled=self.filled, fill_in=put(self.fill_in, False),
        )


# --------------------------------------------------------------------------- the registry
SampleFn = Callable[["PoolStats", float, "PruningConfig", "torch.Generator"], Selection]
# A token rule gives a drop priority per token, (b, T) from the token NLLs and the response mask: the highest go.
DropScoreFn = Callable[["Tensor", "Tensor", "PruningConfig", "torch.Generator"], "Tensor"]


@dataclass(frozen=True)
class Rule:
    """A registered rule: its function, whether it needs the scoring forward, and its one-line description."""

    name: str
    fn: Callable[..., Any] | None
    needs_scores: bool
    doc: str


SAMPLE_RULES: dict[str, Rule] = {}
TOKEN_RULES: dict[str, Rule] = {}


def _register(table: dict[str, Rule], name: str, needs_scores: bool):
    def register(fn):
        if name in table:
            raise ValueError(f"rule {name!r} is registered twice")
        doc = (fn.__doc__ or name).strip().splitlines()[0]
        table[name] = Rule(name, fn, needs_scores, doc)
        return fn

    return register


def sample_rule(name: str, *, needs_scores: bool):
    """Register `fn(pool: PoolStats, ratio, cfg, gen) -> Selection` as sample rule `name`."""
    return _register(SAMPLE_RULES, name, needs_scores)


def token_rule(name: str, *, needs_scores: bool):
    """Register `fn(nll, response_mask, cfg, gen) -> drop priority (b, T)` as token rule `name`."""
    return _register(TOKEN_RULES, name, needs_scores)


def describe(table: dict[str, Rule]) -> str:
    """'name: description; ...' for config field descriptions and error messages."""
    return "; ".join(f"{r.name}: {r.doc.rstrip('.')}" for r in table.values())


# --------------------------------------------------------------------------- sample rules (stage 1)
@sample_rule("all", needs_scores=False)
def _all(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """Keep every row (full-data SFT)."""
    import torch

    return Selection.from_mask(torch.ones(pool.size, dtype=torch.bool))


@sample_rule("random", needs_scores=False)
def _random(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """K rows at random."""
    import torch

    return Selection.top_k(torch.rand(pool.size, generator=gen), keep_count(pool.size, ratio))


@sample_rule("longest", needs_scores=False)
def _longest(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """The longest examples, prompt and response (not the shortest prompts of the official baseline)."""
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
    """InfoBatch as published: rows below the data set's mean loss kept with probability r_s and weighted 1/r_s, the rest kept; the last steps (pruning.anneal) train every row.

    Qin et al., ICLR 2024. InfoBatch keeps each sample's loss from its last visit and prunes against their mean
    over the data set; here the training loop keeps that table (every row a pool scores updates its entry) and
    passes its mean as `pool.threshold` (None on the very first pool: the pool's own mean stands in). Each row
    below the threshold is dropped with the prune probability r = 1 - r_s; a survivor's loss is weighted
    1 / (1 - r) = 1 / r_s; rows at or above it train with weight 1, so the weighted loss is an unbiased
    estimate of the whole pool's. In the annealing phase (`pool.anneal`: the last `pruning.anneal` share of
    the optimizer steps, 12.5% in InfoBatch's code) every row trains with weight 1. The number of kept rows is
    random and usually above K = round(b * r_s): `prune/kept_samples` reports it. `infobatch_pool` is the
    pool-local variant, `infobatch_fixed` the one with exactly K rows.
    """
    import torch

    if pool.anneal:
        every = torch.ones(pool.size, dtype=torch.bool)
        return Selection(keep=every, prune_tokens=every.clone(), weight=torch.ones(pool.size))
    loss = torch.log(pool.ppl)
    threshold = loss.mean() if pool.threshold is None else pool.threshold
    return _infobatch_below(loss, threshold, ratio, gen)


@sample_rule("infobatch_pool", needs_scores=True)
def _infobatch_pool(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """InfoBatch on the pool alone: the threshold is the pool's mean loss, and no annealing phase.

    qtuning's `infobatch` before issue 17: every row is scored fresh by the current model, and the pool's own
    mean stands in for the data set's mean of last-seen losses. Rows below it are kept with probability r_s and
    weighted 1 / r_s; the rest train with weight 1.
    """
    import torch

    loss = torch.log(pool.ppl)
    return _infobatch_below(loss, loss.mean(), ratio, gen)


def _infobatch_below(loss: Tensor, threshold, ratio: float, gen: torch.Generator) -> Selection:
    """Rows with loss below `threshold` kept with probability `ratio` and weighted 1 / ratio; the others kept."""
    import torch

    low = loss < threshold
    survive = torch.rand(len(loss), generator=gen) < ratio
    keep = ~low | survive
    weight = torch.where(low, 1.0 / ratio, 1.0) * keep
    return Selection(keep=keep, prune_tokens=keep.clone(), weight=weight)


@sample_rule("infobatch_fixed", needs_scores=True)
def _infobatch_fixed(pool: PoolStats, ratio: float, cfg: PruningConfig, gen: torch.Generator) -> Selection:
    """InfoBatch at a fixed budget of K rows: rows at or above the pool's mean loss first, low-loss rows at random.

    On the loss the scoring pass just measured: rows whose loss is at least the pool mean are kept first (at
    random if they exceed K); the remaining slots go to low-loss rows at random. Each kept row is weighted
    1 / its survival probability. At b = 8 and r_s <= 0.5 the usual case is n_high >= K: no low-loss row is
    kept, every weight is the same and cancels in the weighted denominator, so in effect this is "K random
    rows among those above the pool's mean loss". It is not an unbiased estimate of the whole pool's
    gradient; `infobatch` is the published rule. (This is the `infobatch` of qtuning before issue 10.)
    """
    import torch

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
    """Quadrant triage on the EU plane: keep Q2 and Q4; only misconception rows (Q2) are token-pruned."""
    import torch

    t = triage(pool.ppl.numpy(), pool.ent.numpy(), ratio, iters=cfg.bisect_iters, tol=cfg.bisect_tol)
    keep = torch.from_numpy(t.keep)
    return Selection(
        keep=keep,
        prune_tokens=torch.from_numpy(t.q2),
        weight=keep.float(),
        quadrant=torch.from_numpy(t.quadrant),
        alpha=t.alpha,
        filled=t.filled,
        fill_in=torch.from_numpy(t.fill_in),
    )


# --------------------------------------------------------------------------- token rules (stage 2)
MAX_NLL = 80.0  # exp(80) ~ 5e34 still fits fp32; larger NLLs would make token perplexities inf
TOKEN_RULES["all"] = Rule("all", None, False, "No token pruning")


def context_scores(nll: Tensor, response_mask: Tensor, lam: float) -> Tensor:
    """s_i = (1 - lam) * ppl_i + lam * (ppl_{i-1} + ppl_{i+1}); neighbours off the response count 0."""
    import torch

    ppl = torch.exp(nll.clamp(max=MAX_NLL)) * response_mask  # (B, T)
    left = torch.nn.functional.pad(ppl[:, :-1], (1, 0))  # ppl_{i-1}
    right = torch.nn.functional.pad(ppl[:, 1:], (0, 1))  # ppl_{i+1}
    return (1 - lam) * ppl + lam * (left + right)


@token_rule("qtuning", needs_scores=True)
def _qtuning_tokens(nll: Tensor, response_mask: Tensor, cfg: PruningConfig, gen: torch.Generator) -> Tensor:
    """Drop the tokens with the highest context-aware perplexity (surprising together with their neighbours)."""
    return context_scores(nll, response_mask, cfg.lam)


@token_rule("ppl", needs_scores=True)
def _ppl_tokens(nll: Tensor, response_mask: Tensor, cfg: PruningConfig, gen: torch.Generator) -> Tensor:
    """Keep the highest-loss tokens (Rho-1 style, reference-free)."""
    return -nll


@token_rule("random", needs_scores=False)
def _random_tokens(nll: Tensor, response_mask: Tensor, cfg: PruningConfig, gen: torch.Generator) -> Tensor:
    """Drop tokens at random."""
    import torch

    return torch.rand(nll.shape, generator=gen).to(nll.device)
