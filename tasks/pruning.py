"""The pruning plan of an arm: dynamic (recorded; the training loop re-scores every pool) or static (applied
once here from the base model's EU scores, producing the pruned data set the arm trains on)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qtuning.config import ExperimentConfig, PipelineConfig
from tasks.caching import PRUNE_MODULES, StageCache, model_fingerprint, runs_root, stage_key
from tasks.records import DataRecord, PlanRecord, ScoresRecord
from tasks.tracking import RunRef, log_artifact, log_metrics, log_params


def _ingredients(config: ExperimentConfig, mode: str, data: DataRecord, scores: ScoresRecord, pipeline: PipelineConfig) -> dict:
    return {
        "config": config.model_copy(update={"training": config.training.model_copy(update={"output_dir": ""})}),
        "mode": mode,
        "data": data.fingerprint,
        "scores": scores.key,
        "model": model_fingerprint(config.model),
        "token_view_samples": pipeline.token_view_samples,
        "world": pipeline.num_processes,
        "runs": str(runs_root(pipeline.runs_dir)),
    }


def _out_dir(pipeline: PipelineConfig, name: str, key: str) -> Path:
    return runs_root(pipeline.runs_dir) / "plans" / f"{name}-{key[:12]}"


def _outputs(config, mode, data, scores, pipeline, key) -> list[Path]:
    out = _out_dir(pipeline, config.name, key)
    return [out / "plan.json"] + ([out / "train.jsonl"] if mode == "static" else [])


CACHE = StageCache(ingredients=_ingredients, modules=PRUNE_MODULES, packages=("torch", "transformers", "matplotlib"), outputs=_outputs)


@task(name="prune", cache_policy=CACHE, persist_result=True)
def prune(config: ExperimentConfig, mode: str, data: DataRecord, scores: ScoresRecord, pipeline: PipelineConfig) -> PlanRecord:
    """Plan an arm's two-stage pruning; in static mode also write the pruned data set it trains on."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from qtuning.pipeline import pruning_plan, static_experiment, static_selection, write_static_dataset
    from qtuning.report import eu_plane_figure, pruned_tokens_html

    log = get_run_logger()
    key = stage_key(_ingredients(config, mode, data, scores, pipeline), CACHE.modules, CACHE.packages, prune.fn)
    out = _out_dir(pipeline, config.name, key)
    out.mkdir(parents=True, exist_ok=True)
    p = config.pruning
    table = pd.read_parquet(scores.path)

    plan = pruning_plan(config, table, mode, world=pipeline.num_processes)
    ratio = p.sample_ratio if p.sample == "qtuning" else None
    fig, shares = eu_plane_figure(table, ratio, title=f"{config.name}: base model")
    fig.savefig(out / "eu_plane.png")
    plt.close(fig)

    experiment, static_path, selection_path = config, None, None
    if mode == "static":
        selection = static_selection(table, p)
        selection_path = out / "static_selection.csv"
        selection.to_csv(selection_path, index=False)
        static_path = out / "train.jsonl"
        kept = write_static_dataset(config, list(selection.loc[selection["keep"], "sample_id"]), static_path)
        experiment = static_experiment(config, static_path)
        plan.update(static_rows=kept, static_micro_batch_size=experiment.training.micro_batch_size)
        log.info(f"static triage keeps {kept}/{len(table)} rows -> {static_path}")

    view_path = None
    if p.token != "all" and pipeline.token_view_samples:
        samples = _token_view(config, data, table, pipeline.token_view_samples)
        if samples:
            view_path = out / "pruned_tokens.html"
            note = (f"{config.name}: {p.token} token rule keeps ceil({p.token_ratio:g} x T) of each row's T response tokens, "
                    f"scored by the base model (lambda={p.lam:g}). Dynamic arms re-score with the model being trained.")
            view_path.write_text(pruned_tokens_html(samples, title=f"Pruned tokens: {config.name}", note=note), encoding="utf-8")

    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    log.info(f"{config.name} ({mode}): {p.sample}/{p.token} at {p.sample_ratio:g} x {p.token_ratio:g}, "
             f"{plan.get('optimizer_steps')} steps of {plan['kept_per_pool']}/{plan['pool_size']} rows")
    return PlanRecord(
        key=key, produced_in=flow_run.id, arm=config.name, mode=mode, experiment=experiment,
        plan_path=str(out / "plan.json"), figure_path=str(out / "eu_plane.png"), shares=shares,
        token_view_path=str(view_path) if view_path else None,
        static_data_path=str(static_path) if static_path else None,
        static_selection_path=str(selection_path) if selection_path else None,
    )


def _token_view(config: ExperimentConfig, data: DataRecord, table, n: int) -> list[dict]:
    import datasets
    import torch

    from qtuning.modeling import load_model, load_tokenizer
    from qtuning.pipeline import token_view

    torch.manual_seed(config.training.seed)
    model = load_model(config.model)
    return token_view(
        model, load_tokenizer(config.model), datasets.load_from_disk(data.path), table, config.pruning,
        n_samples=n, chunk_tokens=config.training.score_chunk_tokens, seed=config.training.seed,
    )


@task(name="log_plan", cache_policy=NO_CACHE)
def log_plan(run: RunRef, record: PlanRecord) -> None:
    """The plan (JSON), the arm's EU plane, the pruned-token view and, for static arms, the pruned data set."""
    from tasks.tracking import log_dataset

    log_artifact(run, record.plan_path, "pruning")
    log_artifact(run, record.figure_path, "eu")
    if record.token_view_path:
        log_artifact(run, record.token_view_path, "pruning")
    if record.shares:
        run.client.log_dict(run.run_id, record.shares, "eu/quadrant_shares.json")
        log_metrics(run, {f"eu/share_{k}": v for k, v in record.shares.items()})
    plan = json.loads(Path(record.plan_path).read_text())
    log_params(run, {"pruning.mode": record.mode, "plan.kept_per_pool": plan["kept_per_pool"], "plan.optimizer_steps": plan.get("optimizer_steps")})
    if "expected_loss_token_share" in plan:
        log_metrics(run, {"plan/expected_loss_token_share": plan["expected_loss_token_share"]})
    if record.static_data_path:
        import pandas as pd

        log_artifact(run, record.static_selection_path, "pruning")
        selection = pd.read_csv(record.static_selection_path)
        kept = selection[selection["keep"]][["sample_id", "quadrant"]]
        log_dataset(run, kept, name=f"{record.arm}-static", source=record.static_data_path, context="train")
