"""Pipeline pieces without a Prefect server: configs, the `qtuning run` CLI, cache keys, MLflow helpers, and the
training task's subprocess (launch, metric streaming, resume) called through `task.fn`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from qtuning.config import FULL_DATA, ArmConfig, CompareConfig, ConfigError, DataConfig, ExperimentConfig, PipelineConfig, TrainingConfig, validate
from qtuning.modeling import tiny_model_config
from commands.run import build_config, build_parser, main, parse_arm
from tasks import data as data_tasks, stage, training, tracking
from tasks.records import DataRecord

QT = {"sample": "qtuning", "token": "qtuning", "sample_ratio": 0.25, "token_ratio": 0.5}


# --------------------------------------------------------------------------- configs
def test_compare_config_reports_every_problem_with_its_path():
    raw = {
        "arms": [
            {"name": "a", "pruning": QT},
            {"name": "a", "pruning": {**QT, "sample_ratio": 0.99}},
        ],
        "pipeline": {"zero_shot": True},
        "model": {"random_init": True},
    }
    with pytest.raises(ConfigError) as e:
        validate(CompareConfig, raw)
    msg = str(e.value)
    assert "names must be unique, a repeat" in msg
    assert "no full-data arm" in msg and "sample: all, token: all" in msg
    assert "pipeline.zero_shot: true needs pretrained weights" in msg
    assert "arms[1] (a): pool of 8 samples at pruning.sample_ratio=0.99 keeps every row" in msg


def test_static_arm_needs_the_quadrant_triage():
    with pytest.raises(ValueError, match="mode: static triages the data set on the EU plane"):
        ArmConfig(name="s", mode="static", pruning={"sample": "random", "token": "all", "token_ratio": 1.0})


def test_multi_process_training_needs_accelerate():
    with pytest.raises(ValueError, match="pipeline.launcher: accelerate"):
        PipelineConfig(num_processes=2, launcher="python")


def test_compare_config_yaml_round_trip(tmp_path):
    cfg = CompareConfig(arms=[ArmConfig(name="full", pruning=FULL_DATA), ArmConfig(name="s", mode="static", pruning=QT)])
    assert CompareConfig.load(cfg.save(tmp_path / "c.yaml")) == cfg


# --------------------------------------------------------------------------- qtuning run
def test_run_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def test_qtuning_help_lists_each_command_once_and_tells_its_version(capsys):
    import importlib.metadata

    from commands.cli import COMMANDS
    from commands.cli import main as qtuning

    assert qtuning(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert sum(line.split()[:1] == [name] for line in out.splitlines()) == 1, name
    assert qtuning(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qtuning {importlib.metadata.version('qtuning')}"


def test_run_options_override_the_config_file_and_set_overrides_both(tmp_path):
    base = CompareConfig(data=DataConfig(limit=10)).save(tmp_path / "c.yaml")
    args = build_parser().parse_args([
        "--config", str(base), "--rows", "32", "--sample-ratio", "0.5", "--arm", "rnd=random/random/0.25/0.5",
        "--eval-limit", "3", "--set", "training.lr=0.001", "pipeline.zero_shot=true",
    ])
    cfg = build_config(args)
    assert cfg.data.limit == 32 and cfg.evaluation.limit == 3 and cfg.training.lr == 0.001 and cfg.pipeline.zero_shot
    assert [a.name for a in cfg.arms] == ["full", "qtuning-25x50", "rnd"]
    assert cfg.arm("qtuning-25x50").pruning.sample_ratio == 0.5 and cfg.arm("full").pruning.sample_ratio == 1.0


def test_run_refuses_bad_options_before_anything_loads(capsys):
    assert main(["--arm", "x=qtuning/qtuning/half/0.5"]) == 2
    assert "RS and RT must be numbers" in capsys.readouterr().err
    assert main(["--only-arms", "qtuning-25x50"]) == 2
    assert "no full-data arm" in capsys.readouterr().err
    assert parse_arm("s=qtuning/qtuning/0.25/0.5/static")["mode"] == "static"


def test_print_config_is_valid_yaml_of_the_default(capsys):
    assert main(["--print-config"]) == 0
    import yaml

    assert validate(CompareConfig, yaml.safe_load(capsys.readouterr().out)) == CompareConfig()


# --------------------------------------------------------------------------- cache keys
def _experiment(tmp_path: Path, **pruning) -> ExperimentConfig:
    return ExperimentConfig(
        name="arm", model=tiny_model_config(), data=DataConfig(source="arc", limit=16, max_length=96),
        pruning={**QT, **pruning}, training=TrainingConfig(micro_batch_size=8, output_dir=str(tmp_path / "ignored")),
    )


def _data_record(cfg: ExperimentConfig, fingerprint: str = "f" * 64) -> DataRecord:
    return DataRecord(key="k", path="/nowhere", data=cfg.data, model=cfg.model, fingerprint=fingerprint, source="arc",
                      rows=16, tokens=1, response_tokens=1, seconds=0.0)


def _train_key(cfg: ExperimentConfig, pipeline: PipelineConfig, fingerprint: str = "f" * 64) -> str:
    return training.train_arm.locate(cfg, _data_record(cfg, fingerprint), None, pipeline)[0]


def test_train_key_follows_the_inputs_that_matter(tmp_path):
    pipe = PipelineConfig(runs_dir=str(tmp_path))
    key = _train_key(_experiment(tmp_path), pipe)
    assert _train_key(_experiment(tmp_path), pipe) == key  # stable
    assert _train_key(_experiment(tmp_path, lam=0.3), pipe) != key  # a pruning field
    assert _train_key(_experiment(tmp_path), pipe, fingerprint="e" * 64) != key  # the data set
    assert _train_key(_experiment(tmp_path), pipe.model_copy(update={"num_processes": 2})) != key  # world size
    moved = _experiment(tmp_path).model_copy(update={"training": TrainingConfig(micro_batch_size=8, output_dir="/elsewhere")})
    assert _train_key(moved, pipe) == key  # the output folder is derived from the key, not part of it
    assert _train_key(_experiment(tmp_path), pipe.model_copy(update={"progress": False})) == key


def test_data_key_ignores_pruning_but_follows_the_source_file(tmp_path, write_jsonl):
    pipe = PipelineConfig(runs_dir=str(tmp_path))
    path = write_jsonl([{"prompt": "a", "response": "b"}])
    data = DataConfig(source=str(path))
    key = lambda: data_tasks.prepare_data.locate(data, tiny_model_config(), pipe)[0]  # noqa: E731
    before = key()
    assert key() == before
    path.write_text(json.dumps({"prompt": "a", "response": "c"}) + "\n")
    assert key() != before


def test_editing_any_library_module_changes_the_key(tmp_path, monkeypatch):
    """The key covers the source of the whole qtuning package: edit any module (a helper moved to a new file
    included) and every stage's key changes; nothing is listed by hand."""
    import qtuning

    copy = tmp_path / "qtuning"
    shutil.copytree(Path(qtuning.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = stage.library_fingerprint(copy, ("torch",))
    assert len(base) == 64 and stage.library_fingerprint(copy, ("torch",)) == base
    seen = {base}
    for module in sorted(copy.rglob("*.py")):
        original = module.read_text()
        module.write_text(original + "\n\ndef _helper():\n    return 1\n")
        changed = stage.library_fingerprint(copy, ("torch",))
        assert changed not in seen, f"editing {module.relative_to(tmp_path)} left the key unchanged"
        seen.add(changed)
        module.write_text(original)
    (copy / "new_module.py").write_text("X = 1\n")
    assert stage.library_fingerprint(copy, ("torch",)) not in seen
    assert stage.library_fingerprint(copy, ("torch", "transformers")) != stage.library_fingerprint(copy, ("torch",))

    # and a stage's key is built on it
    pipe = PipelineConfig(runs_dir=str(tmp_path))
    key = _train_key(_experiment(tmp_path), pipe)
    monkeypatch.setattr(stage, "_installed_library_fingerprint", lambda packages: "edited")
    assert _train_key(_experiment(tmp_path), pipe) != key


def test_manifest_names_a_missing_or_damaged_file(tmp_path):
    out = tmp_path / "stage"
    (out / "sub").mkdir(parents=True)
    (out / "a.bin").write_bytes(b"x" * 100)
    (out / "sub" / "b.txt").write_text("hello")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "c").write_text("left out")
    assert stage.check_manifest(out) == f"{out} is incomplete (no manifest.json: its stage did not finish)"
    stage.write_manifest(out, exclude=lambda rel: rel.startswith("checkpoints/"))
    assert stage.check_manifest(out) is None
    (out / "checkpoints" / "c").unlink()  # excluded files may go
    assert stage.check_manifest(out) is None
    (out / "a.bin").write_bytes(b"x" * 50)  # truncated
    assert stage.check_manifest(out) == f"{out / 'a.bin'} is damaged (size 50 bytes, 100 when written)"
    (out / "a.bin").write_bytes(b"y" * 100)  # same size, other bytes
    assert "checksum differs" in stage.check_manifest(out) and str(out / "a.bin") in stage.check_manifest(out)
    (out / "sub" / "b.txt").unlink()
    (out / "a.bin").write_bytes(b"x" * 100)
    assert stage.check_manifest(out) == f"{out / 'sub' / 'b.txt'} is missing"


# --------------------------------------------------------------------------- MLflow helpers
@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == tracking.default_tracking_uri()
    assert tracking.default_tracking_uri().endswith("/mlflow/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/y.db")
    assert tracking.resolve_tracking_uri() == "sqlite:////x/y.db"
    assert tracking.resolve_tracking_uri("http://server:5000") == "http://server:5000"
    assert tracking.artifact_root("sqlite:////x/y.db") == "file:///x/artifacts"


def test_failed_block_ends_the_run_failed_and_keeps_its_metrics(tracking_uri):
    run = tracking.create_run(tracking_uri, "unit", "boom")
    with pytest.raises(RuntimeError):
        with tracking.run_status(run):
            tracking.log_metrics(run, {"train/loss": 1.5}, step=1)
            raise RuntimeError("step failed")
    r = run.client.get_run(run.run_id)
    assert r.info.status == "FAILED" and r.data.metrics["train/loss"] == 1.5
    assert r.data.tags["qtuning.version"]


def test_metrics_file_is_logged_once_per_step(tracking_uri, tmp_path):
    run = tracking.create_run(tracking_uri, "unit", "sync")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 3.0 - s, "prune/q2": 1}) + "\n" for s in (1, 2)))
    logged: set[int] = set()
    training._sync_metrics(run, path, logged)
    with path.open("a") as f:
        f.write(json.dumps({"step": 3, "train/loss": 0.5}) + "\n" + '{"step": 4, "train/lo')  # a line being written
    training._sync_metrics(run, path, logged)
    training._sync_metrics(run, path, tracking.metric_steps(run, "train/loss"))  # a replay adds nothing
    history = run.client.get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0), (3, 0.5)]


