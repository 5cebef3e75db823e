"""The tables that end a flow: a comparison's arms side by side, a sweep's arms with their spread over seeds.

Besides MLflow, the comparison leaves three Prefect artifacts on the flow run: the table, a link to the MLflow
parent run (its UI page when the store is a server, else the store's file) and the pruned arms' migration figures.
"""

from __future__ import annotations

import math

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from qtuning.report import comparison_table, format_sweep_table, format_table, sweep_figure, sweep_table
from tasks.records import ArmResult, ComparisonResult, EvalRecord, SweepResult, TrainRecord
from tasks.selection import prefect_key
from tasks.tracking import RunRef, artifact_location, log_metrics, log_text, set_tags, tmp_artifact, ui_command, ui_url


@task(name="arm_result", cache_policy=NO_CACHE)
def arm_result(name: str, run: RunRef, evaluated: EvalRecord, trained: TrainRecord | None = None) -> ArmResult:
    """One row of the table from an arm's training and evaluation records."""
    import json
    from pathlib import Path

    from qtuning.config import ExperimentConfig, load_yaml
    from qtuning.evaluation.results import headline_stderrs
    from qtuning.train import HELDOUT_ROWS_FILE

    stderr = headline_stderrs(json.loads(Path(evaluated.results_path).read_text()))
    pruning = load_yaml(ExperimentConfig, trained.config_path).pruning if trained else None
    return ArmResult(
        name=name,
        run_id=run.run_id,
        scores=evaluated.scores,
        average=evaluated.average,
        loss_tokens=int(trained.summary["loss_tokens"]) if trained else 0,
        loop_seconds=float(trained.summary["loop_seconds"]) if trained else 0.0,
        final_dir=trained.final_dir if trained else None,
        eval_results_path=evaluated.results_path,
        eval_samples_path=evaluated.samples_path,
        stderr=stderr,
        budget=pruning.budget if pruning is not None and not pruning.is_full_data else None,
        heldout_loss=trained.summary.get("heldout_loss") if trained else None,
        budget_tokens=trained.summary.get("budget_tokens") if trained else None,
        rules=f"{pruning.sample}/{pruning.token}" if pruning is not None else None,
        kept_rows=trained.summary["samples_trained"] / trained.summary["samples_seen"]
        if trained and trained.summary.get("samples_seen") else None,
        heldout_rows_path=str(Path(trained.output_dir) / HELDOUT_ROWS_FILE)
        if trained and (Path(trained.output_dir) / HELDOUT_ROWS_FILE).exists() else None,
        selection_path=str(Path(trained.output_dir) / "selection.parquet")
        if trained and (Path(trained.output_dir) / "selection.parquet").exists() else None,
        model_uri=run.client.get_run(run.run_id).data.tags.get("qtuning.model_uri"),
    )


@task(name="compare_arms", cache_policy=NO_CACHE)
def compare_arms(parent: RunRef, arms: list[ArmResult], baseline: str) -> ComparisonResult:
    """Build the table, log it to the parent run (text, Markdown, MLflow table, metrics) and return it."""
    log = get_run_logger()
    table = comparison_table([{**a.model_dump(), "samples": _samples(a.eval_samples_path)} for a in arms], baseline=baseline)
    text, markdown = format_table(table), format_table(table, markdown=True)
    log.info("comparison:\n" + text)
    rows = []
    for a in arms:
        r = table.loc[a.name]
        row = {"name": a.name, "run_id": a.run_id, "scores": dict(a.scores), **dict(a.scores),
               "average": a.average, "ratio_to_full": _num(r["ratio_to_full"]),
               "loss_tokens": a.loss_tokens, "loop_seconds": a.loop_seconds, "final_dir": a.final_dir}
        rows.append(row)
        # the difference to the baseline and its interval (paired bootstrap), where both have per-item results
        diffs = {c: _num(r[c]) for c in table.columns if c.endswith(("diff", "diff_lo", "diff_hi", "diff_p", "diff_p_holm"))}
        row.update(stderr=dict(a.stderr), budget=a.budget, **diffs)
        if "outside_noise" in table.columns and diffs.get("diff") is not None:
            row["outside_noise"] = bool(r["outside_noise"])
        if a.heldout_loss is not None:
            row["heldout_loss"] = a.heldout_loss
            log_metrics(parent, {f"compare/{a.name}/heldout_loss": a.heldout_loss})
        log_metrics(parent, {f"compare/{a.name}/average": a.average, f"compare/{a.name}/ratio_to_full": row["ratio_to_full"] or math.nan,
                             f"compare/{a.name}/loss_tokens": a.loss_tokens, f"compare/{a.name}/loop_seconds": a.loop_seconds,
                             **{f"compare/{a.name}/{b}": s for b, s in a.scores.items()},
                             **{f"compare/{a.name}/{b}_stderr": s for b, s in a.stderr.items()},
                             **{f"compare/{a.name}/{c}": v for c, v in diffs.items() if v is not None},
                             **({f"compare/{a.name}/outside_noise": float(row["outside_noise"])} if "outside_noise" in row else {})})
    log_text(parent, text + "\n", "comparison/table.txt")
    log_text(parent, markdown + "\n", "comparison/table.md")
    parent.client.log_table(parent.run_id, data=table.reset_index(), artifact_file="comparison/table.json")
    set_tags(parent, {"mlflow.note.content": f"Comparison of {len(arms)} arms (baseline: {baseline})\n\n{markdown}"})
    figures = _migration_figures(parent, arms)
    create_table_artifact(key=prefect_key("comparison", parent.name), table=_table_rows(table),
                          description=f"{parent.name}: arms side by side (baseline {baseline})")
    create_link_artifact(key=prefect_key("mlflow", parent.name), link=ui_url(parent),
                         link_text=f"MLflow parent run {parent.run_id} ({parent.name})",
                         description="the comparison in MLflow: table, EU planes, migration figures, the arms' runs")
    if figures:
        create_markdown_artifact(
            key=prefect_key("migration", parent.name), description=f"{parent.name}: quadrant migration of the pruned arms",
            markdown="\n".join(f"- {arm}: [{f}]({artifact_location(parent, f)})" for arm, f in figures))
    return ComparisonResult(
        name=parent.name, parent_run_id=parent.run_id, experiment_id=parent.experiment_id, tracking_uri=parent.tracking_uri,
        ui_command=ui_command(parent.tracking_uri), arms=rows, table=text, table_markdown=markdown,
    )


