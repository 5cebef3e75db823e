"""Stage 2 of the pruning: the token rule of a pool's selected rows, applied to the loss mask.

Which rows may lose tokens comes from stage 1 (`Selection.prune_tokens`: the Q2 rows of Q-Tuning, every
kept row of the other sample rules); which tokens go first comes from the token rule's drop priority
(`qtuning.rules.TOKEN_RULES`); how many go is the budget (`pruning.token_budget`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtuning.config import PruningConfig
from qtuning.data import IGNORE_INDEX as IGNORE
from qtuning.rules import TOKEN_RULES, Selection


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
    score_fn = TOKEN_RULES[cfg.token].fn
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
