"""Sweeps: expansion of axes into arms, refusals, the mean ± sd table and plot, and one real sweep flow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qtuning.config import ConfigError, SweepConfig, validate, with_overrides
from qtuning.report import format_sweep_table, sweep_figure, sweep_table


def test_grid_crosses_axes_and_always_includes_the_baseline():
    cfg = validate(SweepConfig, {
        "grid": {"pruning.sample_ratio": [0.125, 0.25, 0.5], "pruning.token_ratio": [0.5, 0.7], "training.seed": [0, 1]},
    })
    arms = cfg.arms()
    assert arms[0].name == "full" and arms[0].is_full_data
    assert len(arms) == 1 + 6
    assert {(a.pruning.sample_ratio, a.pruning.token_ratio) for a in arms[1:]} == {
        (rs, rt) for rs in (0.125, 0.25, 0.5) for rt in (0.5, 0.7)
    }
    comparisons = cfg.comparisons()
    assert [c.training.seed for c in comparisons] == [0, 1]
    assert all([a.name for a in c.arms] == [a.name for a in arms] for c in comparisons)


def test_points_name_arms_by_recipe_and_dedupe():
    cfg = validate(SweepConfig, {"points": [
        {}, {"pruning.sample": "random", "pruning.token": "random"}, {"pruning.lam": 0.0}, {},
        {"pruning.sample": "all", "pruning.token": "all", "pruning.sample_ratio": 1.0, "pruning.token_ratio": 1.0},
    ]})
    names = [a.name for a in cfg.arms()]
    assert names == ["full", "qtuning-qtuning-rs0.25-rt0.5", "random-random-rs0.25-rt0.5", "qtuning-qtuning-rs0.25-rt0.5-lam0.0"]


def test_bad_sweeps_are_refused_with_every_problem_named():
    with pytest.raises(ConfigError) as e:
        validate(SweepConfig, {
            "grid": {"training.lr": [1e-4], "pruning.lam": []},
            "points": [{"pruning.sample_ratio": 3}, {"training.seed": 1}],
        }, "sweep.yaml")
    msg = str(e.value)
    assert "sweep.yaml" in msg
    for part in ("grid.training.lr: not a sweep axis", "grid.pruning.lam: expected a non-empty list",
                 "pruning.sample_ratio: Input should be less than or equal to 1", "put training.seed in grid"):
        assert part in msg


def _rows():
    out = []
    for seed in (0, 1, 2):
        for i, name in enumerate(["full", "qt"]):
            out.append({"name": name, "seed": seed, "scores": {"arc_easy": 40.0 + i + seed, "gsm8k": 2.0},
                        "average": 20.0 + 2 * i + seed, "loss_tokens": 1000 // (i + 1), "loop_seconds": 10.0 - i})
    return out


def test_sweep_command_takes_set_and_tracking_uri_like_run(tmp_path, capsys):
    """`qtuning sweep FILE --set KEY=VALUE --tracking-uri URI` (one KEY=VALUE parser for every command)."""
    from commands.sweep import main
    from qtuning.config import parse_overrides

    path = tmp_path / "s.yaml"
    path.write_text("name: s\ngrid:\n  pruning.sample_ratio: [0.25]\n")
    assert main([str(path), "--list", "--set", "training.epochs=3", "grid={pruning.sample_ratio: [0.5, 0.25]}"]) == 0
    assert "3 arms x 1 seed(s)" in capsys.readouterr().out  # the baseline and the two overridden ratios
    assert main([str(path), "--list", "--set", "training.epochs"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main([str(path), "--list", "--set", "training.nope=1"]) == 2
    assert "unknown field 'nope'" in capsys.readouterr().err
    assert parse_overrides(["a.b=[1, 2]", "c=x=y"]) == {"a.b": [1, 2], "c": "x=y"}


def test_table_shows_mean_and_spread_over_seeds(tmp_path):
    table = sweep_table(_rows(), baseline="full")
    assert list(table.index) == ["full", "qt"]
    assert table.loc["qt", "average"] == pytest.approx(23.0)
    assert table.loc["qt", "average_sd"] == pytest.approx(1.0)
    assert table.loc["qt", "ratio_to_full"] == pytest.approx(23.0 / 21.0)
    assert table.loc["full", "seeds"] == 3
    text = format_sweep_table(table)
    assert "23.00 ± 1.00" in text and "1.095" in text
    sweep_figure(table).savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def _per_item(rng, p: float, n: int = 200):
    import pandas as pd

    return pd.DataFrame({"task": "arc_easy", "doc_id": range(n), "correct": (rng.random(n) < p).astype(int)})


def test_seeds_widen_the_interval_and_the_mark_is_corrected_across_arms():
    """An arm's difference to full data is resampled over seeds and items together: the same item-level gap
    with seeds that disagree gets a wider interval than with seeds that agree; a clear gain is marked (*), a
    gap carried by one seed is not, and the p-values are Holm-corrected across the arms."""
    from qtuning.report import seeded_difference

    rng = np.random.default_rng(0)
    base = [_per_item(rng, 0.5) for _ in range(3)]
    steady = [_per_item(rng, 0.65) for _ in range(3)]
    shaky = [_per_item(rng, p) for p in (0.35, 0.65, 0.95)]  # the same mean, seeds 30 points apart
    a, b = seeded_difference(steady, base, n_resamples=1000), seeded_difference(shaky, base, n_resamples=1000)
    assert a["diff"] == pytest.approx(b["diff"], abs=4) and a["seeds"] == b["seeds"] == 3 and a["n_items"] == 200
    assert (b["hi"] - b["lo"]) > 2 * (a["hi"] - a["lo"]) and a["lo"] > 0 and b["lo"] < 0
    rows = [{"name": name, "seed": i, "scores": {"arc_easy": float(x["correct"].mean() * 100)},
             "average": float(x["correct"].mean() * 100), "loss_tokens": 10, "loop_seconds": 1.0, "samples": x}
            for name, runs in (("full", base), ("steady", steady), ("shaky", shaky)) for i, x in enumerate(runs)]
    table = sweep_table(rows, baseline="full", n_resamples=1000)
    assert table.loc["steady", "diff_p_holm"] == pytest.approx(min(1.0, 2 * table.loc["steady", "diff_p"]))  # 2 tests
    text = format_sweep_table(table)
    line = {ln.split()[0]: ln for ln in text.splitlines() if ln.split()}
    assert "]*" in line["steady"] and "]*" not in line["shaky"] and "Holm" in text and "vs full" in text


def _heldout(rng, shift: float, n: int = 120):
    """One run's held-out rows: NLL sums of rows of 5-40 tokens, the per-token loss 1.5 + shift + row noise."""
    import pandas as pd

    tokens = np.random.default_rng(7).integers(5, 40, n)  # the same rows (and lengths) in every run
    per_token = 1.5 + shift + rng.normal(0, 0.05, n)
    return pd.DataFrame({"sample_id": [f"r{i}" for i in range(n)], "nll": per_token * tokens, "tokens": tokens})


