"""Report helpers and pipeline glue, framework-free: EU plane, comparison table, pruned-token view, static pruning."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from qtuning.config import FULL_DATA, CompareConfig, DataConfig, ExperimentConfig, PruningConfig, TrainingConfig
from qtuning.planning import pruning_plan, static_experiment, static_selection, token_view, write_ids
from qtuning.report import comparison_table, eu_plane_figure, eu_triage, format_table, pruned_tokens_html


@pytest.fixture
def scores() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 64
    return pd.DataFrame({
        "sample_id": [f"row-{i}" for i in range(n)],
        "ppl": np.exp(rng.normal(1.5, 0.6, n)),
        "ent": np.exp(rng.normal(0.0, 0.5, n)),
        "response_length": rng.integers(5, 60, n),
        "length": rng.integers(60, 200, n),
    })


def test_eu_plane_figure_shares_match_the_triage(tmp_path, scores):
    fig, shares = eu_plane_figure(scores, 0.25, title="t")
    fig.savefig(tmp_path / "eu.png")
    assert (tmp_path / "eu.png").stat().st_size > 10_000
    t = eu_triage(scores, 0.25)
    assert shares["kept"] == pytest.approx(t.keep.sum() / len(scores))
    assert shares["kept"] >= 0.25 - 1e-9  # K = round(64 * 0.25) = 16 at least
    assert sum(shares[f"q{q}"] for q in (1, 2, 3, 4)) + shares["none"] == pytest.approx(1.0)
    assert fig.axes[0].get_xscale() == "log"


def test_eu_plane_without_ratio_draws_every_row_and_no_shares(scores):
    fig, shares = eu_plane_figure(scores, None)
    assert shares == {}
    assert len(fig.axes[0].collections) == 1


ARMS = [
    {"name": "full", "scores": {"arc_easy": 50.0, "gsm8k": 2.0, "triviaqa": 18.0}, "average": 23.3, "loss_tokens": 1000, "loop_seconds": 10.0},
    {"name": "qt", "scores": {"arc_easy": 52.0, "gsm8k": 3.0, "triviaqa": 20.0}, "average": 25.0, "loss_tokens": 125, "loop_seconds": 12.5},
]


def test_comparison_table_ratio_to_full_and_columns():
    table = comparison_table(ARMS)
    assert list(table.columns) == ["arc_easy", "gsm8k", "triviaqa", "average", "ratio_to_full", "loss_tokens", "loop_seconds"]
    assert table.at["full", "ratio_to_full"] == pytest.approx(1.0)
    assert table.at["qt", "ratio_to_full"] == pytest.approx(25.0 / 23.3)
    text = format_table(table)
    assert text.splitlines()[0].split()[:2] == ["arm", "arc_easy"]
    assert "1.073" in text and "1,000" in text
    md = format_table(table, markdown=True)
    assert md_cells(md.splitlines()[0])[:2] == ["arm", "arc_easy"] and md.count("\n") == 3
    assert set(md.splitlines()[1]) <= set("|:- ") and md.splitlines()[1].count(":") == len(md_cells(md.splitlines()[0]))


def md_cells(line: str) -> list[str]:
    """The cells of one Markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_every_arm_names_its_sample_budget_and_its_tokens_against_qtunings():
    """InfoBatch keeps a random number of rows, more than Q-Tuning's K: the table says what each arm spent
    (kept_rows) and how its loss tokens compare with Q-Tuning's (tokens_vs_qtuning)."""
    arms = [{**ARMS[0], "rules": "all/all", "kept_rows": 1.0},
            {**ARMS[1], "rules": "qtuning/qtuning", "kept_rows": 0.25},
            {**ARMS[1], "name": "infobatch", "rules": "infobatch/random", "kept_rows": 0.62, "loss_tokens": 310}]
    table = comparison_table(arms)
    assert table["kept_rows"].tolist() == [1.0, 0.25, 0.62]
    assert table.at["infobatch", "tokens_vs_qtuning"] == pytest.approx(310 / 125) and table.at["qt", "tokens_vs_qtuning"] == 1.0
    text = format_table(table)
    row = next(line for line in text.splitlines() if line.startswith("infobatch"))
    assert "62%" in row and "248%" in row
    assert "tokens_vs_qtuning" not in comparison_table(arms[:2]).columns  # two arms: the ratio to full says it


