"""Load the model and tokenizer a ModelConfig names, optionally with LoRA adapters, and save the result.

``save_final`` always writes a plain transformers folder (LoRA merged), so evaluation (lm-eval) and users
load the fine-tuned model like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from qtuning import assets
from qtuning.config import BUNDLED_MODEL, ModelConfig, is_template_text


def resolve_model_path(cfg: ModelConfig) -> str:
    """The bundled model's cached folder, else ``cfg.name`` as given (a local folder or a hub id)."""
    if cfg.name == BUNDLED_MODEL:
        return str(assets.model_dir(cfg.name))
    path = Path(cfg.name).expanduser()
    return str(path) if path.exists() else cfg.name


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer, padding on the right (labels and masks are built for right padding).

    A tokenizer without a pad token pads with eos: qtuning.data.collate masks padding by position, so the pad id's
    value never matters (SmolLM2 already has pad = eos = ``<|im_end|>``).
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg))
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template is not None:  # saved with the tokenizer by save_final, so the fine-tuned model keeps it
        tokenizer.chat_template = read_chat_template(cfg.chat_template)
    return tokenizer


def read_chat_template(value: str) -> str:
    """`model.chat_template` as a template: the value itself, or the content of the file it names."""
    return value if is_template_text(value) else Path(value).expanduser().read_text(encoding="utf-8")


def load_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The pretrained model (or, with ``random_init``, its architecture with fresh weights), LoRA-wrapped if asked.

    Dropout is switched off: Q-Tuning scores samples and tokens with the same model it trains, and dropout
    noise would make the scoring forward and the training forward disagree (and tests non-deterministic).
    Random weights come from torch's global RNG: call ``torch.manual_seed`` first for reproducible ones.
    ``dtype`` is the weights' dtype; LoRA adapters on bf16 weights stay fp32 (peft's autocast_adapter_dtype).
    """
    path = resolve_model_path(cfg)
    config = AutoConfig.from_pretrained(path)
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(
                f"model.config_overrides.{key}: {type(config).__name__} has no field {key!r}; "
                f"see {path}/config.json for the fields it has"
            )
        setattr(config, key, value)
    _zero_dropout(config)
    attn = {"attn_implementation": cfg.attn_implementation}
    if cfg.random_init:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **attn)
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


def _zero_dropout(config: PretrainedConfig) -> None:
    """Set every dropout probability of a transformers config to 0 (attention_dropout, resid_pdrop, ...)."""
    for key, value in config.to_dict().items():
        if (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)


def save_final(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save `model` (LoRA merged into its base weights, in place) and `tokenizer` as a plain transformers folder.

    Merging modifies the wrapped model, so call this once training is over.
    """
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_model_config() -> ModelConfig:
    """A 2-layer, 64-wide random llama with the bundled model's real tokenizer: real code paths in milliseconds.

    Vocabulary (49,152) and tied embeddings are the real model's, so token ids, chat template and the
    pad = eos trap are those of SmolLM2; 64 = 4 heads x 16 dims, 2 KV heads as grouped-query attention.
    """
    return ModelConfig(
        name=BUNDLED_MODEL,
        random_init=True,
        config_overrides={
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
    )