def test_heldout_loss_difference_is_resampled_over_seeds_and_rows_and_joins_the_correction():
    """The held-out loss of an arm against full data: per token (NLL over tokens, not a mean of row means),
    resampled over seeds and held-out rows; a clear gap is marked, one carried by one seed is not; the held-out
    tests and the benchmark tests are one Holm family."""
    from qtuning.report import seeded_loss_difference

    rng = np.random.default_rng(0)
    base = [_heldout(rng, 0.0) for _ in range(3)]
    better = [_heldout(rng, -0.05) for _ in range(3)]
    shaky = [_heldout(rng, s) for s in (-0.3, -0.05, 0.2)]
    d = seeded_loss_difference(better, base, n_resamples=1000)
    loss = lambda runs: np.mean([r["nll"].sum() / r["tokens"].sum() for r in runs])  # noqa: E731
    assert d["diff"] == pytest.approx(loss(better) - loss(base)) and d["n_rows"] == 120 and d["seeds"] == 3
    assert d["hi"] < 0 and d["p"] < 0.01
    e = seeded_loss_difference(shaky, base, n_resamples=1000)
    assert e["lo"] < 0 < e["hi"] and (e["hi"] - e["lo"]) > 5 * (d["hi"] - d["lo"])
    # a row missing from one run is left out of every run: the runs are compared on the same rows
    assert seeded_loss_difference([better[0].iloc[1:]], base[:1], n_resamples=100)["n_rows"] == 119
    items = _per_item(rng, 0.5)
    rows = [{"name": name, "seed": i, "scores": {"arc_easy": 50.0}, "average": 50.0, "loss_tokens": 10,
             "loop_seconds": 1.0, "samples": items, "heldout": x, "heldout_loss": float(x["nll"].sum() / x["tokens"].sum())}
            for name, runs in (("full", base), ("better", better), ("shaky", shaky)) for i, x in enumerate(runs)]
    table = sweep_table(rows, baseline="full", n_resamples=1000)
    assert table.attrs["tests"] == 4  # 2 arms x (benchmark average, held-out loss)
    assert table.loc["better", "heldout_diff_p_holm"] == pytest.approx(min(1.0, 4 * table.loc["better", "heldout_diff_p"]))
    assert table.loc["better", "heldout_loss"] == pytest.approx(loss(better))
    text = format_sweep_table(table)
    line = {ln.split()[0]: ln for ln in text.splitlines() if ln.split()}
    assert "heldout vs full" in text and "]*" in line["better"] and "]*" not in line["shaky"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_cpu_study_runs_in_its_shape_and_a_second_seed_trains_only_what_is_new(tmp_path, tiny_compare_config, prefect_server):
    """configs/sweeps/cpu-study.yaml as shipped (its arms, measures, budgets and epochs), on the tiny model and a
    few rows, through Prefect's engine on the test process's real server (tests/conftest.py) with a PREFECT_HOME
    of its own for task results, one benchmark and the plain-python launcher. First on seed 0 alone, then on two
    of its three seeds (what seeds do to the table is the same for two): the second sweep trains the four runs of
    seed 1 and reuses the four of seed 0 (a sweep that shares arms with another, or was interrupted, redoes only
    what is missing). The table: the held-out loss row by row beside the benchmarks, each pruned arm's two
    differences to full data in one Holm family of 6, the equal-token arms within Q-Tuning's budget."""
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_HOME, temporary_settings

    from flows.sweep import sweep
    from qtuning.config import load_yaml

    study = load_yaml(SweepConfig, Path(__file__).parents[1] / "configs" / "sweeps" / "cpu-study.yaml")
    base = tiny_compare_config(tmp_path, name="study")
    cfg = with_overrides(study, {"model": base.model.model_dump(), "pipeline": base.pipeline.model_dump(),
                                 "pipeline.launcher": "python", "data.limit": 16, "data.max_length": 96,
                                 "data.eval_rows": 8, "evaluation.limit": 2, "evaluation.batch_size": 4})
    assert cfg.grid == {"training.seed": [0, 1, 2]}  # as shipped; run on two of them
    train = Path(cfg.pipeline.runs_dir, "train")
    trained = lambda: {p.name: (p / "manifest.json").stat().st_mtime for p in train.iterdir()}  # noqa: E731
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path / "prefect")}):
        first = sweep(with_overrides(cfg, {"name": "study-seed0", "grid": {"training.seed": [0]}}))
        after_first = trained()
        result = sweep(with_overrides(cfg, {"grid": {"training.seed": [0, 1]}}))

    names = ["full", "qtuning-qtuning-rs0.25-rt0.5", "random-random-rs0.25-rt0.5-budgetequaltokens",
             "infobatch-random-rs0.25-rt0.5-budgetequaltokens"]
    assert [r["arm"] for r in first.arms] == names and len(after_first) == 4
    assert [r["arm"] for r in result.arms] == names
    after = trained()
    assert len(after) == 8 and {k: after[k] for k in after_first} == after_first  # seed 0's four runs not retrained
    assert result.arms[0]["loss_tokens"] > result.arms[1]["loss_tokens"] > 0  # the pruned arm trained on fewer tokens
    assert all(r["seeds"] == 2 for r in result.arms) and len(result.runs) == 8
    for r in result.arms[1:]:
        assert not np.isnan(r["heldout_diff"]) and not np.isnan(r["diff"]) and r["heldout_diff_p_holm"] >= r["heldout_diff_p"]
    assert "heldout vs full" in result.table and "across the 6 tests" in result.table
    for run in result.runs:
        assert Path(run["heldout_rows_path"]).stat().st_size > 0
        if run["budget"] == "equal_tokens":  # as many loss tokens as Q-Tuning would have trained, never more
            assert 0 < run["loss_tokens"] <= run["budget_tokens"]

    client = MlflowClient(cfg.pipeline.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    kids = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.info.run_name for r in kids) == sorted(f"{n}-seed{s}" for n in names for s in (0, 1))
    assert "sweep/qtuning-qtuning-rs0.25-rt0.5/heldout_diff" in parent.data.metrics
    assert "sweep/qtuning-qtuning-rs0.25-rt0.5/average" in parent.data.metrics
    artifacts = {f.path for f in client.list_artifacts(result.parent_run_id, "sweep")}
    assert {"sweep/table.txt", "sweep/table.md", "sweep/score_vs_tokens.png"} <= artifacts
