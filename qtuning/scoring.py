"""Where a sample sits on the Error-Uncertainty plane: per-token NLL and predictive entropy.

One no-grad forward through the decoder, then the LM head applied in chunks of
positions, so the fp32 logits of a whole batch (B x T x V, 1.6 GB for 8 x 1024 x
49k) never exist at once: a chunk of `chunk_tokens` positions costs about
2 x chunk_tokens x V x 4 bytes. Only the positions that are needed are sent
through the head (response targets, plus every real token for
`entropy_scope: all`), which also skips the padding.

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

from qtuning.config import SCORE_CHUNK_TOKENS
from qtuning.data import IGNORE_INDEX as IGNORE

@dataclass
class TokenScores:
    nll: Tensor  # (B, T) fp32, 0 off the response
    ent: Tensor  # (B, T) fp32, 0 where not scored
    response_mask: Tensor  # (B, T) bool, targets that carry loss
    ent_mask: Tensor  # (B, T) bool, positions averaged into the sample entropy

    def sample_ppl(self) -> Tensor:
        """PPL = exp(mean NLL over response tokens), (B,)."""
        n = self.response_mask.sum(1).clamp(min=1)
        return torch.exp((self.nll * self.response_mask).sum(1) / n)

    def sample_ent(self) -> Tensor:
        """Ent = mean predictive entropy over `ent_mask` positions, in nats, (B,)."""
        n = self.ent_mask.sum(1).clamp(min=1)
        return (self.ent * self.ent_mask).sum(1) / n


def _decoder_and_head(model: torch.nn.Module):
    """The transformer body and the LM head of a causal LM (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    decoder = base.get_decoder()
    if head is None or decoder is None:
        raise TypeError(f"{type(base).__name__} exposes no decoder/LM head; scoring needs a causal LM")
    cfg = base.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)

    def head_fn(h: Tensor) -> Tensor:
        logits = head(h).float()
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return decoder, head_fn


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    input_ids: Tensor,  # (B, T)
    attention_mask: Tensor,  # (B, T)
    labels: Tensor,  # (B, T), IGNORE off the response
    *,
    entropy_scope: Literal["response", "all"] = "response",
    chunk_tokens: int = SCORE_CHUNK_TOKENS,
) -> TokenScores:
    """Token NLL and full-vocabulary entropy from one no-grad forward, chunked over positions."""
    B, T = input_ids.shape
    response_mask = labels != IGNORE
    response_mask[:, 0] = False  # nothing predicts position 0
    if entropy_scope == "response":
        ent_mask = response_mask
    else:  # every real token that has a predecessor (official code: all non-pad positions)
        ent_mask = attention_mask.bool().clone()
        ent_mask[:, 0] = False
    needed = response_mask | ent_mask

    decoder, head_fn = _decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)

    b_idx, t_idx = needed.nonzero(as_tuple=True)  # targets; predicted from t - 1
    targets = input_ids[b_idx, t_idx]
    nll_flat = torch.empty(len(b_idx), device=hidden.device, dtype=torch.float32)
    ent_flat = torch.empty_like(nll_flat)
    for s in range(0, len(b_idx), chunk_tokens):
        e = s + chunk_tokens
        logits = head_fn(hidden[b_idx[s:e], t_idx[s:e] - 1])  # (n, V) fp32
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        nll_flat[s:e] = lse - logits.gather(1, targets[s:e, None]).squeeze(1)
        # H = -sum_v p log p, with log p = z - lse computed in place: at most two (n, V) buffers live
        logp = logits.sub_(lse[:, None])
        ent_flat[s:e] = -(logp.exp().mul_(logp)).sum(-1)
        del logits, logp

    nll = torch.zeros(B, T, device=hidden.device, dtype=torch.float32)
    ent = torch.zeros_like(nll)
    nll[b_idx, t_idx] = nll_flat
    ent[b_idx, t_idx] = ent_flat
    nll = nll * response_mask
    return TokenScores(nll=nll, ent=ent * ent_mask, response_mask=response_mask, ent_mask=ent_mask)


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