def test_a_replayed_history_is_logged_in_batches_of_whole_steps_and_a_failed_batch_is_sent_once_again(tracking_uri, tmp_path,
                                                                                                         monkeypatch):
    """A cached arm's metrics.jsonl replayed into a new run: one request per METRICS_PER_REQUEST values, not one per
    step; a request that fails leaves its steps for the next look, which logs them once."""
    run = tracking.create_run(tracking_uri, "unit", "replay")
    path = tmp_path / "metrics.jsonl"
    per_step = 5
    full = tracking.METRICS_PER_REQUEST // per_step  # steps in a full request
    steps = 2 * full + 3  # two full requests and a short third
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s, **{f"m{i}": i for i in range(per_step - 1)}}) + "\n"
                            for s in range(1, steps + 1)))
    sent, log_batch = [], run.client.log_batch

    def counting(run_id, metrics=(), **kw):  # the real client's request, counted; the second one fails once
        sent.append({m.step for m in metrics})
        if len(sent) == 2:
            raise ConnectionError("the server went away")
        return log_batch(run_id, metrics=metrics, **kw)

    monkeypatch.setattr(run.client, "log_batch", counting)  # the store's one client (tracking.client is cached)
    logged: set[int] = set()
    heard: list[int] = []
    with pytest.raises(ConnectionError):
        training._sync_metrics(run, path, logged, heard.append)
    assert sent[0] == set(range(1, full + 1)) and logged == sent[0] and heard == [full]
    training._sync_metrics(run, path, logged, heard.append)  # the failed request's steps, and the rest
    assert len(sent) == 4 and heard[-1] == steps and logged == set(range(1, steps + 1))
    history = run.client.get_metric_history(run.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # each step once


# --------------------------------------------------------------------------- the training subprocess
def test_launch_commands(tmp_path):
    cfg = _experiment(tmp_path)
    acc = training.launch_command(Path("r.yaml"), cfg, PipelineConfig(num_processes=2), resume=True)
    assert acc[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in acc
    assert acc[acc.index("--num_processes") + 1] == "2" and acc[-4:] == ["qtuning.train", "--config", "r.yaml", "--resume"]
    py = training.launch_command(Path("r.yaml"), cfg, PipelineConfig(launcher="python", progress=False), resume=False)
    assert py[1:] == ["-m", "qtuning.train", "--config", "r.yaml", "--no-progress"]
    env = training.launch_env(tracking.RunRef(run_id="abc", experiment_id="0", tracking_uri="sqlite:///x.db", name="n"), PipelineConfig(num_processes=2))
    assert env["MLFLOW_RUN_ID"] == "abc" and env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db" and env["ACCELERATE_USE_CPU"] == "true"


def test_train_task_streams_metrics_and_resumes_from_the_last_checkpoint(tmp_path, tracking_uri):
    cfg = _experiment(tmp_path)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={
        "epochs": 2.0, "checkpoint_every_steps": 1, "keep_checkpoints_after_training": True})})  # to fake a crash below
    pipe = PipelineConfig(runs_dir=str(tmp_path / "runs"), launcher="python", progress=False)
    run = tracking.create_run(tracking_uri, "unit", "train")
    with disable_run_logger():
        data = data_tasks.prepare_data.fn(cfg.data, cfg.model, pipe)
        first = training.train_arm.fn(cfg, data, run, pipe)
    assert first.summary["optimizer_steps"] == 4 and not first.resumed
    assert Path(first.final_dir, "config.json").exists()
    assert first.output_dir.startswith(str(tmp_path / "runs" / "train" / "arm-"))
    history = run.client.get_metric_history(run.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert "prune/kept_samples" in run.client.get_run(run.run_id).data.metrics

    # a crash after step 3: the final model, the summary and the last checkpoint are gone
    out = Path(first.output_dir)
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / "step-4")
    with disable_run_logger():
        again = training.train_arm.fn(cfg, data, run, pipe)
    assert again.resumed and again.output_dir == first.output_dir
    assert again.summary["optimizer_steps"] == 4 and Path(again.final_dir, "config.json").exists()
    lines = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4]
    assert len(run.client.get_metric_history(run.run_id, "train/loss")) == 4  # step 4 not logged twice