def test_comparison_table_refuses_an_unknown_baseline():
    with pytest.raises(ValueError, match="baseline arm 'nope'"):
        comparison_table(ARMS, baseline="nope")


def test_pruned_tokens_html_escapes_and_marks_roles():
    page = pruned_tokens_html([{
        "sample_id": "s<1>", "tokens": ["<|im_start|>", "Hi", " there"], "roles": ["prompt", "kept", "pruned"],
        "token_ppl": [None, 1.5, 40.0], "ppl": 3.0, "ent": 0.5, "quadrant": 2,
    }])
    assert "&lt;|im_start|&gt;" in page and "s&lt;1&gt;" in page
    assert "<span class='pruned' title='ppl 40.00'> there</span>" in page
    assert "kept 1 / 2" in page and "Q2 misconception" in page


def _cfg(tmp_path, **pruning) -> ExperimentConfig:
    return ExperimentConfig(
        name="arm", data=DataConfig(source="arc", limit=16, max_length=96),
        pruning=PruningConfig(**pruning), training=TrainingConfig(micro_batch_size=8, output_dir=str(tmp_path)),
    )


def test_pruning_plan_counts_steps_and_expected_tokens(tmp_path, scores):
    plan = pruning_plan(_cfg(tmp_path), scores)
    assert plan["pool_size"] == 8 and plan["kept_per_pool"] == 2 and plan["optimizer_steps"] == 8
    assert 0 < plan["expected_loss_token_share"] < 0.5
    full = pruning_plan(_cfg(tmp_path, **FULL_DATA), scores)
    assert full["kept_per_pool"] == 8 and "base_model_quadrants" not in full
    json.dumps(plan)  # plain JSON


def test_static_selection_trains_the_same_tokens_narrowed_to_the_kept_ids(tmp_path, tokenizer):
    from qtuning.data import build_sft_dataset

    cfg = _cfg(tmp_path)
    data = build_sft_dataset(cfg.data, tokenizer, progress=False).dataset
    rng = np.random.default_rng(1)
    table = pd.DataFrame({"sample_id": data["sample_id"], "ppl": rng.uniform(1, 50, len(data)),
                          "ent": rng.uniform(0.1, 3, len(data)), "response_length": data["response_length"]})
    sel = static_selection(table, cfg.pruning)
    kept = list(sel.loc[sel["keep"], "sample_id"])
    assert len(kept) >= round(len(data) * 0.25)
    ids = write_ids(kept, tmp_path / "kept_ids.txt")
    run = static_experiment(cfg, ids)
    assert run.pruning.is_full_data and run.training.micro_batch_size == 2 and run.data.subset == str(ids)
    assert run.data.model_copy(update={"subset": None}) == cfg.data  # the same data set, not a rewritten one
    again = build_sft_dataset(run.data, tokenizer, progress=False).dataset
    assert sorted(again["sample_id"]) == sorted(kept)  # same ids, same tokens
    by_id = dict(zip(data["sample_id"], data["input_ids"]))
    assert all(by_id[s] == ids for s, ids in zip(again["sample_id"], again["input_ids"]))
    assert static_experiment(cfg, ids, "same").training.micro_batch_size == cfg.training.micro_batch_size