def _migration_figures(parent: RunRef, arms: list[ArmResult]) -> list[tuple[str, str]]:
    """Each triaged arm's quadrant migration figure, on the parent run too (selection/<arm>/migration.png)."""
    import pandas as pd

    from qtuning.report import migration_figure
    from tasks.selection import save_figure

    out = []
    for a in arms:
        if not a.selection_path:
            continue
        log = pd.read_parquet(a.selection_path)
        if not ((log["quadrant"] > 0) & log["ppl"].notna()).any():
            continue
        fig, summary = migration_figure(log, title=f"{a.name}: how samples move between quadrants")
        name = f"selection/{a.name}/migration.png"
        tmp_artifact(parent, name, lambda p: save_figure(fig, p))
        log_metrics(parent, {f"compare/{a.name}/q2_to_q3": summary["q2_to_q3"]})
        out.append((a.name, name))
    return out


def _table_rows(table) -> list[dict]:
    """The comparison table as Prefect table rows (numbers rounded, NaN as None)."""
    rows = table.reset_index().round(4).to_dict(orient="records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def _samples(path: str | None):
    """An arm's per-item results (task, doc_id, correct), or None where it has none to pair."""
    import pandas as pd
    from pathlib import Path

    if not path or not Path(path).exists() or not Path(path).stat().st_size:
        return None
    return pd.read_json(path, lines=True)[["task", "doc_id", "correct"]]


def _heldout(path: str | None):
    """An arm's final held-out measurement row by row (sample_id, nll, tokens), or None where it has none."""
    import pandas as pd
    from pathlib import Path

    if not path or not Path(path).exists() or not Path(path).stat().st_size:
        return None
    return pd.read_json(path, lines=True, dtype={"sample_id": str})[["sample_id", "nll", "tokens"]]


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


@task(name="summarize_sweep", cache_policy=NO_CACHE)
def summarize_sweep(parent: RunRef, results: list[tuple[int, ArmResult]], baseline: str = "full") -> SweepResult:
    """Aggregate the (seed, arm) results; log the table and the plot to MLflow and to Prefect's artifacts."""
    rows = [{**r.model_dump(), "seed": seed} for seed, r in results]
    table = sweep_table([{**row, "samples": _samples(row.get("eval_samples_path")), "heldout": _heldout(row.get("heldout_rows_path"))}
                         for row in rows], baseline=baseline)
    text, markdown = format_sweep_table(table), format_sweep_table(table, markdown=True)
    get_run_logger().info("sweep:\n" + text)
    log_text(parent, text + "\n", "sweep/table.txt")
    log_text(parent, markdown + "\n", "sweep/table.md")
    parent.client.log_table(parent.run_id, data=table.reset_index(), artifact_file="sweep/table.json")
    tmp_artifact(parent, "sweep/score_vs_tokens.png", lambda p: sweep_figure(table, baseline).savefig(p, dpi=120))
    for arm, r in table.iterrows():
        diffs = {f"sweep/{arm}/{prefix}{c}": float(r[prefix + c]) for prefix in ("", "heldout_")
                 for c in ("diff", "diff_lo", "diff_hi", "diff_p", "diff_p_holm")
                 if prefix + c in r.index and not math.isnan(r[prefix + c])}
        heldout = {f"sweep/{arm}/{c}": float(r[c]) for c in ("heldout_loss", "heldout_loss_sd") if c in r.index and not math.isnan(r[c])}
        log_metrics(parent, {f"sweep/{arm}/average": r["average"], f"sweep/{arm}/average_sd": r["average_sd"], **heldout,
                             f"sweep/{arm}/ratio_to_full": r["ratio_to_full"], f"sweep/{arm}/loss_tokens": r["loss_tokens"],
                             **diffs})
    set_tags(parent, {"mlflow.note.content": f"Sweep of {len(table)} arms x {int(table['seeds'].max())} seed(s)\n\n{markdown}"})
    create_markdown_artifact(
        key="sweep-table", markdown=f"# Sweep {parent.name}\n\n{markdown}\n\nPlot: MLflow run {parent.run_id}, "
        "artifact `sweep/score_vs_tokens.png`.", description="mean (± sd over seeds) per arm",
    )
    create_table_artifact(key="sweep-rows", table=_table_rows(table))
    return SweepResult(
        name=parent.name, parent_run_id=parent.run_id, tracking_uri=parent.tracking_uri,
        ui_command=ui_command(parent.tracking_uri), arms=table.reset_index().to_dict(orient="records"),
        runs=rows, table=text, table_markdown=markdown,
    )
