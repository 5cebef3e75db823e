"""Rows that share a lane never see each other, under every attention implementation the config accepts.

Each test runs transformers' own attention dispatch: its mask construction for eager and sdpa, its flash-attention
integration (the varlen decision, the cumulative lengths, the unpadding) for flash_attention_2. Only the
flash-attn package itself, which needs a CUDA GPU, is replaced by the reference kernels below: the same
functions, the same arguments, computed in plain torch. On today's hardware the varlen kernel is the one thing
a CPU cannot run; everything that decides which positions attend to which is transformers'.

A row's scores alone must equal its scores in a pool of several lanes of several rows, and a step's gradient
over those lanes must equal the gradient of the rows' separate forwards.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import FP32_EPS, GRAD_TOL, assert_grads_close
from qtuning.config import DataConfig, ModelConfig
from qtuning.data import build_sft_dataset, collate
from qtuning.lm import ChunkedLM, build_lanes, lane_plan, lanes_forward, loss_targets, unpad
from qtuning.modeling import load_model, tiny_model_config
from qtuning.scoring import score_tokens


# --------------------------------------------------------------------------- flash-attn's API in plain torch
def _attend(q, k, v, causal, softmax_scale, window_size, softcap):
    """One sequence: q (Lq, H, D), k and v (Lk, Hk, D) -> (Lq, H, D), as flash-attn defines it (grouped-query
    heads, causal mask aligned to the bottom right, a (left, right) window, tanh softcap on the scores)."""
    lq, h, d = q.shape
    lk, hk = k.shape[0], k.shape[1]
    k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=q.device)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= i
    left, right = window_size
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    assert dropout_p == 0.0 and alibi_slopes is None
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale, window_size, softcap) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False):
    assert dropout_p == 0.0 and alibi_slopes is None
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert len(cq) == len(ck) and cq[-1] == q.shape[0] and ck[-1] == k.shape[0]
    assert max(b - a for a, b in zip(cq, cq[1:])) <= int(max_seqlen_q)
    out = [_attend(q[a:b], k[c:d], v[c:d], causal, softmax_scale, window_size, softcap)
           for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])]
    return torch.cat(out)


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    seqlens = attention_mask.sum(-1, dtype=torch.int32)
    indices = attention_mask.flatten().nonzero().flatten()
    cu = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu, int(seqlens.max()), seqlens


def pad_input(hidden_states, indices, batch, seqlen):
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


@pytest.fixture
def reference_flash_attn(monkeypatch):
    """The flash-attn package, as far as transformers can tell: its two kernels and its padding helpers."""
    import transformers.modeling_flash_attention_utils as fa_utils

    package = types.ModuleType("flash_attn")
    package.flash_attn_func, package.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    package.flash_attn_with_kvcache = None
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = pad_input, unpad_input
    package.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    # transformers asks the installed packages (and CUDA) whether flash-attn 2 is there, then imports it lazily
    # and caches the functions per implementation: point both at the package above, and restore them after
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda: True)
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(fa_utils, name, None, raising=False)
    return package


# --------------------------------------------------------------------------- models and data
IMPLEMENTATIONS = ["eager", "sdpa", "flash_attention_2"]


def _model(family: str, implementation: str) -> torch.nn.Module:
    """A tiny random model whose layers dispatch to `implementation` (set after loading, as a GPU would have it:
    loading with flash_attention_2 asks for CUDA)."""
    torch.manual_seed(0)
    if family == "llama":
        model = load_model(tiny_model_config())
    else:  # every layer a sliding window narrower than most rows (it must slide), wide enough that the answer
        # tokens at a row's end would reach the row before it through two layers
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(
            vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=48, tie_word_embeddings=True))
    model.config._attn_implementation = implementation
    return model


@pytest.fixture(scope="module")
def pool(tokenizer):
    """8 ARC rows of 60-128 tokens: at pack_tokens 200 they share lanes two and three at a time."""
    data = build_sft_dataset(DataConfig(source="arc", limit=8, max_length=128), tokenizer, progress=False).dataset
    return collate(list(data["input_ids"]), list(data["labels"]), tokenizer.pad_token_id)


PACK = 200


def _plan(pool) -> list[list[int]]:
    _, lengths = unpad(pool.input_ids, pool.attention_mask)
    plan = lane_plan(lengths, "packed", PACK)
    assert len(plan) >= 2 and max(len(lane) for lane in plan) >= 2, plan  # several lanes, rows sharing them
    return plan


# --------------------------------------------------------------------------- the tests
@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "mistral-sliding-window"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_rows_scores_alone_equal_its_scores_in_a_packed_pool(family, implementation, pool, reference_flash_attn):
    model, b = _model(family, implementation).eval(), pool
    _plan(b)
    together = score_tokens(model, b.input_ids, b.attention_mask, b.labels, layout="packed", pack_tokens=PACK)
    for r in range(b.input_ids.shape[0]):
        n = int(b.attention_mask[r].sum())
        alone = score_tokens(model, b.input_ids[r : r + 1, :n], b.attention_mask[r : r + 1, :n], b.labels[r : r + 1, :n])
        torch.testing.assert_close(together.nll[r, :n], alone.nll[0], rtol=1e-4, atol=1e-4, msg=f"row {r}")
        torch.testing.assert_close(together.ent[r, :n], alone.ent[0], rtol=1e-4, atol=1e-4, msg=f"row {r}")


@pytest.mark.numerics
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_packed_steps_gradient_equals_the_rows_alone(implementation, pool, reference_flash_attn):
    model, b = _model("llama", implementation).train(), pool
    lm = ChunkedLM(model)
    rows, _ = unpad(b.input_ids, b.attention_mask)
    targets = list(loss_targets(b.labels))
    row_w = torch.linspace(0.5, 2.0, len(rows))

    for i in range(len(rows)):  # each row its own forward: nothing to isolate
        lanes = build_lanes([rows[i]], [targets[i]], [[0]], pad_id=0)
        lanes_forward(lm, lanes, row_w[i].expand(len(lanes.src))).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    lanes = build_lanes(rows, targets, _plan(b), pad_id=0)
    lanes_forward(lm, lanes, row_w[lanes.row]).backward()
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want, int(b.attention_mask.sum()))


def test_an_implementation_that_cannot_isolate_rows_is_refused_for_packed_lanes(pool):
    """An attention function transformers builds no mask for (registered by a user, say) sees whole lanes: packed
    rows are refused with the fix; one row per lane (its padding tail comes after it) is fine."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("qtuning-test-unmasked", sdpa_attention_forward)
    model = _model("llama", "qtuning-test-unmasked").eval()
    b = pool
    with pytest.raises(ValueError, match="training.layout: padded"):
        score_tokens(model, b.input_ids, b.attention_mask, b.labels, layout="packed", pack_tokens=PACK)
    score_tokens(model, b.input_ids, b.attention_mask, b.labels, layout="padded")


def test_the_reference_kernels_are_flash_attentions_definition():
    """The stand-in kernels agree with torch's sdpa (causal, grouped-query) so the tests above test transformers'
    dispatch, not a second attention bug."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1),
                                          v.transpose(1, 2).repeat_interleave(2, 1), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True), want)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    got = flash_attn_varlen_func(q.reshape(18, 4, 16), k.reshape(18, 2, 16), v.reshape(18, 2, 16), cu, cu, 9, 9, causal=True)
    torch.testing.assert_close(got.view(2, 9, 4, 16), want)
