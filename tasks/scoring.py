"""The static EU pass: where the base model puts every training sample on the Error-Uncertainty plane."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qtuning.config import ModelConfig, PipelineConfig
from tasks.caching import SCORE_MODULES, StageCache, model_fingerprint, runs_root, stage_key
from tasks.records import DataRecord, ScoresRecord
from tasks.tracking import RunRef, log_metrics, tmp_artifact


def _ingredients(data: DataRecord, model: ModelConfig, pipeline: PipelineConfig, entropy_scope: str = "response", seed: int = 0) -> dict:
    return {
        "data": data.fingerprint,
        "model": model_fingerprint(model),
        "seed": seed if model.random_init else None,  # only random weights depend on the seed
        "entropy_scope": entropy_scope,
        "runs": str(runs_root(pipeline.runs_dir)),
    }


def _out_dir(pipeline: PipelineConfig, key: str) -> Path:
    return runs_root(pipeline.runs_dir) / "scores" / key[:16]


def _outputs(data, model, pipeline, entropy_scope="response", seed=0, key="") -> list[Path]:
    return [_out_dir(pipeline, key) / "scores.parquet"]


CACHE = StageCache(ingredients=_ingredients, modules=SCORE_MODULES, packages=("torch", "transformers"), outputs=_outputs)


@task(name="score_eu", cache_policy=CACHE, persist_result=True)
def score_eu(data: DataRecord, model: ModelConfig, pipeline: PipelineConfig, entropy_scope: str = "response", seed: int = 0) -> ScoresRecord:
    """Score every sample's PPL and Ent under the base model (the training loop's scoring code, no grad)."""
    import datasets
    import torch

    from qtuning.modeling import load_model, load_tokenizer
    from qtuning.scoring import score_dataset

    log = get_run_logger()
    start = time.perf_counter()
    key = stage_key(_ingredients(data, model, pipeline, entropy_scope, seed), CACHE.modules, CACHE.packages, score_eu.fn)
    out = _out_dir(pipeline, key)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the same random weights the training run starts from (random_init)
    net = load_model(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    dataset = datasets.load_from_disk(data.path)
    scores = score_dataset(
        net, dataset, load_tokenizer(model).pad_token_id,
        batch_size=pipeline.score_batch_size, entropy_scope=entropy_scope, progress=pipeline.progress,
    )
    tmp = out / "scores.parquet.tmp"
    scores.to_parquet(tmp, index=False)
    tmp.replace(out / "scores.parquet")
    summary = {
        f"{col}_{name}": float(scores[col].quantile(q))
        for col in ("ppl", "ent") for name, q in (("p10", 0.1), ("median", 0.5), ("p90", 0.9))
    }
    seconds = time.perf_counter() - start
    log.info(f"EU pass over {len(scores)} samples in {seconds:.1f}s: median PPL {summary['ppl_median']:.2f}, "
             f"median Ent {summary['ent_median']:.3f} nats -> {out}")
    return ScoresRecord(
        key=key, produced_in=flow_run.id, path=str(out / "scores.parquet"), rows=len(scores),
        data_fingerprint=data.fingerprint, entropy_scope=entropy_scope, summary=summary, seconds=seconds,
    )


@task(name="log_scores", cache_policy=NO_CACHE)
def log_scores(run: RunRef, record: ScoresRecord, ratio: float | None, title: str = "EU plane") -> dict[str, float]:
    """The EU-plane scatter at `ratio` (quadrant thresholds, colours), quadrant shares and the scores table."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from qtuning.report import eu_plane_figure

    scores = pd.read_parquet(record.path)
    fig, shares = eu_plane_figure(scores, ratio, title=title)
    run.client.log_figure(run.run_id, fig, "eu/eu_plane.png")
    plt.close(fig)
    if shares:
        run.client.log_dict(run.run_id, shares, "eu/quadrant_shares.json")
        log_metrics(run, {f"eu/share_{k}": v for k, v in shares.items()})
    log_metrics(run, {f"eu/{k}": v for k, v in record.summary.items()} | {"eu/seconds": record.seconds})
    tmp_artifact(run, "eu/scores.csv", lambda p: scores.to_csv(p, index=False))
    return shares