def test_train_task_reports_the_subprocess_failure(tmp_path):
    cfg = _experiment(tmp_path)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"precision": "bf16"})})  # no GPU here
    pipe = PipelineConfig(runs_dir=str(tmp_path / "runs"), launcher="python", progress=False)
    with disable_run_logger():
        data = data_tasks.prepare_data.fn(cfg.data, cfg.model, pipe)
    with disable_run_logger(), pytest.raises(RuntimeError, match=r"exited with code 2(.|\n)*bf16 needs a GPU"):
        training.train_arm.fn(cfg, data, None, pipe)


@pytest.mark.slow
def test_train_task_launches_two_cpu_processes_with_accelerate(tmp_path):
    cfg = _experiment(tmp_path)
    pipe = PipelineConfig(runs_dir=str(tmp_path / "runs"), num_processes=2, progress=False)
    with disable_run_logger():
        data = data_tasks.prepare_data.fn(cfg.data, cfg.model, pipe)
        record = training.train_arm.fn(cfg, data, None, pipe)
    assert record.summary["world_size"] == 2 and Path(record.final_dir, "config.json").exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("compare*.yaml")), ids=lambda p: p.name)
def test_shipped_comparison_configs_validate(path):
    cfg = CompareConfig.load(path)
    assert cfg.baseline_arm.is_full_data and len(cfg.arms) >= 2


