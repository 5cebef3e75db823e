"""What an arm learned, per sample: its selection log and the figures and data set built from it, in MLflow and
linked from the Prefect run."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from qtuning.config import ExperimentConfig
from tasks.records import TrainRecord
from tasks.tracking import RunRef, artifact_location, log_artifact, log_metrics, tmp_artifact


def prefect_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from names such as arm names."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


@task(name="log_selection", cache_policy=NO_CACHE)
def log_selection(run: RunRef, trained: TrainRecord, config: ExperimentConfig, mode: str) -> list[str]:
    """The arm's `selection.parquet`; where pools were triaged, the quadrant migration figure (and its counts as
    metrics) and the EU plane at the first, middle and last step; for a dynamic pruned arm the kept set as a data
    set to train on again (ids usable as data.subset, and the rows as JSONL). Returns the artifact paths, which a
    markdown artifact of the Prefect run links."""
    from qtuning.data import write_rows
    from qtuning.report import eu_plane_at_steps, kept_ids, migration_figure
    from qtuning.selection import FILE, read_selection

    path = Path(trained.output_dir) / FILE
    if not path.exists():
        return []
    log = read_selection(path)
    log_artifact(run, path, "selection")
    files = [f"selection/{FILE}"]
    if log["ppl"].notna().any() and (log["quadrant"] > 0).any():  # a triage ran: quadrants mean something
        fig, summary = migration_figure(log, title=f"{config.name}: how samples move between quadrants")
        tmp_artifact(run, "selection/migration.png", lambda p: save_figure(fig, p))
        run.client.log_dict(run.run_id, summary, "selection/migration.json")
        log_metrics(run, {f"selection/{k}": v for k, v in summary.items()})
        tmp_artifact(run, "selection/eu_plane_steps.png",
                     lambda p: save_figure(eu_plane_at_steps(log, title=f"{config.name}: EU plane during training"), p))
        files += ["selection/migration.png", "selection/migration.json", "selection/eu_plane_steps.png"]
    if mode == "dynamic" and not config.pruning.is_full_data:
        for which, name in (("any", "kept_ids.txt"), ("last_epoch", "kept_ids_last_epoch.txt")):
            ids = kept_ids(log, which)
            tmp_artifact(run, f"selection/{name}", lambda p, ids=ids: p.write_text("".join(i + "\n" for i in ids)))
            files.append(f"selection/{name}")
        tmp_artifact(run, "selection/kept_rows.jsonl", lambda p: write_rows(config.data, kept_ids(log, "any"), p))
        files.append("selection/kept_rows.jsonl")
    links = "\n".join(f"- [{f}]({artifact_location(run, f)})" for f in files)
    create_markdown_artifact(
        key=prefect_key("selection", config.name), description=f"{config.name}: what the model learned, per sample",
        markdown=f"# {config.name}: selection log\n\nMLflow run `{run.run_id}` ({run.name}).\n\n{links}\n\n"
        "`kept_ids.txt` is a `data.subset` file (the rows kept at least once); `kept_rows.jsonl` the rows "
        "themselves (set `data.id_field: id` to keep their ids).",
    )
    return files
