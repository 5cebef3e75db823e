"""Running lm-eval on a checkpoint: evaluate_checkpoint, per-run task settings, the offline switch, device, dtype."""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtuning.config import EvalConfig
from qtuning.evaluation import TASK_PREFIX, TASKS_DIR
from qtuning.evaluation.results import PER_TASK_KEYS, merge_output, sample_rows, short_name, task_headline


@dataclass
class EvalResult:
    """What one evaluation produced: headline scores and where the full record lies."""

    scores: dict[str, float]  # task (without the qt_ prefix) -> headline metric in percent
    average: float  # mean of `scores`
    raw_results_path: Path  # lm-eval's results JSON (all metrics, configs, versions), tasks merged
    samples_path: Path  # one JSON line per scored item: task, doc_id, prompt, prediction, target, correct
    seconds: float  # wall time, model load included
    task_seconds: dict[str, float] = field(default_factory=dict)  # wall time per task (same keys as scores)


def run_settings(task: str, cfg: EvalConfig) -> dict[str, Any]:
    """The `simple_evaluate` keyword arguments that apply `cfg`'s per-run settings to one bundled task.

    The task YAMLs hold the paper's defaults; these are lm-eval's documented
    overrides (the CLI's --num_fewshot and --gen_kwargs). `gen_kwargs` updates
    the YAML's `generation_kwargs` key by key, so `until` and greedy decoding
    stay. Each task runs in its own `simple_evaluate` call, so the values reach
    that task only. Other tasks: none, they run as their configs say.
    """
    if task == "qt_gsm8k":
        return {"num_fewshot": cfg.num_fewshot_gsm8k, "gen_kwargs": {"max_gen_toks": cfg.max_gen_toks}}
    if task in ("qt_squad", "qt_triviaqa"):
        return {"gen_kwargs": {"max_gen_toks": cfg.max_gen_toks_short}}
    return {}


@contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Make huggingface_hub, transformers and datasets refuse the network inside the block, then restore.

    The environment variables alone do not suffice once those libraries are
    imported: they read them into module constants at import time. So the
    constants are patched too, and both are put back on exit, leaving the
    caller's process as it was.
    """
    if not enabled:
        yield
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    # The documented variables are read once, when huggingface_hub and datasets are imported; in a process that
    # imported them already (the pipeline's, a notebook's) only their constants still decide, so both are set.
    env_keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE)
    os.environ.update(dict.fromkeys(env_keys, "1"))
    hub_constants.HF_HUB_OFFLINE = ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve_device_dtype(cfg: EvalConfig) -> tuple[str, str]:
    """`cfg.device` and `cfg.dtype` with "auto" resolved for this machine: (cuda|cpu, bfloat16|float32|...)."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("EvalConfig.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def _is_yaml_path(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()


def evaluate_checkpoint(
    model_dir: str | Path,
    cfg: EvalConfig,
    work_dir: Path,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Score the transformers checkpoint in `model_dir` on `cfg.tasks`; write the full record to `work_dir`.

    The model loads once (lm-eval's `hf` model) and each task runs as its own
    `simple_evaluate` call, which gives per-task wall time, progress lines
    through `log` and per-task settings (`run_settings`); the per-task results
    are merged into one lm-eval results JSON (`results.json`) and one flat
    samples table (`samples.jsonl`). The bundled qt_* tasks come from the
    package's static YAMLs (`TASKS_DIR`). Decoding is greedy and, unless
    `cfg.chat_template`, prompts are plain text, as in the paper.
    """
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(model_dir).expanduser()
    model_ref = str(model_path.resolve()) if model_path.exists() else str(model_dir)  # else: a hub id

    include = [str(TASKS_DIR)] if any(t.startswith(TASK_PREFIX) for t in cfg.tasks) else []
    # Indexing lm-eval's ~15k built-in task YAMLs takes ~14 s; skip it when only our tasks or files run.
    needs_builtin = any(not t.startswith(TASK_PREFIX) and not _is_yaml_path(t) for t in cfg.tasks)
    device, dtype = resolve_device_dtype(cfg)

    merged: dict[str, Any] = {k: {} for k in PER_TASK_KEYS}
    scores: dict[str, float] = {}
    task_seconds: dict[str, float] = {}
    samples_path = work_dir / "samples.jsonl"
    with hub_offline(cfg.offline), samples_path.open("w", encoding="utf-8") as samples_file:
        manager = TaskManager(include_path=include or None, include_defaults=needs_builtin)
        t_load = time.perf_counter()
        lm = get_model("hf").create_from_arg_obj(
            {"pretrained": model_ref, "dtype": dtype}, {"batch_size": cfg.batch_size, "device": device}
        )
        say(f"eval: loaded {model_ref} on {device} ({dtype}) in {time.perf_counter() - t_load:.1f}s")
        for spec in cfg.tasks:
            t_task = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[spec],
                task_manager=manager,
                limit=cfg.limit,
                log_samples=True,
                apply_chat_template=cfg.chat_template,
                fewshot_as_multiturn=cfg.chat_template,
                bootstrap_iters=1000,  # only non-mean aggregations bootstrap; lm-eval's 100k is slow on corpus metrics
                **run_settings(spec, cfg),
            )
            if out is None:  # only on non-zero ranks of a distributed run
                continue
            merge_output(merged, out)
            name, key, score = task_headline(spec, out)
            short = short_name(name)
            scores[short] = score
            task_seconds[short] = time.perf_counter() - t_task
            for task_name, task_samples in (out.get("samples") or {}).items():
                config = out["configs"].get(task_name, {})
                for row in sample_rows(task_name, task_samples, config):
                    samples_file.write(json.dumps(row, ensure_ascii=False, default=handle_non_serializable) + "\n")
            say(f"eval: {short} {key} = {score:.2f} ({task_seconds[short]:.1f}s)")
        # A pipeline trains and evaluates in one process: hand the accelerator memory back now.
        del lm
        gc.collect()
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()

    average = sum(scores.values()) / len(scores) if scores else float("nan")
    merged["qtuning"] = {
        "model_dir": model_ref,
        "eval_config": cfg.model_dump(),
        "device": device,
        "dtype": dtype,
        "scores": scores,
        "average": average,
        "task_seconds": task_seconds,
    }
    raw_results_path = work_dir / "results.json"
    raw_results_path.write_text(json.dumps(merged, indent=2, ensure_ascii=False, default=handle_non_serializable))
    seconds = time.perf_counter() - t_start
    say(f"eval: average {average:.2f} over {len(scores)} tasks ({seconds:.1f}s)")
    return EvalResult(
        scores=scores,
        average=average,
        raw_results_path=raw_results_path,
        samples_path=samples_path,
        seconds=seconds,
        task_seconds=task_seconds,
    )
