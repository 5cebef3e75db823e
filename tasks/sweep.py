"""The sweep's summary: mean and spread over seeds per arm, and score against tokens trained."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from qtuning.sweep import format_sweep_table, sweep_figure, sweep_table
from tasks.records import ArmResult, SweepResult
from tasks.tracking import RunRef, log_metrics, log_text, set_tags, tmp_artifact, ui_command


@task(name="summarize_sweep", cache_policy=NO_CACHE)
def summarize_sweep(parent: RunRef, results: list[tuple[int, ArmResult]], baseline: str = "full") -> SweepResult:
    """Aggregate the (seed, arm) results; log the table and the plot to MLflow and to Prefect's artifacts."""
    rows = [{**r.model_dump(), "seed": seed} for seed, r in results]
    table = sweep_table(rows, baseline=baseline)
    text, markdown = format_sweep_table(table), format_sweep_table(table, markdown=True)
    get_run_logger().info("sweep:\n" + text)
    log_text(parent, text + "\n", "sweep/table.txt")
    log_text(parent, markdown + "\n", "sweep/table.md")
    parent.client.log_table(parent.run_id, data=table.reset_index(), artifact_file="sweep/table.json")
    tmp_artifact(parent, "sweep/score_vs_tokens.png", lambda p: sweep_figure(table, baseline).savefig(p, dpi=120))
    for arm, r in table.iterrows():
        log_metrics(parent, {f"sweep/{arm}/average": r["average"], f"sweep/{arm}/average_sd": r["average_sd"],
                             f"sweep/{arm}/ratio_to_full": r["ratio_to_full"], f"sweep/{arm}/loss_tokens": r["loss_tokens"]})
    set_tags(parent, {"mlflow.note.content": f"Sweep of {len(table)} arms x {int(table['seeds'].max())} seed(s)\n\n{markdown}"})
    create_markdown_artifact(
        key="sweep-table", markdown=f"# Sweep {parent.name}\n\n{markdown}\n\nPlot: MLflow run {parent.run_id}, "
        "artifact `sweep/score_vs_tokens.png`.", description="mean (± sd over seeds) per arm",
    )
    create_table_artifact(key="sweep-rows", table=table.reset_index().round(4).to_dict(orient="records"))
    return SweepResult(
        name=parent.name, parent_run_id=parent.run_id, tracking_uri=parent.tracking_uri,
        ui_command=ui_command(parent.tracking_uri), arms=table.reset_index().to_dict(orient="records"),
        runs=rows, table=text, table_markdown=markdown,
    )
