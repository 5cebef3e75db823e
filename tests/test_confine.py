"""Deployment parameters confined: run names cannot climb out of folders, and with $QTUNING_ALLOWED_ROOTS set
every path a config names must lie inside an allowed root (links followed), checked before a flow does any work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qtuning.config import CompareConfig, ConfigError, EvalConfig, ExperimentConfig, ModelConfig, PipelineConfig, SweepConfig
from qtuning.confine import ROOTS_ENV, check_confined, confinement_problems

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("cls", [ExperimentConfig, CompareConfig, SweepConfig])
@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", ""])
def test_names_that_would_leave_their_folder_are_refused(cls, name):
    with pytest.raises(ValidationError, match="name"):
        cls(name=name)


@pytest.fixture
def roots(tmp_path, monkeypatch):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    monkeypatch.setenv(ROOTS_ENV, str(allowed))
    return allowed, outside


def test_paths_outside_the_roots_are_refused_all_at_once(roots):
    allowed, outside = roots
    secret = outside / "secret.txt"
    secret.write_text(TEMPLATE)
    task = outside / "evil.yaml"
    task.write_text("task: evil\n")
    (allowed / "link.txt").symlink_to(secret)  # inside by name, outside by what it is
    cfg = ExperimentConfig(model=ModelConfig(chat_template=str(allowed / "link.txt")))
    evaluation = EvalConfig(tasks=["qt_arc_easy", "hellaswag", str(task)])
    pipeline = PipelineConfig(runs_dir=str(outside / "runs"))
    with pytest.raises(ConfigError) as e:
        check_confined(config=cfg, evaluation=evaluation, pipeline=pipeline)
    msg = str(e.value)
    for field in ("config.model.chat_template", "evaluation.tasks[2]", "pipeline.runs_dir", "config.training.output_dir"):
        assert field in msg
    assert "qt_arc_easy" not in msg and "hellaswag" not in msg  # shipped and registry tasks are not paths
    assert ROOTS_ENV in msg


def test_paths_inside_the_roots_templates_presets_and_hub_ids_pass(roots):
    allowed, _ = roots
    (allowed / "chat.jinja").write_text(TEMPLATE)
    cfg = ExperimentConfig.model_validate({
        "model": {"name": "org/some-model", "chat_template": str(allowed / "chat.jinja")},
        "data": {"source": "sharegpt"},
        "training": {"output_dir": str(allowed / "runs" / "x")},
    })
    problems = confinement_problems(
        {"config": cfg, "evaluation": EvalConfig(), "pipeline": PipelineConfig(runs_dir=str(allowed / "runs"))},
        [allowed.resolve()],
    )
    assert problems == []
    inline = ExperimentConfig(model=ModelConfig(chat_template=TEMPLATE), training={"output_dir": str(allowed)})
    assert confinement_problems({"config": inline}, [allowed.resolve()]) == []


def test_nothing_is_confined_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    check_confined(evaluation=EvalConfig(tasks=[str(tmp_path / "anything.yaml")]), pipeline=PipelineConfig(runs_dir="/"))


def test_a_flow_refuses_its_parameters_before_any_work(roots):
    """The experiment flow's body checks first: called as the function Prefect runs, it raises before a task or
    a run exists."""
    from flows.experiment import experiment

    _, outside = roots
    with pytest.raises(ConfigError, match="evaluation.tasks"):
        experiment.fn(ExperimentConfig(), EvalConfig(tasks=[str(outside / "x.yaml")]), PipelineConfig())


def test_a_password_in_a_tracking_uri_parameter_is_refused_with_where_it_belongs(monkeypatch):
    """Prefect stores a flow's parameters (and its UI shows them): a tracking URI with a password sent through the
    API is refused, confined or not; `qtuning run` moves the password to the environment before it calls a flow."""
    from qtuning.config import CompareConfig

    monkeypatch.delenv(ROOTS_ENV, raising=False)
    for uri in ("http://admin:s3cret@mlflow.example:5000", "postgresql://mlflow:s3cret@db/mlflow"):
        with pytest.raises(ConfigError) as err:
            check_confined(config=CompareConfig(pipeline=PipelineConfig(tracking_uri=uri)))
        assert "config.pipeline.tracking_uri carries a password" in str(err.value) and "s3cret" not in str(err.value)
        assert "MLFLOW_TRACKING_PASSWORD" in str(err.value) and "PGPASSWORD" in str(err.value)
    with pytest.raises(ConfigError, match=r"^pipeline.tracking_uri carries a password"):
        check_confined(pipeline=PipelineConfig(tracking_uri="https://u:p@h/"))
    check_confined(pipeline=PipelineConfig(tracking_uri="postgresql://mlflow@db/mlflow"))  # a user alone is no secret
