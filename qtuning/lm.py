"""The causal LM as the loop calls it: rows packed into lanes, per-token quantities out, never a batch's full logits.

Two things make a step cost what its FLOPs cost:

- **Lanes.** The rows of a forward are laid out in lanes (the batch dimension). `packed`: several rows back to
  back in one lane, `position_ids` restarting at 0 for each; `padded`: one row per lane. A lane's tail is
  padding, given positions of its own so it too is a separate sequence. No row sees another, by construction
  for each attention implementation (`isolation_kwargs`): flash-attention gets the sequences' cumulative lengths
  explicitly (its varlen kernel over the flattened lanes, as transformers' `DataCollatorWithFlattening` feeds
  it); sdpa, eager and flex attention get transformers' packed-sequence mask, which `create_causal_mask` (and its
  sliding-window and chunked variants) builds from restarting `position_ids` whenever no 2-D mask and no cache
  are passed, which is how this module calls the decoder; any other implementation is refused for lanes that
  hold several rows. Which rows share a lane changes no score and no gradient beyond float noise
  (tests/test_isolation.py, through transformers' own dispatch for eager, sdpa and flash-attention).
- **A chunked LM head.** `ChunkedLM.forward` runs the decoder, gathers the hidden states that predict a target,
  and applies the head `chunk_tokens` positions at a time: scoring gets each target's NLL and entropy, training
  the weighted NLL sum with its gradient computed chunk by chunk inside the forward (as Liger's fused linear
  cross-entropy does), so no (positions x vocabulary) logits survive a chunk: 8 x 255 x 49,152 fp32 logits are
  400 MB, a chunk of `chunk_tokens` positions (512 by default: two 100 MB buffers) is what is ever held.

`ChunkedLM` is an `nn.Module` around the Hugging Face model, prepared by accelerate as a whole: under DDP, FSDP or
ZeRO-3 both the scoring and the training forward run through the prepared (possibly sharded) module. The head
is the model's own (`Head`, `check_head`): its logit scaling and softcap as its forward applies them, adapters
on `lm_head` through the module itself.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qtuning.config import SCORE_CHUNK_TOKENS
from qtuning.data import IGNORE_INDEX as IGNORE

# attention implementations whose mask transformers builds from restarting position_ids (masking_utils)
MASKED_BY_POSITIONS = ("sdpa", "eager", "flex_attention")


# --------------------------------------------------------------------------- lanes
# A lane of width W costs each of its positions the decoder's matmuls plus attention over up to W positions
# (sdpa and eager attend over the whole lane under a block-diagonal mask). Attention's share is about
# 4 W d / (2 P_layer): W / 3,100 on SmolLM2-135M (d 576, 3.5M weights a layer), W / 25,000 on a 7B. Measured on
# the 135M (2-core CPU): 16 rows of 256 cost 10% less as 16 lanes than packed two by two into 8 lanes of 512
# (forward), 15% less forward + backward. This constant is that model's figure rounded up; larger models
# would pack slightly wider lanes with their own, to little effect either way.
ATTENTION_POSITIONS = 4096


def lane_plan(lengths: list[int], layout: str, pack_tokens: int) -> list[list[int]]:
    """Which rows share a lane: `padded` one row each (longest first); `packed` the cheapest of a few plans.

    The candidates: one row per lane, and about total / pack_tokens lanes of even load, each row (longest first)
    into the least-loaded lane (LPT: the longest lane is at most 4/3 of the best). Lanes are as wide as the
    longest, so a plan of n lanes of width W feeds n x W positions; it costs n W (1 + W / ATTENTION_POSITIONS)
    (attention grows with the lane's width), and lanes no wider than 1.25 x pack_tokens or the longest row.
    Rows of one length thus stay one to a lane (packing them saves no position and widens the attention).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if layout == "padded" or not order:
        return [[i] for i in order]
    n0 = -(-sum(lengths) // pack_tokens)
    widest = max(lengths[order[0]], int(1.25 * pack_tokens))

    def cost(n: int, width: int) -> tuple:
        return (width > widest, n * width * (1 + width / ATTENTION_POSITIONS), n)

    plans = [(cost(len(order), lengths[order[0]]), [[i] for i in order])]  # one row per lane
    for n in sorted({max(1, min(len(order), n)) for n in (n0 - 1, n0, n0 + 1, n0 + 2)}):
        lanes: list[list[int]] = [[] for _ in range(n)]
        load = [0] * n
        for i in order:
            j = min(range(n), key=load.__getitem__)
            lanes[j].append(i)
            load[j] += lengths[i]
        plans.append((cost(n, max(load)), [lane for lane in lanes if lane]))
    return min(plans, key=lambda p: p[0])[1]  # within the width, the least work, then the fewest lanes


@dataclass
class Lanes:
    """One forward's input: rows laid out in lanes, and where each target's predicting hidden state sits."""

    input_ids: Tensor  # (n_lanes, W)
    position_ids: Tensor  # (n_lanes, W), restarting at 0 for each row and for the lane's padding tail
    src: Tensor  # (N,) flat index (lane * W + pos) of the hidden state that predicts target k
    targets: Tensor  # (N,) token ids
    row: Tensor  # (N,) the input row of target k
    pos: Tensor  # (N,) its position in that row (the label position, as in `labels`)
    real_tokens: int  # non-padding positions fed
    fed_tokens: int  # n_lanes x W


def build_lanes(ids: list[Tensor], target_masks: list[Tensor], plan: list[list[int]], pad_id: int) -> Lanes:
    """Lanes for rows `ids[i]` (1-D, unpadded) whose targets are the positions where `target_masks[i]` is True
    (position 0 is never a target: nothing predicts it)."""
    device = ids[0].device if ids else torch.device("cpu")
    width = max((sum(len(ids[i]) for i in lane) for lane in plan), default=1)
    input_ids = torch.full((max(1, len(plan)), width), pad_id, dtype=torch.long, device=device)
    position_ids = torch.empty((max(1, len(plan)), width), dtype=torch.long, device=device)
    src, rows, pos = [], [], []
    real = 0
    for j, lane in enumerate(plan or [[]]):
        off = 0
        for i in lane:
            n = len(ids[i])
            input_ids[j, off : off + n] = ids[i]
            position_ids[j, off : off + n] = torch.arange(n, device=device)
            t = target_masks[i][:n].nonzero().squeeze(1)
            t = t[t > 0]
            src.append(j * width + off + t - 1)
            rows.append(torch.full_like(t, i))
            pos.append(t)
            off += n
        position_ids[j, off:] = torch.arange(width - off, device=device)  # the tail: a sequence of its own
        real += off
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long, device=device)  # noqa: E731
    src, row, pos = cat(src), cat(rows), cat(pos)
    targets = input_ids.view(-1)[src + 1]  # the token right after the predicting position
    return Lanes(input_ids, position_ids, src, targets, row, pos, real, input_ids.numel())


def unpad(input_ids: Tensor, attention_mask: Tensor) -> tuple[list[Tensor], list[int]]:
    """The rows of a right-padded batch without their padding, and their lengths."""
    lengths = attention_mask.sum(1).tolist()
    return [input_ids[b, :n] for b, n in enumerate(lengths)], lengths


# --------------------------------------------------------------------------- rows that share a lane never meet
def attention_implementation(model: nn.Module) -> str:
    """The attention implementation the model's layers dispatch to (transformers keeps it on the config only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # no public accessor exists in transformers 5.x: its own layers read config._attn_implementation to dispatch
    return getattr(base.config, "_attn_implementation", None) or "eager"


def isolation_kwargs(implementation: str, position_ids: Tensor, src: Tensor) -> dict:
    """The decoder's keyword arguments that keep each sequence of the lanes (a row, or a lane's padding tail) to
    itself under `implementation`.

    flash-attention (any flavour: the flash-attn packages or a hub kernel): the cumulative sequence lengths over the
    flattened lanes (transformers' `prepare_fa_kwargs_from_position_ids`); transformers then runs the varlen
    kernel over all lanes as one ragged batch. Without them it infers sequences from `position_ids` only when
    there is a single lane, and with several it attends across a lane's rows.
    sdpa, eager, flex: nothing; transformers builds the block-diagonal causal mask from `position_ids`.
    Anything else: refused when a lane holds more than one row (a padding tail after a row is harmless: causal
    attention never looks ahead).
    """
    from transformers.utils.generic import is_flash_attention_requested

    if is_flash_attention_requested(requested_attention_implementation=implementation):
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids.reshape(1, -1))
        return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}
    if implementation in MASKED_BY_POSITIONS:
        return {}
    segment = (position_ids == 0).cumsum(1).reshape(-1) - 1  # 0 for a lane's first sequence
    if bool((segment[src] > 0).any()):
        raise ValueError(
            f"attention implementation {implementation!r} cannot keep rows that share a lane apart; set "
            "training.layout: padded, or model.attn_implementation: sdpa, eager or flash_attention_2"
        )
    return {}


# --------------------------------------------------------------------------- the LM head as the model defines it
# Config fields that scale a causal LM's logits, and the models that read them: Cohere multiplies by
# `logit_scale`; Granite divides by `logits_scaling` and HyperCLOVA X multiplies by it; Falcon-H1 multiplies by
# `lm_head_multiplier`; Muse by `output_multiplier`. A name does not say which way, so the model says: each
# candidate is checked against the model's own forward (`check_head`), and one that reproduces no candidate is
# refused. Gemma 2/3's `final_logit_softcapping` is applied after the scale, as they do.
SCALE_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
SOFTCAP_FIELD = "final_logit_softcapping"


@dataclass(frozen=True)
class Head:
    """How a chunk of hidden states becomes logits: the output layer, then x scale, then the softcap.

    `fused`: the layer is a plain `nn.Linear`, whose matmuls the training loss runs itself with the gradient
    taken inside the forward (`_LinearCrossEntropy`); any other layer (a LoRA adapter on `lm_head`, a quantised
    linear) is called as the module it is, chunk by chunk under activation checkpointing, so adapters and their
    gradients are the module's own."""

    module: nn.Module
    scale: float | None
    softcap: float | None

    @property
    def fused(self) -> bool:
        return type(self.module) is nn.Linear

    def logits(self, h: Tensor) -> Tensor:
        """(c, V) fp32 logits of a chunk of hidden states."""
        if self.fused:
            return _logits(h, self.module.weight, self.module.bias, self.scale, self.softcap)
        z = self.module(h).float()
        if self.scale is not None:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its (scale, softcap), checked once


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(the causal LM under any PEFT wrapper, its decoder, its output layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, decoder = base.get_output_embeddings(), base.get_decoder()
    if head is None or decoder is None:
        raise TypeError(f"{type(base).__name__} exposes no decoder/LM head; qtuning needs a causal LM")
    return base, decoder, head


def check_head(model: nn.Module, probe_tokens: int = 8) -> tuple[float | None, float | None]:
    """The (scale, softcap) with which the output layer's logits equal the model's own, found by one no-grad
    forward of `probe_tokens` tokens through both; a model whose logits are none of the candidates is refused
    with its type named. Checked once per model (a model on the meta device cannot run and is trusted)."""
    base, decoder, head = _parts(model)
    if base in _CHECKED:
        return _CHECKED[base]
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    softcap = getattr(cfg, SOFTCAP_FIELD, None) or None
    candidates: list[float | None] = [None]
    for name in SCALE_FIELDS:
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in (0, 1):
            candidates += [float(v), 1.0 / float(v)]
    param = next(iter(base.parameters()), None)
    # weights not in this process: the meta device (a rank of a sharded load) or ZeRO-3's empty partitions
    if param is None or param.device.type == "meta" or param.numel() == 0:
        if len(candidates) > 1:
            raise ValueError(f"{getattr(cfg, 'model_type', type(base).__name__)}: the direction of its logit scaling "
                             "is checked by a forward, and its weights are not loaded in this process (meta device)")
        return None, softcap
    ids = (torch.arange(probe_tokens, device=param.device) * 7919 + 11) % cfg.vocab_size
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            want = base(input_ids=ids[None], use_cache=False).logits[0].float()
            hidden = decoder(input_ids=ids[None], use_cache=False).last_hidden_state[0]
            # fp32 weights agree to rounding; bf16/fp16 ones to their precision (the two paths round differently)
            tol = (1e-3 if param.dtype == torch.float32 else 3e-2) * max(1.0, float(want.abs().max()))
            for scale in candidates:
                got = Head(head, scale, softcap).logits(hidden)
                if float((got - want).abs().max()) <= tol:
                    _CHECKED[base] = (scale, softcap)
                    return scale, softcap
    finally:
        base.train(was_training)
    fields = [f"{n}={getattr(cfg, n)}" for n in (*SCALE_FIELDS, SOFTCAP_FIELD) if getattr(cfg, n, None) is not None]
    raise ValueError(
        f"model type {getattr(cfg, 'model_type', type(base).__name__)!r}: its forward turns the LM head's output "
        f"into logits in a way qtuning's chunked head does not reproduce ({', '.join(fields) or 'no scaling field'}; "
        "known: x logit_scale, / or x logits_scaling, x lm_head_multiplier, x output_multiplier, then "
        "final_logit_softcapping). Its scores and loss would be wrong, so it is refused: train a model of another "
        "type, or report the model type so its head can be added to qtuning.lm.SCALE_FIELDS"
    )


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, scale, softcap) -> Tensor:
    """(n, V) fp32 logits of a chunk, with the model's logit scale and final softcap."""
    z = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).float()
    if scale is not None:
        z = z * scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def _chunk_nll_sum(head: Head, h: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
    z = head.logits(h)
    return ((torch.logsumexp(z, dim=-1) - z.gather(1, targets[:, None]).squeeze(1)) * weight.float()).sum()


def module_cross_entropy(head: Head, h: Tensor, targets: Tensor, token_weight: Tensor, chunk: int) -> Tensor:
    """sum_k w_k * NLL_k through any output module: each chunk's logits recomputed in the backward
    (activation checkpointing), so, as in the fused path, only one chunk's logits exist at a time."""
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        e = s + chunk
        total = total + checkpoint(_chunk_nll_sum, head, h[s:e], targets[s:e], token_weight[s:e], use_reentrant=False)
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_k w_k * NLL_k of the head's logits, its gradient taken chunk by chunk during the forward.

    Per chunk: logits z (c, V) fp32, p = softmax(z), dL/dz = w * (p - onehot), then dL/dh = dz @ W and
    dL/dW += dz^T @ h. Only one chunk's (c, V) buffers exist at a time; the backward scales the stored
    gradients by the incoming one (a scalar). The head's matmuls run once, no recompute.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, token_weight, chunk, scale, softcap):
        grad_h = torch.zeros_like(h) if h.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc, wc = h[s : s + chunk], targets[s : s + chunk], token_weight[s : s + chunk].float()
            z = _logits(hc, weight, bias, scale, softcap)  # (c, V) fp32
            lse = torch.logsumexp(z, dim=-1)
            total += ((lse - z.gather(1, tc[:, None]).squeeze(1)) * wc).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            cap = 1 - (z / softcap) ** 2 if softcap else None  # z = c * tanh(x / c): dz/dx = 1 - (z / c)^2
            dz = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dz[torch.arange(len(tc), device=dz.device), tc] -= 1.0
            dz.mul_(wc[:, None])
            if cap is not None:
                dz.mul_(cap)
                del cap
            if scale is not None:
                dz.mul_(scale)
            dz = dz.to(weight.dtype)  # the head's matmuls in the weights' dtype (autocast may lower them further)
            if grad_h is not None:
                grad_h[s : s + chunk] = (dz @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w += (dz.t() @ hc.to(weight.dtype)).float()
            if grad_b is not None:
                grad_b += dz.float().sum(0)
            del z, dz
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_out).to(w_dtype),
            None if grad_b is None else (grad_b * grad_out).to(b_dtype),
            None, None, None, None, None,
        )


