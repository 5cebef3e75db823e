"""Where a sample sits on the Error-Uncertainty plane: per-token NLL and predictive entropy.

One no-grad forward through the decoder (rows packed into lanes, no KV cache),
then the LM head applied in chunks of positions (qtuning.lm.ChunkedLM), so the
fp32 logits of a whole batch (B x T x V, 1.6 GB for 8 x 1024 x 49k) never exist
at once: a chunk of `chunk_tokens` positions costs about 2 x chunk_tokens x V x
4 bytes. Only the positions that are needed are sent through the head (response
targets, plus every real token for `entropy_scope: all`), which also skips the
padding.

Alignment: scores are indexed by the *target* position t, like `labels`:
`nll[b, t] = -log p(input_ids[b, t] | input_ids[b, :t])`, computed from the
hidden state at t - 1; `ent[b, t]` is the entropy of that same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from qtuning.config import PACK_TOKENS, SCORE_CHUNK_TOKENS
from qtuning.data import IGNORE_INDEX as IGNORE
from qtuning.lm import as_lm, build_lanes, lane_plan, lanes_forward, unpad

@dataclass
class TokenScores:
    nll: Tensor  # (B, T) fp32, 0 off the response
    ent: Tensor  # (B, T) fp32, 0 where not scored
    response_mask: Tensor  # (B, T) bool, targets that carry loss
    ent_mask: Tensor  # (B, T) bool, positions averaged into the sample entropy
    fed_tokens: int = 0  # positions the forward computed (lanes x width)
    real_tokens: int = 0  # of which real tokens (the rest is lane-tail padding)

    def sample_ppl(self) -> Tensor:
        """PPL = exp(mean NLL over response tokens), (B,)."""
        n = self.response_mask.sum(1).clamp(min=1)
        return torch.exp((self.nll * self.response_mask).sum(1) / n)

    def sample_ent(self) -> Tensor:
        """Ent = mean predictive entropy over `ent_mask` positions, in nats, (B,)."""
        n = self.ent_mask.sum(1).clamp(min=1)
        return (self.ent * self.ent_mask).sum(1) / n


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    input_ids: Tensor,  # (B, T)
    attention_mask: Tensor,  # (B, T), right padding
    labels: Tensor,  # (B, T), IGNORE off the response
    *,
    entropy_scope: Literal["response", "all"] = "response",
    chunk_tokens: int = SCORE_CHUNK_TOKENS,
    layout: Literal["packed", "padded"] = "packed",
    pack_tokens: int = PACK_TOKENS,
) -> TokenScores:
    """Token NLL and full-vocabulary entropy from one no-grad forward, chunked over positions.

    `model`: a causal LM, or the prepared (DDP/FSDP) `qtuning.lm.ChunkedLM` the loop trains; the forward runs
    through it, so sharded weights are gathered the way the training forward gathers them. The rows are laid out
    longest first (`layout`); a row's scores do not depend on its batch-mates.
    """
    B, T = input_ids.shape
    response_mask = labels != IGNORE
    response_mask[:, 0] = False  # nothing predicts position 0
    if entropy_scope == "response":
        ent_mask = response_mask
    else:  # every real token that has a predecessor (official code: all non-pad positions)
        ent_mask = attention_mask.bool().clone()
        ent_mask[:, 0] = False
    needed = response_mask | ent_mask

    rows, lengths = unpad(input_ids, attention_mask)
    lanes = build_lanes(rows, list(needed), lane_plan(lengths, layout, pack_tokens), pad_id=0)
    nll_flat, ent_flat = lanes_forward(as_lm(model), lanes, None, chunk_tokens)  # (N,), (N,)

    nll = torch.zeros(B, T, device=input_ids.device, dtype=torch.float32)
    ent = torch.zeros_like(nll)
    nll[lanes.row, lanes.pos] = nll_flat
    ent[lanes.row, lanes.pos] = ent_flat
    return TokenScores(
        nll=nll * response_mask, ent=ent * ent_mask, response_mask=response_mask, ent_mask=ent_mask,
        fed_tokens=lanes.fed_tokens, real_tokens=lanes.real_tokens,
    )


@torch.no_grad()
def score_dataset(
    model: torch.nn.Module,
    dataset,
    pad_id: int,
    *,
    batch_size: int = 8,
    entropy_scope: Literal["response", "all"] = "response",
    chunk_tokens: int = SCORE_CHUNK_TOKENS,
    device: torch.device | str | None = None,
    progress: bool = True,
):
    """A static EU pass over a whole tokenized data set, with the same scoring code as the training loop.

    Rows are scored in length order (less padding; a sample's scores do not
    depend on its batch-mates) and returned in the data set's order as a
    pandas DataFrame: sample_id, ppl, ent, response_length, length.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from qtuning.data import collate

    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    lengths = list(dataset["length"])
    ids, labels = list(dataset["input_ids"]), list(dataset["labels"])
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ppl = [0.0] * len(order)
    ent = [0.0] * len(order)
    for s in tqdm(range(0, len(order), batch_size), desc="EU scoring", disable=not progress, unit="batch"):
        idx = order[s : s + batch_size]
        b = collate([ids[i] for i in idx], [labels[i] for i in idx], pad_id).to(device)
        sc = score_tokens(model, b.input_ids, b.attention_mask, b.labels, entropy_scope=entropy_scope, chunk_tokens=chunk_tokens)
        for i, p, e in zip(idx, sc.sample_ppl().tolist(), sc.sample_ent().tolist()):
            ppl[i], ent[i] = p, e
    model.train(was_training)
    return pd.DataFrame(
        {
            "sample_id": list(dataset["sample_id"]),
            "ppl": ppl,
            "ent": ent,
            "response_length": list(dataset["response_length"]),
            "length": lengths,
        }
    )