def test_token_view_prunes_half_of_each_q2_response(tmp_path, tiny_model, tokenizer):
    from qtuning.data import build_sft_dataset

    cfg = _cfg(tmp_path)
    data = build_sft_dataset(cfg.data, tokenizer, progress=False).dataset
    rng = np.random.default_rng(2)
    table = pd.DataFrame({"sample_id": data["sample_id"], "ppl": rng.uniform(1, 50, len(data)),
                          "ent": rng.uniform(0.1, 3, len(data)), "response_length": data["response_length"]})
    samples = token_view(tiny_model, tokenizer, data, table, cfg.pruning, n_samples=3)
    assert 1 <= len(samples) <= 3
    for s in samples:
        assert s["quadrant"] == 2
        n_kept, n_pruned = s["roles"].count("kept"), s["roles"].count("pruned")
        assert n_kept == math.ceil(0.5 * (n_kept + n_pruned))
        assert len(s["tokens"]) == len(s["roles"]) == len(s["token_ppl"])
    assert token_view(tiny_model, tokenizer, data, table, PruningConfig(**FULL_DATA)) == []


def test_default_compare_config_is_the_documented_main_job():
    cfg = CompareConfig()
    assert [a.name for a in cfg.arms] == ["full", "qtuning-25x50"]
    assert cfg.baseline_arm.name == "full" and cfg.reference_arm.pruning.sample_ratio == 0.25
    assert cfg.reference_arm.pruning.token_ratio == 0.5
    assert cfg.experiment(cfg.arms[1]).pool_size == 8


# --------------------------------------------------------------------------- issue 10: differences with their noise
from qtuning.report import marked, paired_bootstrap  # noqa: E402


def _items(correct_by_task: dict[str, list[int]]) -> pd.DataFrame:
    return pd.DataFrame([{"task": t, "doc_id": i, "correct": c} for t, cs in correct_by_task.items() for i, c in enumerate(cs)])


def test_bootstrap_of_identical_arms_is_zero_with_an_interval_containing_it():
    rng = np.random.default_rng(0)
    a = _items({"arc_easy": list(rng.integers(0, 2, 40)), "gsm8k": list(rng.integers(0, 2, 30))})
    out = paired_bootstrap(a, a.copy())
    assert list(out.index) == ["arc_easy", "gsm8k", "average"]
    assert (out["diff"] == 0).all() and (out["lo"] <= 0).all() and (out["hi"] >= 0).all()
    assert not out["outside_noise"].any()


def test_bootstrap_of_an_arm_right_where_the_other_is_wrong_excludes_zero_with_the_sign():
    right, wrong = _items({"arc_easy": [1] * 20, "squad": [1] * 10}), _items({"arc_easy": [0] * 20, "squad": [0] * 10})
    up, down = paired_bootstrap(right, wrong), paired_bootstrap(wrong, right)
    assert (up["diff"] == 100).all() and (up["lo"] > 0).all() and up["outside_noise"].all()
    assert (down["diff"] == -100).all() and (down["hi"] < 0).all() and down["outside_noise"].all()
    # one item per benchmark: the interval has no width, but one item is not a finding
    single = paired_bootstrap(_items({"arc_easy": [1]}), _items({"arc_easy": [0]}))
    assert single.at["arc_easy", "lo"] == 100 and not single["outside_noise"].any()


def test_bootstrap_mean_difference_is_exact_and_paired_on_items_and_seeded():
    # arc_easy: arm right on 6 of 10, base on 3 (+30 points); gsm8k: 1 of 4 against 2 of 4 (-25); average +2.5
    arm = _items({"arc_easy": [1] * 6 + [0] * 4, "gsm8k": [1, 0, 0, 0]})
    base = _items({"arc_easy": [1] * 3 + [0] * 7, "gsm8k": [1, 1, 0, 0]})
    base = base.sample(frac=1.0, random_state=1)  # order does not matter: items pair on (task, doc_id)
    out = paired_bootstrap(arm, base, n_resamples=500, seed=3)
    assert out.at["arc_easy", "diff"] == pytest.approx(30.0)
    assert out.at["gsm8k", "diff"] == pytest.approx(-25.0)
    assert out.at["average", "diff"] == pytest.approx(2.5)
    assert out.at["arc_easy", "n_items"] == 10
    assert out.equals(paired_bootstrap(arm, base, n_resamples=500, seed=3))
    # paired: every arc_easy item the base gets right the arm gets right too, so the difference is never negative
    assert out.at["arc_easy", "lo"] >= 0


