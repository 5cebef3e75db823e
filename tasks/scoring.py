"""The static EU pass: where the base model puts every training sample on the Error-Uncertainty plane."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qtuning.config import ModelConfig, PipelineConfig
from tasks.stage import model_fingerprint, stage
from tasks.records import DataRecord, ScoresRecord
from tasks.tracking import RunRef, log_metrics, tmp_artifact


def _ingredients(data: DataRecord, model: ModelConfig, pipeline: PipelineConfig, entropy_scope: str = "response", seed: int = 0) -> dict:
    return {
        "data": data.fingerprint,
        "model": model_fingerprint(model),
        "seed": seed if model.random_init else None,  # only random weights depend on the seed
        "entropy_scope": entropy_scope,
        "batch_size": pipeline.score_batch_size,
    }


@stage("score_eu", folder="scores", ingredients=_ingredients, packages=("torch", "transformers"))
def score_eu(data: DataRecord, model: ModelConfig, pipeline: PipelineConfig, entropy_scope: str = "response", seed: int = 0,
             *, out: Path, key: str) -> ScoresRecord:
    """Score every sample's PPL and Ent under the base model (the training loop's scoring code, no grad)."""
    import torch

    from qtuning.data import SFTData
    from qtuning.modeling import load_model, load_tokenizer
    from qtuning.scoring import score_dataset

    log = get_run_logger()
    start = time.perf_counter()
    torch.manual_seed(seed)  # the same random weights the training run starts from (random_init)
    net = load_model(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    dataset = SFTData.load(data.path).dataset
    scores = score_dataset(
        net, dataset, load_tokenizer(model).pad_token_id,
        batch_size=pipeline.score_batch_size, entropy_scope=entropy_scope, progress=pipeline.progress,
    )
    scores.to_parquet(out / "scores.parquet", index=False)
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
