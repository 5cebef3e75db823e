"""Benchmarks with lm-eval, offline, on a model folder; keyed by the folder's content and the eval config."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qtuning.config import EvalConfig, ModelConfig, PipelineConfig
from qtuning.data import file_sha256
from qtuning.evaluation import TASK_PREFIX, TASKS_DIR
from tasks.stage import model_fingerprint, path_fingerprint, stage
from tasks.records import EvalRecord
from tasks.tracking import RunRef, log_artifact, log_dataset, log_metrics, log_params


def _model_identity(model: str) -> str:
    """A checkpoint folder by content, the bundled model by its cache folder, a hub id as given."""
    p = Path(model).expanduser()
    return path_fingerprint(p) if p.exists() else model_fingerprint(ModelConfig(name=model))


def _ingredients(model: str, evaluation: EvalConfig, pipeline: PipelineConfig) -> dict:
    # a task file counts by its content, not by where it lies
    tasks = [f"file:{file_sha256(t)}" if t.endswith((".yaml", ".yml")) and Path(t).is_file() else t for t in evaluation.tasks]
    return {"model": _model_identity(model), "eval": evaluation.model_copy(update={"tasks": tasks})}


@stage("evaluate", folder="eval", ingredients=_ingredients, packages=("lm_eval", "torch", "transformers"))
def evaluate(model: str, evaluation: EvalConfig, pipeline: PipelineConfig, *, out: Path, key: str) -> EvalRecord:
    """Score a model folder (or the bundled model's name) on the benchmarks; keep lm-eval's full record."""
    from qtuning.evaluation.runner import evaluate_checkpoint
    from qtuning.modeling import resolve_model_path

    log = get_run_logger()
    model_dir = resolve_model_path(ModelConfig(name=model))
    result = evaluate_checkpoint(model_dir, evaluation, out, log=log.info)
    return EvalRecord(
        key=key, produced_in=flow_run.id, model_dir=str(model_dir), work_dir=str(out),
        scores=result.scores, average=result.average, results_path=str(result.raw_results_path),
        samples_path=str(result.samples_path), seconds=result.seconds, task_seconds=result.task_seconds,
    )


def _metric_name(task: str, key: str) -> str | None:
    """lm-eval's 'acc,none' of qt_arc_easy -> 'eval/arc_easy/acc'; 'exact_match,last_number' keeps the filter."""
    metric, _, filt = key.partition(",")
    if metric.endswith("_stderr") or metric == "alias":
        return None
    short = task.removeprefix(TASK_PREFIX)
    return f"eval/{short}/{metric}" + ("" if filt in ("", "none") else f"_{filt}")


@task(name="log_evaluation", cache_policy=NO_CACHE)
def log_evaluation(run: RunRef, record: EvalRecord, evaluation: EvalConfig) -> None:
    """Per-benchmark metrics, lm-eval's results JSON and the per-sample table, in the run."""
    import pandas as pd

    from qtuning.evaluation.results import headline_stderrs

    results = json.loads(Path(record.results_path).read_text())
    metrics: dict[str, float] = {}
    for task_name, values in (results.get("results") or {}).items():
        for k, v in values.items():
            name = _metric_name(task_name, k)
            if name and isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[name] = float(v)
    metrics.update({f"eval/{b}/score": s for b, s in record.scores.items()})
    metrics.update({f"eval/{b}/score_stderr": s for b, s in headline_stderrs(results).items()})  # points, as the score
    metrics.update({"eval/average": record.average, "eval/seconds": record.seconds})
    metrics.update({f"eval/{b}/seconds": s for b, s in record.task_seconds.items()})
    log_metrics(run, metrics)
    log_params(run, {f"eval.{k}": v for k, v in evaluation.model_dump(mode="json").items()})
    log_artifact(run, record.results_path, "eval")
    samples = pd.read_json(record.samples_path, lines=True) if Path(record.samples_path).stat().st_size else pd.DataFrame()
    if len(samples):
        run.client.log_table(run.run_id, data=samples.astype({c: str for c in samples.columns if samples[c].dtype == object}), artifact_file="eval/samples.json")
        for bench, rows in samples.groupby("task"):
            yaml_path = TASKS_DIR / f"{TASK_PREFIX}{bench}.yaml"  # a bundled task's static YAML
            source = str(yaml_path if yaml_path.exists() else record.results_path)
            log_dataset(run, rows[["doc_id", "target"]].astype(str), name=f"eval-{bench}", source=source, context="eval")
    log_artifact(run, record.samples_path, "eval")
