"""The pruning plan of an arm: dynamic (recorded; the training loop re-scores every pool) or static (applied
once here from the base model's EU scores: the kept sample ids the arm trains on)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qtuning.config import ExperimentConfig, PipelineConfig
from tasks.stage import model_fingerprint, recipe, runs_root, stage
from tasks.records import DataRecord, PlanRecord, ScoresRecord
from tasks.tracking import RunRef, log_artifact, log_metrics, log_params


def _ingredients(config: ExperimentConfig, mode: str, data: DataRecord, scores: ScoresRecord, pipeline: PipelineConfig,
                 static_batch: str = "scaled") -> dict:
    return {
        "config": recipe(config, keep_name=True),
        "mode": mode,
        "static_batch": static_batch if mode == "static" else None,
        "data": data.fingerprint,
        "scores": scores.key,
        "model": model_fingerprint(config.model),
        "token_view_samples": pipeline.token_view_samples,
        "world": pipeline.num_processes,
    }


def _folder(config: ExperimentConfig, mode: str, data, scores, pipeline: PipelineConfig, static_batch: str = "scaled", *, key: str) -> Path:
    return runs_root(pipeline.runs_dir) / "plans" / f"{config.name}-{key[:12]}"


@stage("prune", ingredients=_ingredients, folder=_folder, packages=("torch", "transformers", "matplotlib"))
def prune(config: ExperimentConfig, mode: str, data: DataRecord, scores: ScoresRecord, pipeline: PipelineConfig,
          static_batch: str = "scaled", *, out: Path, key: str) -> PlanRecord:
    """Plan an arm's two-stage pruning; in static mode also triage the whole set once and write the kept sample ids
    (the arm then trains on the prepared data set narrowed to them)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from qtuning.planning import pruning_plan, static_experiment, static_selection, write_ids
    from qtuning.report import eu_plane_figure, pruned_tokens_html

    log = get_run_logger()
    p = config.pruning
    table = pd.read_parquet(scores.path)

    plan = pruning_plan(config, table, mode, world=pipeline.num_processes)
    ratio = p.sample_ratio if p.sample == "qtuning" else None
    fig, shares = eu_plane_figure(table, ratio, title=f"{config.name}: base model")
    fig.savefig(out / "eu_plane.png")
    plt.close(fig)

    experiment, ids_path, selection_path = config, None, None
    if mode == "static":
        selection = static_selection(table, p)
        selection_path = out / "static_selection.csv"
        selection.to_csv(selection_path, index=False)
        ids_path = write_ids(list(selection.loc[selection["keep"], "sample_id"]), out / "kept_ids.txt")
        experiment = static_experiment(config, ids_path, static_batch)
        kept = int(selection["keep"].sum())
        plan.update(static_rows=kept, static_batch=static_batch, static_micro_batch_size=experiment.training.micro_batch_size,
                    static_pool_size=experiment.pool_size)
        log.info(f"static triage keeps {kept}/{len(table)} rows -> {ids_path}")

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
        static_ids_path=str(ids_path) if ids_path else None,
        static_selection_path=str(selection_path) if selection_path else None,
    )


def _token_view(config: ExperimentConfig, data: DataRecord, table, n: int) -> list[dict]:
    import torch

    from qtuning.data import SFTData
    from qtuning.modeling import load_model, load_tokenizer
    from qtuning.planning import token_view

    torch.manual_seed(config.training.seed)
    model = load_model(config.model)
    return token_view(
        model, load_tokenizer(config.model), SFTData.load(data.path).dataset, table, config.pruning,
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
    if record.static_ids_path:
        import pandas as pd

        log_artifact(run, record.static_selection_path, "pruning")
        log_artifact(run, record.static_ids_path, "pruning")
        selection = pd.read_csv(record.static_selection_path)
        kept = selection[selection["keep"]][["sample_id", "quadrant"]]
        log_dataset(run, kept, name=f"{record.arm}-static", source=record.static_ids_path, context="train")