class ChunkedLM(nn.Module):
    """A causal LM whose forward returns per-target scores or a weighted loss sum, never the full logits.

    forward(lanes) with `token_weight=None`: (nll, ent), each (N,) fp32, one value per target (no grad needed).
    forward(lanes, token_weight): sum_k token_weight_k * NLL_k, a scalar whose backward reaches the decoder and
    the head.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head_transform = check_head(model)  # (scale, softcap), checked on the unsharded model
        # accelerate's FSDP auto-wrap reads the decoder-layer classes from the module it is given, through the
        # attribute transformers models declare for it (`_no_split_modules`): that attribute is the contract between
        # the two libraries, and neither offers a public accessor; the wrapper passes the inner model's on
        self._no_split_modules = getattr(model, "_no_split_modules", None) or getattr(
            getattr(model, "get_base_model", lambda: model)(), "_no_split_modules", None
        )

    # the inner model's embeddings, as transformers models expose them: accelerate's FSDP2 wrapping gives the
    # embedding, final norm and head their own group through these (the root held them gathered otherwise)
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def forward(
        self,
        input_ids: Tensor,  # (n_lanes, W)
        position_ids: Tensor,  # (n_lanes, W)
        src: Tensor,  # (N,)
        targets: Tensor,  # (N,)
        token_weight: Tensor | None = None,  # (N,) training; None: scoring
        chunk_tokens: int = SCORE_CHUNK_TOKENS,
    ):
        _, decoder, module = _parts(self.model)
        head = Head(module, *self.head_transform)
        isolate = isolation_kwargs(attention_implementation(self.model), position_ids, src)
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, **isolate).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1])[src]  # (N, H): only the positions that predict a target
        if token_weight is not None:
            if not head.fused:
                return module_cross_entropy(head, h, targets, token_weight, chunk_tokens)
            return _LinearCrossEntropy.apply(h, module.weight, module.bias, targets, token_weight, chunk_tokens,
                                             head.scale, head.softcap)
        nll = torch.empty(len(src), device=h.device, dtype=torch.float32)
        ent = torch.empty_like(nll)
        for s in range(0, len(src), chunk_tokens):
            e = s + chunk_tokens
            logits = head.logits(h[s:e])  # (c, V) fp32
            lse = torch.logsumexp(logits, dim=-1)
            nll[s:e] = lse - logits.gather(1, targets[s:e, None]).squeeze(1)
            # H = -sum_v p log p, with log p = z - lse computed in place: at most two (c, V) buffers live
            logp = logits.sub_(lse[:, None])
            ent[s:e] = -(logp.exp().mul_(logp)).sum(-1)
            del logits, logp
        return nll, ent


def as_lm(model: nn.Module) -> nn.Module:
    """`model` if it is a ChunkedLM or a wrapper of one (DDP, FSDP, DeepSpeed: `.module`), else a ChunkedLM around it."""
    inner = getattr(model, "module", model)
    return model if isinstance(model, ChunkedLM) or isinstance(inner, ChunkedLM) else ChunkedLM(model)


def lanes_forward(lm: nn.Module, lanes: Lanes, token_weight: Tensor | None = None, chunk_tokens: int = SCORE_CHUNK_TOKENS):
    return lm(lanes.input_ids, lanes.position_ids, lanes.src, lanes.targets, token_weight, chunk_tokens)


def loss_targets(labels: Tensor) -> Tensor:
    """Positions of a label row that carry loss (the target mask `build_lanes` takes)."""
    return labels != IGNORE