def test_comparison_table_shows_stderr_budget_and_says_when_items_are_too_few():
    rng = np.random.default_rng(0)
    full = _items({"arc_easy": list(rng.integers(0, 2, 8)), "gsm8k": list(rng.integers(0, 2, 8))})
    arms = [
        {**ARMS[0], "scores": {"arc_easy": 50.0, "gsm8k": 25.0}, "average": 37.5, "stderr": {"arc_easy": 18.9, "gsm8k": 16.4},
         "samples": full},
        {**ARMS[1], "scores": {"arc_easy": 50.0, "gsm8k": 25.0}, "average": 37.5, "stderr": {"arc_easy": 18.9, "gsm8k": 16.4},
         "samples": full.copy(), "budget": "equal_tokens"},
    ]
    table = comparison_table(arms)
    assert table.at["qt", "budget"] == "equal_tokens" and table.at["full", "budget"] == "-"
    assert table.at["qt", "diff"] == 0 and not table.at["qt", "outside_noise"]
    text = format_table(table)
    assert "50.00 ± 18.90" in text
    assert "8 items per benchmark" in text and "are noise" in text
    assert "too few to separate the arms" in text
    assert "equal_tokens" in text
    md = format_table(table, markdown=True)
    assert md_cells(md.splitlines()[0])[:2] == ["arm", "budget"]


def test_an_equal_tokens_arm_below_its_budget_is_named_in_the_notes():
    arms = [{**ARMS[0], "budget": None},
            {**ARMS[1], "name": "random", "budget": "equal_tokens", "loss_tokens": 880, "budget_tokens": 1000},
            {**ARMS[1], "name": "reached", "budget": "equal_tokens", "loss_tokens": 1000, "budget_tokens": 1000}]
    table = comparison_table(arms)
    assert table.at["random", "budget_share"] == pytest.approx(0.88)
    text = format_table(table)
    assert "random (budget equal_tokens) trained 88% of the loss tokens Q-Tuning would have trained" in text
    assert "reached (budget" not in text and "budget_share" not in text


def test_comparison_table_marks_a_difference_outside_the_noise():
    base = _items({"arc_easy": [0] * 50})
    arms = [
        {**ARMS[0], "scores": {"arc_easy": 0.0}, "average": 0.0, "samples": base},
        {**ARMS[1], "scores": {"arc_easy": 100.0}, "average": 100.0, "samples": _items({"arc_easy": [1] * 50})},
    ]
    table = comparison_table(arms)
    assert bool(table.at["qt", "outside_noise"])
    text = format_table(table)
    assert "+100.00 [+100.00, +100.00]*" in text and "too few" not in text


def test_five_wins_to_none_is_not_a_finding_the_exact_test_says_why():
    """The percentile bootstrap puts 5 wins to 0 of 300 items above 0; the exact McNemar test gives p = 0.0625,
    and the table does not mark it."""
    from qtuning.report import mcnemar_exact

    base = [0] * 300
    arm = [1] * 5 + [0] * 295
    out = paired_bootstrap(_items({"arc_easy": arm}), _items({"arc_easy": base}))
    assert out.at["arc_easy", "lo"] > 0  # the interval alone would have marked it
    assert out.at["arc_easy", "p"] == pytest.approx(0.0625) == pytest.approx(mcnemar_exact(5, 0))
    assert not out.at["arc_easy", "outside_noise"]
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    table = comparison_table([{**ARMS[0], "scores": {"arc_easy": 0.0}, "average": 0.0, "samples": _items({"arc_easy": base})},
                              {**ARMS[1], "scores": {"arc_easy": 5 / 3}, "average": 5 / 3, "samples": _items({"arc_easy": arm})}])
    assert "*" not in format_table(table).split("Differences to")[0] and not table.at["qt", "outside_noise"]


def test_holm_adjusts_step_down_and_keeps_order():
    from qtuning.report import holm

    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adj == pytest.approx({"a": 0.04, "b": 0.09, "c": 0.09, "d": 0.5})
    assert holm({}) == {}


