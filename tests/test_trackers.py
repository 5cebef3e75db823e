"""training.log_with: accelerate's trackers beside metrics.jsonl (tensorboard, wandb, ...), refused when missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qtuning.config import DataConfig, ExperimentConfig, PruningConfig, TrainingConfig
from qtuning.modeling import tiny_model_config
from qtuning.train import train


def cfg(tmp_path: Path, log_with: list[str]) -> ExperimentConfig:
    return ExperimentConfig(
        name="trackers", model=tiny_model_config(), data=DataConfig(source="arc", limit=8, max_length=96),
        pruning=PruningConfig(sample="all", token="all", sample_ratio=1.0, token_ratio=1.0),
        training=TrainingConfig(micro_batch_size=4, max_steps=2, output_dir=str(tmp_path / "out"), log_with=log_with),
    )


def test_unknown_tracker_names_are_refused():
    with pytest.raises(ValueError, match="log_with"):
        TrainingConfig(log_with=["mlflow"])  # the pipeline's own record, not an accelerate tracker here
    with pytest.raises(ValueError, match="log_with"):
        TrainingConfig(log_with=["tensorbored"])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_a_tracker_that_is_not_installed_stops_the_run_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train(cfg(tmp_path, ["tensorboard"]), progress=False, save=False)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_receives_the_step_metrics(tmp_path):
    train(cfg(tmp_path, ["tensorboard"]), progress=False, save=False)
    assert list(Path(tmp_path, "out").rglob("events.out.tfevents.*"))
