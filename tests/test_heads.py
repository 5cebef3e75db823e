"""The LM head as each model family defines it: the chunked scores and loss equal the ones from the model's own
logits (its forward's scaling, softcap and adapters included), or the model is refused with its type named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FP32_EPS, GRAD_TOL, assert_grads_close
from qtuning.config import DataConfig
from qtuning.data import IGNORE_INDEX as IGNORE
from qtuning.data import build_sft_dataset, collate
from qtuning.lm import ChunkedLM, build_lanes, check_head, lane_plan, lanes_forward, loss_targets, unpad
from qtuning.modeling import load_model, tiny_model_config

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, initializer_range=0.2)  # wide init: logits of a few nats, not ~0


def _lora_on_lm_head() -> torch.nn.Module:
    """The tiny llama with LoRA on q_proj and lm_head, its B matrices random (fresh LoRA is the identity)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_config()), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def _family(name: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama":
        return load_model(tiny_model_config())
    if name == "granite":  # logits / logits_scaling
        return tf.GraniteForCausalLM(tf.GraniteConfig(**TINY, logits_scaling=8.0, embedding_multiplier=4.0))
    if name == "gemma2-softcap":  # tanh softcap of the logits, after the head
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**TINY, final_logit_softcapping=2.0, sliding_window=32,
                                                    query_pre_attn_scalar=16))
    if name == "cohere":  # logits * logit_scale
        return tf.CohereForCausalLM(tf.CohereConfig(**TINY, logit_scale=0.25))
    if name == "lora-on-lm_head":
        return _lora_on_lm_head()
    raise ValueError(name)


FAMILIES = ["llama", "granite", "gemma2-softcap", "cohere", "lora-on-lm_head"]


@pytest.fixture(scope="module")
def batch(tokenizer):
    data = build_sft_dataset(DataConfig(source="arc", limit=6, max_length=96), tokenizer, progress=False).dataset
    return collate(list(data["input_ids"]), list(data["labels"]), tokenizer.pad_token_id)


def _model_nll(model, b) -> torch.Tensor:
    """(B, T-1) NLL of each label from the logits the model's own forward returns."""
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="none").view(b.labels.shape[0], -1)


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_scores_loss_and_gradient_equal_the_models_own(family, batch):
    model, b = _family(family).train(), batch
    if family == "lora-on-lm_head":
        assert type(model.get_base_model().get_output_embeddings()) is not torch.nn.Linear  # the adapter is the head
    row_w = torch.linspace(0.5, 2.0, b.input_ids.shape[0])
    ref = (_model_nll(model, b) * row_w[:, None]).sum()
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    lm = ChunkedLM(model)
    rows, lengths = unpad(b.input_ids, b.attention_mask)
    lanes = build_lanes(rows, list(loss_targets(b.labels)), lane_plan(lengths, "packed", 100), pad_id=0)
    got = lanes_forward(lm, lanes, row_w[lanes.row], 13)  # chunks of 13 positions: several per forward
    got.backward()
    terms = int(b.attention_mask.sum())
    torch.testing.assert_close(got, ref, rtol=GRAD_TOL * FP32_EPS * terms ** 0.5, atol=0)
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if n in want}, want, terms)

    with torch.no_grad():  # the scores: per-token NLL of the model's own logits
        nll, _ = lanes_forward(lm.eval(), lanes)
        flat = _model_nll(model.eval(), b)[lanes.row, lanes.pos - 1]
    torch.testing.assert_close(nll, flat, rtol=1e-4, atol=1e-4)


def test_the_direction_of_a_scale_is_the_models_not_the_names():
    """Granite divides by logits_scaling; a model that multiplies by a field of that name is read as multiplying."""
    import transformers as tf

    torch.manual_seed(0)
    granite = tf.GraniteForCausalLM(tf.GraniteConfig(**TINY, logits_scaling=8.0))
    assert check_head(granite) == (1 / 8.0, None)

    class Multiplying(tf.GraniteForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 64.0  # / 8 by Granite, then x 64: x 8 in all
            return out

    assert check_head(Multiplying(granite.config)) == (8.0, None)


def test_a_head_qtuning_cannot_reproduce_is_refused_with_the_model_type():
    import transformers as tf

    class Odd(tf.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 1.0 * torch.arange(out.logits.shape[-1]) / out.logits.shape[-1]
            return out

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"model type 'llama'.*does not reproduce.*refused"):
        ChunkedLM(Odd(tf.LlamaConfig(**TINY)))