def test_the_gpu_comparison_is_the_reference_recipe_of_the_algorithm_page():
    """docs/algorithm.md's reference run: 2,000 ShareGPT first-turn pairs up to 1,024 tokens, micro-batch 8, lr 2e-5
    cosine, 2 epochs. The sharegpt preset keeps whole conversations since issue 9; the config must ask for first turns."""
    cfg = CompareConfig.load(Path(__file__).parents[1] / "configs" / "compare-gpu.yaml")
    d, t = cfg.data, cfg.training
    assert (d.source, d.first_turn_only, d.limit, d.max_length) == ("sharegpt", True, 2000, 1024)
    assert (t.micro_batch_size, t.lr, t.schedule, t.epochs) == (8, 2e-5, "cosine", 2)


def test_data_scores_and_static_prune_tasks_chain_on_disk(tmp_path):
    """prepare_data -> score_eu -> prune(static) through task.fn: files on disk, records that point at them."""
    from tasks.pruning import prune
    from tasks.scoring import score_eu

    cfg = _experiment(tmp_path)
    pipe = PipelineConfig(runs_dir=str(tmp_path / "runs"), progress=False, token_view_samples=2)
    with disable_run_logger():
        data = data_tasks.prepare_data.fn(cfg.data, cfg.model, pipe)
        scores = score_eu.fn(data, cfg.model, pipe, "response", 0)
        plan = prune.fn(cfg, "static", data, scores, pipe)
        dynamic = prune.fn(cfg, "dynamic", data, scores, pipe)
    assert data.rows == 14 and Path(data.path, "dataset_info.json").exists() and Path(data.path).parent.joinpath("manifest.json").exists()
    import pandas as pd

    table = pd.read_parquet(scores.path)
    assert len(table) == data.rows and (table["ppl"] > 0).all() and (table["ent"] > 0).all()
    # a static arm trains the same prepared set, narrowed to the kept ids, with the batch rule stated in its config
    assert plan.experiment.data == cfg.data.model_copy(update={"subset": plan.static_ids_path})
    assert plan.experiment.pruning.is_full_data
    assert plan.experiment.training.micro_batch_size == 2 and plan.experiment.pool_size == 2  # static_batch: scaled
    kept = Path(plan.static_ids_path).read_text().split()
    assert len(kept) == round(plan.shares["kept"] * data.rows) >= round(0.25 * data.rows)
    from qtuning.data import SFTData

    subset = SFTData.load(data.path).select_ids(plan.static_ids_path)
    assert sorted(subset.dataset["sample_id"]) == sorted(kept) and subset.fingerprint != data.fingerprint
    with disable_run_logger():
        same = prune.fn(cfg, "static", data, scores, pipe, "same")
    assert same.experiment.training.micro_batch_size == 8
    assert dynamic.experiment == cfg and dynamic.static_ids_path is None
    assert Path(dynamic.token_view_path).read_text().count("class='sample'") == 2
    assert json.loads(Path(dynamic.plan_path).read_text())["kept_per_pool"] == 2


