"""What the tasks return: small, picklable records of paths and numbers (never models or tensors).

Cached tasks persist these in Prefect's result storage; `produced_in` is the flow run that computed a
record, so the logging tasks can tell a fresh result from one replayed out of the cache.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from qtuning.config import DataConfig, ExperimentConfig, ModelConfig


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str = Field(description="The cache key the record was computed under (names its output folder).")
    produced_in: str | None = Field(None, description="Prefect flow run id that computed it.")
    root: str | None = Field(None, description="The runs folder its paths were written under (stage.relocated).")


class DataRecord(Record):
    """A tokenized training set on disk (datasets.save_to_disk)."""

    path: str
    data: DataConfig
    model: ModelConfig  # whose tokenizer and chat template
    fingerprint: str  # qtuning.data's sha256 of source, config and tokenizer
    source: str  # the resolved source (file path or hub id)
    rows: int
    skipped: dict[str, int] = {}
    truncated_rows: int = 0  # rows kept but cut to data.max_length
    tokens: int
    response_tokens: int
    heldout_rows: int = 0  # rows held out of training (data.eval_rows / data.eval_source), in dataset/heldout/
    seconds: float


class ScoresRecord(Record):
    """The static EU pass of the base model over a data set: one row per sample (parquet)."""

    path: str
    rows: int
    data_fingerprint: str
    entropy_scope: str
    summary: dict[str, float]  # medians and quantiles of ppl and ent
    seconds: float


class PlanRecord(Record):
    """An arm's pruning plan, and the exact run it trains (for static arms: on the pruned data set)."""

    arm: str
    mode: str
    experiment: ExperimentConfig
    plan_path: str
    figure_path: str
    shares: dict[str, float] = {}
    token_view_path: str | None = None
    static_ids_path: str | None = None  # static arms: the kept sample ids (the run's data.subset)
    static_selection_path: str | None = None


class TrainRecord(Record):
    """A finished training run: its folder (config, metrics.jsonl, checkpoints/, final/) and summary."""

    name: str
    output_dir: str
    final_dir: str
    config_path: str
    metrics_path: str
    summary: dict[str, Any]
    wall_seconds: float
    resumed: bool = False


class EvalRecord(Record):
    """lm-eval's verdict on one model folder."""

    model_dir: str
    work_dir: str
    scores: dict[str, float]  # benchmark -> headline score, percent
    average: float
    results_path: str
    samples_path: str
    seconds: float
    task_seconds: dict[str, float] = {}


class ArmResult(BaseModel):
    """One row of the comparison, with where everything about it lives."""

    model_config = ConfigDict(frozen=True)

    name: str
    run_id: str
    scores: dict[str, float]
    average: float
    loss_tokens: int
    loop_seconds: float
    final_dir: str | None = None
    eval_results_path: str | None = None
    eval_samples_path: str | None = None  # per-item correctness (task, doc_id, correct): the paired bootstrap's input
    stderr: dict[str, float] = {}  # benchmark -> lm-eval's standard error of the score, points
    budget: str | None = None  # the arm's pruning.budget (own | equal_tokens); None for full data and zero-shot
    budget_tokens: int | None = None  # equal_tokens: the loss tokens Q-Tuning would have trained on the arm's pools
    rules: str | None = None  # "<sample>/<token>" of the arm's pruning (None for zero-shot)
    kept_rows: float | None = None  # its sample budget as spent: rows trained / rows its pools held
    heldout_loss: float | None = None  # mean NLL per response token of the held-out rows after training (None: no split)
    heldout_rows_path: str | None = None  # the same, row by row (sample_id, nll, tokens): what a sweep resamples
    selection_path: str | None = None  # the arm's selection log (selection.parquet), for the parent run's figures
    model_uri: str | None = None  # the logged model (pipeline.log_model), for pipeline.register_best


class ComparisonResult(BaseModel):
    """The comparison table, the MLflow parent run, and the command that opens the UI on it."""

    model_config = ConfigDict(frozen=True)

    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    ui_command: str
    arms: list[dict[str, Any]]  # rows of the table (name, scores, per-benchmark columns, average, ratio_to_full, ...)
    table: str  # the table as aligned text
    table_markdown: str


class SweepResult(BaseModel):
    """A sweep's aggregated table (one row per arm, mean and spread over seeds) and its MLflow parent run."""

    model_config = ConfigDict(frozen=True)

    name: str
    parent_run_id: str
    tracking_uri: str
    ui_command: str
    arms: list[dict[str, Any]]  # aggregated rows: arm, per-benchmark means, average, average_sd, ratio_to_full, ...
    runs: list[dict[str, Any]]  # one per (arm, seed)
    table: str
    table_markdown: str
