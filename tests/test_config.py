"""The config tree: YAML round trip, refusals that name the field, every shipped config valid."""

from pathlib import Path

import pytest

from qtuning.config import ConfigError, ExperimentConfig, load_yaml, validate, with_overrides

REPO = Path(__file__).resolve().parents[1]


def test_yaml_round_trip_is_exact(tmp_path):
    cfg = with_overrides(
        ExperimentConfig(),
        {"pruning.sample_ratio": 0.125, "pruning.lam": 0.3, "model.finetune": "lora", "training.max_steps": 7},
    )
    path = cfg.save(tmp_path / "run.yaml")
    again = ExperimentConfig.load(path)
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()


def _problems(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate(ExperimentConfig, raw, "run.yaml")
    return str(e.value)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"pruning": {"sample_ratio": 0}}, "pruning.sample_ratio"),
        ({"pruning": {"sample_ratio": 1.5}}, "pruning.sample_ratio"),
        ({"pruning": {"token_ratio": -0.1}}, "pruning.token_ratio"),
        ({"pruning": {"sample": "magic"}}, "pruning.sample"),
        ({"pruning": {"token": "attention"}}, "pruning.token"),
        ({"pruning": {"lam": 2}}, "pruning.lam"),
        ({"data": {"source": "/nonexistent/train.jsonl"}}, "data.source"),
        ({"training": {"micro_batch_size": 1}}, "pool"),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"training": {"lr": float("inf")}}, "training.lr"),
        ({"training": {"lr": 3.0}}, "training.lr"),
        ({"training": {"epochs": 1e9}}, "training.epochs"),
        ({"training": {"epochs": float("inf")}}, "training.epochs"),
        ({"pruning": {"lam": float("nan")}}, "pruning.lam"),
        ({"trainig": {}}, "trainig"),
        ({"pruning": {"sample_ratio": 0.25, "sample": "all"}}, "pruning.sample_ratio"),
        ({"model": {"config_overrides": {"num_hidden_layers": 2}}}, "model.config_overrides"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(raw, field):
    msg = _problems(raw)
    assert "run.yaml" in msg and field in msg


def test_all_problems_are_reported_at_once():
    msg = _problems({"pruning": {"sample_ratio": 2, "token_ratio": 0, "lam": -1}, "training": {"epochs": 0}})
    for field in ("pruning.sample_ratio", "pruning.token_ratio", "pruning.lam", "training.epochs"):
        assert field in msg


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="unknown field"):
        with_overrides(ExperimentConfig(), {"pruning.sample_rate": 0.5})


def test_full_data_arm_is_explicit():
    cfg = validate(ExperimentConfig, {"pruning": {"sample": "all", "token": "all", "sample_ratio": 1, "token_ratio": 1}})
    assert cfg.pruning.is_full_data and not cfg.pruning.needs_scores


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(ExperimentConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruning: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(ExperimentConfig, bad)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_config_is_valid(path):
    import yaml

    from qtuning.config import CompareConfig, SweepConfig

    raw = yaml.safe_load(path.read_text())
    cls = SweepConfig if "grid" in raw or "points" in raw else CompareConfig if "arms" in raw else ExperimentConfig
    load_yaml(cls, path)