def test_an_equal_recipe_under_another_name_reuses_the_training_folder(tmp_path):
    pipe = PipelineConfig(runs_dir=str(tmp_path))
    cfg = _experiment(tmp_path)
    key = _train_key(cfg, pipe)
    renamed = cfg.model_copy(update={"name": "other"})
    assert _train_key(renamed, pipe) == key
    data = _data_record(cfg)
    assert training.output_dir(cfg, data, None, pipe, key=key).name == f"arm-{key[:12]}"
    (tmp_path / "train" / f"arm-{key[:12]}" / "final").mkdir(parents=True)
    assert training.output_dir(renamed, data, None, pipe, key=key) == training.output_dir(cfg, data, None, pipe, key=key)


def test_a_runs_folder_mounted_at_another_path_hits_every_cache(tmp_path):
    """One shared runs folder, seen by two machines at two paths (here: the folder and a symlink to it, which
    runs_root does not resolve): the second sees the same keys, reuses every stage's folder without rebuilding it,
    and gets records whose paths point at its own mount. No key holds a path of either machine."""
    from tasks.pruning import prune
    from tasks.scoring import score_eu

    cfg = _experiment(tmp_path)
    (tmp_path / "share").mkdir()
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "runs").symlink_to(tmp_path / "share" / "runs", target_is_directory=True)
    a = PipelineConfig(runs_dir=str(tmp_path / "share" / "runs"), progress=False, token_view_samples=2)
    b = a.model_copy(update={"runs_dir": str(tmp_path / "mnt" / "runs")})
    with disable_run_logger():
        data = data_tasks.prepare_data.fn(cfg.data, cfg.model, a)
        scores = score_eu.fn(data, cfg.model, a, "response", 0)
        plan = prune.fn(cfg, "static", data, scores, a)
    calls = {
        data_tasks.prepare_data: lambda p, d=None, s=None: (cfg.data, cfg.model, p),
        score_eu: lambda p, d, s=None: (d, cfg.model, p, "response", 0),
        prune: lambda p, d, s: (cfg, "static", d, s, p),
    }
    for stage_task, args in calls.items():
        inputs = stage_task.inputs(args(a, data, scores), {})
        held = json.dumps(stage.portable(stage._jsonable(stage_task.stage.ingredients(**inputs)), stage.Stage.root(inputs)))
        assert str(tmp_path) not in held and os.path.expanduser("~") + "/" not in held, f"{stage_task.name}: {held}"
        assert stage_task.locate(*args(a, data, scores))[0] == stage_task.locate(*args(b, data, scores))[0], stage_task.name

    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "share" / "runs").rglob("manifest.json")}
    with disable_run_logger():
        data_b = data_tasks.prepare_data.fn(cfg.data, cfg.model, b)
        scores_b = score_eu.fn(data_b, cfg.model, b, "response", 0)
        plan_b = prune.fn(cfg, "static", data_b, scores_b, b)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "share" / "runs").rglob("manifest.json")} == written  # nothing rebuilt
    for before, after in ((data, data_b), (scores, scores_b), (plan, plan_b)):
        assert after.key == before.key and after.root == b.runs_dir and before.root == a.runs_dir
    assert data_b.path == data.path.replace(a.runs_dir, b.runs_dir) and Path(data_b.path, "dataset_info.json").is_file()
    assert plan_b.static_ids_path.startswith(b.runs_dir + "/") and plan_b.experiment.data.subset == plan_b.static_ids_path
    assert Path(plan_b.static_ids_path).read_text() == Path(plan.static_ids_path).read_text()
    # a record from shared result storage (written under the other mount) is moved the same way
    assert stage.relocated(plan, Path(b.runs_dir)) == plan_b.model_copy(update={"produced_in": plan.produced_in})


