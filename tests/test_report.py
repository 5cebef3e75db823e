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
    assert md.startswith("| arm | arc_easy |") and md.count("\n") == 3


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