@pytest.mark.parametrize("n_items", [8, 300])
def test_under_the_null_at_most_five_percent_of_differences_are_marked(n_items):
    """Synthetic nulls: base and arm answer each item independently with the same chance of being right, so any
    difference is noise. Over 200 tables of two pruned arms on two benchmarks (a family of six tests each), the
    share of marked differences stays under 5%, and so does the share of tables with any mark (the family-wise
    error the correction controls), with room for the simulation's own error, at 8 items and at 300; and a real
    difference of 30 points at 300 items is found every time."""
    rng = np.random.default_rng(n_items)
    any_marked, marks, tests = 0, 0, 0
    reps = 200
    for rep in range(reps):
        p_right = rng.uniform(0.2, 0.8, size=2)
        def draw(shift=0.0):
            return _items({b: list((rng.random(n_items) < min(1.0, p + shift)).astype(int))
                           for b, p in zip(("arc_easy", "arc_challenge"), p_right)})
        arms = [{**ARMS[0], "name": "full", "samples": draw()}] + [
            {**ARMS[1], "name": f"arm{i}", "samples": draw()} for i in range(2)]
        table = comparison_table(arms, n_resamples=200, seed=rep)
        pruned = [a["name"] for a in arms[1:]]
        flags = [marked(table, a, pre) for a in pruned for pre in ("", "arc_easy_", "arc_challenge_")]
        any_marked += any(flags)
        marks += sum(flags)
        tests += len(flags)
    assert any_marked / reps <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / reps), any_marked
    assert marks / tests <= 0.05
    if n_items == 300:
        found = 0
        for rep in range(10):
            base = _items({"arc_easy": list((rng.random(300) < 0.4).astype(int))})
            better = _items({"arc_easy": list((rng.random(300) < 0.7).astype(int))})
            table = comparison_table([{**ARMS[0], "samples": base}, {**ARMS[1], "samples": better}], n_resamples=200, seed=rep)
            found += marked(table, "qt") and marked(table, "qt", "arc_easy_")
        assert found == 10


def test_headline_stderrs_read_lm_evals_stderr_of_the_headline_metric():
    from qtuning.evaluation.results import headline_stderrs

    results = {"results": {
        "qt_arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.4, "acc_norm_stderr,none": 0.2},
        "qt_gsm8k": {"exact_match,last_number": 0.25, "exact_match_stderr,last_number": 0.05, "exact_match,none": 0.0},
        "qt_squad": {"exact_match,none": 0.1, "exact_match_stderr,none": "N/A"},
    }}
    assert headline_stderrs(results) == pytest.approx({"arc_easy": 10.0, "gsm8k": 5.0})


def test_quadrant_shares_are_geometric_with_fill_ins_apart():
    from qtuning.report import quadrant_shares
    from qtuning.triage import triage

    ppl = np.arange(1.0, 9.0)
    ent = ppl.copy()
    ent[3], ent[4] = 8.0, 1.0
    t = triage(ppl, ent, ratio=0.25, iters=1)  # two fill-ins lying between the thresholds
    shares = quadrant_shares(t)
    assert sum(shares[f"q{q}"] for q in (1, 2, 3, 4)) + shares["none"] == pytest.approx(1.0)
    assert shares["q2"] == shares["q4"] == 0.0  # before fill-in, no row lies in Q2 or Q4
    assert shares["filled"] == shares["filled_from_none"] == 2 / 8
    assert shares["kept_q2"] == shares["kept_q4"] == 1 / 8  # what they count as


def test_eu_plane_marks_fill_ins_apart():
    ppl = np.arange(1.0, 9.0)
    ent = ppl.copy()
    ent[3], ent[4] = 8.0, 1.0
    scores = pd.DataFrame({"ppl": ppl, "ent": ent})
    fig, shares = eu_plane_figure(scores, 0.25, iters=1)
    labels = [h.get_label() for h in fig.axes[0].collections]
    assert any(l.startswith("filled in as Q2: 1") for l in labels) and any(l.startswith("filled in as Q4: 1") for l in labels)
