"""What this machine can run: the checks made before anything loads (GPU-only precisions and kernels, each
refusal with its fix), the precision a run gets here, and the one sync point the loop's timings need."""

from __future__ import annotations

import torch

from qtuning.config import ConfigError, ExperimentConfig, TrainingConfig


def check_device(cfg: ExperimentConfig) -> None:
    """Refuse, before anything loads, what this machine cannot run: every problem at once, each with its fix."""
    import importlib.util

    t, m = cfg.training, cfg.model
    gpu = torch.cuda.is_available()
    problems = []
    if t.precision in ("bf16", "fp16") and not gpu:
        problems.append(f"training.precision: {t.precision} needs a GPU (this machine has none); use auto or fp32")
    elif t.precision == "bf16" and not torch.cuda.is_bf16_supported():
        problems.append("training.precision: bf16 is not supported by this GPU; use fp16 or auto")
    if t.weight_dtype == "bf16" and not gpu:
        problems.append("training.weight_dtype: bf16 needs a GPU (bf16 matmuls on a CPU are slow); use auto or fp32")
    if m.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            problems.append("model.attn_implementation: flash_attention_2 needs the flash-attn package; "
                            "`pip install flash-attn --no-build-isolation`, or use sdpa")
        if not gpu:
            problems.append("model.attn_implementation: flash_attention_2 needs a GPU; use sdpa")
    if problems:
        raise ConfigError("; ".join(problems))


def precision(t: TrainingConfig, finetune: str) -> tuple[str, torch.dtype]:
    """(accelerate's mixed_precision, the weights' dtype) for this machine; check_device has refused the rest."""
    gpu = torch.cuda.is_available()
    if t.precision == "auto":
        compute = "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"
    else:
        compute = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[t.precision]
    weights = t.weight_dtype
    if weights == "auto":  # a frozen LoRA base needs no fp32 master copy; full fine-tuning keeps one
        weights = "bf16" if compute == "bf16" and finetune == "lora" else "fp32"
    return compute, {"fp32": torch.float32, "bf16": torch.bfloat16}[weights]


def sync(device: torch.device) -> None:
    """Timings need the GPU queue drained (a CPU-GPU sync point; twice per step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
