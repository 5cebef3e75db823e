"""Model loading: the tiny random llama, LoRA wrapping, and a merged save that loads as a plain model."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from qtuning import assets
from qtuning.config import ModelConfig
from qtuning.data import collate
from qtuning.modeling import load_model, resolve_model_path, save_final


def test_model_paths_resolve():
    assert resolve_model_path(ModelConfig()) == str(assets.model_dir())
    assert (
        resolve_model_path(ModelConfig(name="HuggingFaceTB/SmolLM2-1.7B-Instruct"))
        == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    )


def test_tiny_model_keeps_the_real_vocabulary_and_is_seedable(tiny_model, tiny_model_cfg):
    config = tiny_model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 64, 49_152)
    assert config.attention_dropout == 0.0
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight  # tied, like SmolLM2
    torch.manual_seed(0)
    again = load_model(tiny_model_cfg)
    assert all(torch.equal(a, b) for a, b in zip(tiny_model.parameters(), again.parameters(), strict=True))


def test_unknown_config_override_is_refused(tiny_model_cfg):
    cfg = tiny_model_cfg.model_copy(update={"config_overrides": {"num_layers": 2}})
    with pytest.raises(ValueError, match=r"model\.config_overrides\.num_layers: LlamaConfig has no field"):
        load_model(cfg)


def test_a_collated_batch_trains_the_tiny_model(tiny_model, tokenizer):
    rows = [
        {"sample_id": "a", "input_ids": [1, 4093, 198, 26843, 2], "labels": [-100, -100, -100, 26843, 2]},
        {
            "sample_id": "b",
            "input_ids": [1, 520, 9531, 198, 19556, 17, 2],
            "labels": [-100, -100, -100, -100, 19556, 17, 2],
        },
    ]
    batch = collate([r["input_ids"] for r in rows], [r["labels"] for r in rows], tokenizer.pad_token_id)
    loss = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    loss.backward()
    assert torch.isfinite(loss) and tiny_model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_lora_trains_only_the_adapters(tiny_model_cfg):
    torch.manual_seed(0)
    model = load_model(tiny_model_cfg.model_copy(update={"finetune": "lora", "lora_r": 4}))
    assert isinstance(model, PeftModel)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # all-linear: q, k, v, o, gate, up, down in each of the 2 layers, A and B each; never the tied head
    assert len(trainable) == 2 * 7 * 2
    assert all("lora_A" in name or "lora_B" in name for name in trainable)


def test_save_final_merges_lora_into_a_plain_folder_with_identical_logits(tiny_model_cfg, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = load_model(tiny_model_cfg.model_copy(update={"finetune": "lora", "lora_r": 4}))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    inputs = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
        base = model.get_base_model()
        with model.disable_adapter():
            assert not torch.allclose(base(**inputs).logits, before)

    out = save_final(model, tokenizer, tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not isinstance(reloaded, PeftModel)
    assert not any("lora" in key for key in reloaded.state_dict())
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, before, rtol=1e-5, atol=1e-5)