def test_the_run_summary_line_shows_a_tracking_uri_without_its_credentials():
    from tasks.tracking import without_credentials

    assert without_credentials("postgresql://user:secret@db.example:5432/mlflow") == "postgresql://***@db.example:5432/mlflow"
    assert without_credentials("https://token@mlflow.example/") == "https://***@mlflow.example/"
    assert without_credentials("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert without_credentials("tracking_uri: http://u:p@h:5000\nx: 1") == "tracking_uri: http://***@h:5000\nx: 1"


def test_credentials_in_a_tracking_uri_move_to_the_environment(monkeypatch):
    """What every run, record, link, log line and the guard's command line carry is the URI without its password;
    MLflow (basic auth) and libpq (PostgreSQL) read the credentials from their own variables."""
    from tasks.tracking import resolve_tracking_uri

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"):
        monkeypatch.setenv(var, "")  # recorded, so what resolve_tracking_uri sets is undone after the test
        monkeypatch.delenv(var)
    assert resolve_tracking_uri("https://alice:s%40cret@mlflow.example:5000/") == "https://mlflow.example:5000/"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "s@cret")
    assert resolve_tracking_uri("postgresql+psycopg2://bob:pw@db:5432/mlflow") == "postgresql+psycopg2://bob@db:5432/mlflow"
    assert os.environ["PGPASSWORD"] == "pw"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://carol:x@h:1")
    assert resolve_tracking_uri(None) == "http://h:1"

def test_the_printed_ui_command_works_as_shown(tmp_path):
    """It names the qtuning script by its full path (no activated venv needed); a server is its own UI."""
    import shlex
    import subprocess
    import sys

    from tasks.tracking import ui_command

    assert ui_command("https://u:p@mlflow.example:5000") == "https://***@mlflow.example:5000"
    cmd = shlex.split(ui_command(f"sqlite:///{tmp_path}/m.db"))
    assert cmd[0] == str(Path(sys.executable).with_name("qtuning")) and cmd[1:] == ["ui", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert subprocess.run([*cmd, "--help"], capture_output=True, timeout=60).returncode == 0
