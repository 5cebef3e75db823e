"""What the model learned, per sample: the selection log of a tiny run, its resume, and what is built from it
(migration figure, EU plane at chosen steps, the kept set as a data set); the held-out split and its loss."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qtuning.config import DataConfig, ExperimentConfig, PruningConfig, TrainingConfig
from qtuning.data import build_sft_dataset, load_rows, write_rows
from qtuning.modeling import load_tokenizer, tiny_model_config
from qtuning.report import eu_plane_at_steps, kept_ids, migration_figure, quadrant_transitions
from qtuning.selection import COLUMNS, STAGING, read_selection
from qtuning.train import HELDOUT_ROWS_FILE, train

FULL = dict(sample="all", token="all", sample_ratio=1.0, token_ratio=1.0)


def make_cfg(out: Path, pruning: dict | None = None, **training) -> ExperimentConfig:
    t = dict(micro_batch_size=8, lr=3e-3, epochs=3, schedule="constant", output_dir=str(out), max_grad_norm=None)
    t.update(training)
    return ExperimentConfig(
        name="sel", model=tiny_model_config(), data=DataConfig(source="arc", limit=16, max_length=128, eval_rows=4),
        pruning=PruningConfig(**(pruning or {})), training=TrainingConfig(**t),
    )


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A Q-Tuning run of 6 steps (16 rows, pools of 8, 3 epochs), held-out loss every 2 steps."""
    cfg = make_cfg(tmp_path_factory.mktemp("ref") / "out", checkpoint_every_steps=2, eval_every_steps=2)
    summary = train(cfg, progress=False)
    return cfg, summary, read_selection(cfg.training.output_dir)


def test_the_log_has_one_row_per_step_pool_and_sample(reference):
    cfg, summary, log = reference
    assert list(log.columns) == list(COLUMNS)
    assert not log.duplicated(["step", "pool", "sample_id"]).any()
    assert sorted(log["step"].unique()) == list(range(1, summary["optimizer_steps"] + 1))
    rows = summary["data_rows"]
    assert len(log) == 3 * rows  # every training row once per epoch
    assert (log.groupby("epoch")["sample_id"].nunique() == rows).all()
    # what the log says was trained is what the loop counted
    assert int(log["kept"].sum()) == summary["samples_trained"]
    assert int(log["loss_tokens"].sum()) == summary["loss_tokens"]
    assert (log.loc[~log["kept"], "loss_tokens"] == 0).all()
    kept = log[log["kept"]]
    assert (kept.loc[~kept["token_pruned"], "loss_tokens"] == kept.loc[~kept["token_pruned"], "response_tokens"]).all()
    pruned = kept[kept["token_pruned"]]  # ceil(r_t T) of T: fewer, but for a one-token response
    assert (pruned["loss_tokens"] <= pruned["response_tokens"]).all() and pruned["loss_tokens"].sum() < pruned["response_tokens"].sum()
    assert log["ppl"].notna().all() and set(log["quadrant"]) <= {0, 1, 2, 3, 4}
    assert not Path(cfg.training.output_dir, STAGING).exists()  # the staging files are gone once the parquet is written


def test_the_heldout_rows_are_never_trained_and_their_loss_is_logged(reference):
    cfg, summary, log = reference
    held = load_rows(cfg.data).heldout
    assert len(held) == 4 and not {e.sample_id for e in held} & set(log["sample_id"])
    metrics = [json.loads(l) for l in Path(cfg.training.output_dir, "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/loss" in m] == [2, 4, 6]
    last = metrics[-1]
    assert summary["heldout_loss"] == pytest.approx(last["eval/loss"]) and last["eval/ppl"] > 1
    assert summary["heldout_rows"] <= 4 and summary["heldout_tokens"] > 0
    first = next(m for m in metrics if "eval/loss" in m)
    assert last["eval/loss"] < first["eval/loss"]  # lr 3e-3 on ARC pairs: the held-out loss moves
    # the final measurement row by row: what a sweep resamples; its sums are the summary's loss
    per_row = [json.loads(l) for l in Path(cfg.training.output_dir, HELDOUT_ROWS_FILE).read_text().splitlines()]
    ids = [r["sample_id"] for r in per_row]
    assert len(set(ids)) == len(ids) == summary["heldout_rows"] and set(ids) <= {e.sample_id for e in held}
    assert sum(r["tokens"] for r in per_row) == summary["heldout_tokens"] and all(r["tokens"] > 0 for r in per_row)
    assert sum(r["nll"] for r in per_row) / summary["heldout_tokens"] == pytest.approx(summary["heldout_loss"], rel=1e-9)


def test_resume_neither_loses_nor_duplicates_rows(tmp_path, reference):
    _, _, want = reference
    cfg = make_cfg(tmp_path / "out", checkpoint_every_steps=2, eval_every_steps=2)

    def crash_at_step_5(metrics, step):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, progress=False, log_fn=crash_at_step_5)
    staged = Path(cfg.training.output_dir, STAGING)
    assert staged.is_dir() and not Path(cfg.training.output_dir, "selection.parquet").exists()
    train(cfg, resume=True, progress=False)  # from step 4: step 5's staged rows are dropped and redone
    got = read_selection(cfg.training.output_dir)
    assert not got.duplicated(["step", "pool", "sample_id"]).any()
    exact = [c for c in COLUMNS if c not in ("ppl", "ent")]
    pd.testing.assert_frame_equal(got[exact], want[exact])
    pd.testing.assert_frame_equal(got[["ppl", "ent"]], want[["ppl", "ent"]], rtol=1e-4)


def test_migration_figure_and_eu_planes_from_the_log(reference, tmp_path):
    _, _, log = reference
    counts = quadrant_transitions(log)
    assert int(counts.values.sum()) == 2 * log["sample_id"].nunique()  # epochs 0->1 and 1->2, every sample
    fig, summary = migration_figure(log, title="sel")
    fig.savefig(tmp_path / "migration.png")
    if (keep := __import__("os").environ.get("QTUNING_KEEP_FIGURES")):
        fig.savefig(Path(keep) / "migration.png")
    assert summary["epochs"] == 3 and summary["q2_to_q3"] == int(counts.loc[2, 3])
    assert (tmp_path / "migration.png").stat().st_size > 10_000
    eu_plane_at_steps(log).savefig(tmp_path / "eu_steps.png")
    assert (tmp_path / "eu_steps.png").stat().st_size > 10_000


def test_eu_plane_ticks_stay_readable_when_values_barely_differ(reference):
    """PPL spanning less than 3x (a linear axis) and entropies 1e-5 apart: few distinct plain tick labels, no
    offset text (they rendered as "2400026000280002900" and "1e-5+1.079e1")."""
    _, _, log = reference
    log = log.copy()
    n = len(log)
    log["ppl"] = 24_000 + 5_000 * (pd.Series(range(n), index=log.index) % 7) / 6
    log["ent"] = 10.79 + 1e-5 * (pd.Series(range(n), index=log.index) % 5) / 4
    fig = eu_plane_at_steps(log)
    fig.canvas.draw()
    for ax in fig.axes:
        for axis, labels in ((ax.xaxis, ax.get_xticklabels()), (ax.yaxis, ax.get_yticklabels())):
            texts = [t.get_text() for t in labels if t.get_text()]
            assert 2 <= len(texts) <= 6 and len(set(texts)) == len(texts), texts
            assert all(len(t) <= 8 for t in texts), texts
            assert axis.get_offset_text().get_text() == ""


def test_kept_set_is_a_data_set_to_train_on_again(reference, tmp_path):
    cfg, _, log = reference
    ids = kept_ids(log, "any")
    last = kept_ids(log, "last_epoch")
    assert set(last) <= set(ids) <= set(log["sample_id"]) and len(last) == int(log.loc[log["epoch"] == 2, "kept"].sum())
    subset = tmp_path / "kept_ids.txt"
    subset.write_text("\n".join(ids) + "\n")
    tok = load_tokenizer(tiny_model_config())
    narrowed = build_sft_dataset(cfg.data.model_copy(update={"subset": str(subset)}), tok, progress=False)
    assert sorted(narrowed.dataset["sample_id"]) == sorted(ids)  # usable as data.subset
    rows = write_rows(cfg.data, ids, tmp_path / "kept.jsonl")
    again = load_rows(DataConfig(source=str(rows), id_field="id"))
    assert sorted(e.sample_id for e in again.examples) == sorted(ids)  # and as a data set of its own


def test_a_full_data_run_logs_every_row_kept_without_scores(tmp_path):
    cfg = make_cfg(tmp_path / "out", FULL, epochs=1)
    summary = train(cfg, progress=False, save=False)
    log = read_selection(cfg.training.output_dir)
    assert log["kept"].all() and log["ppl"].isna().all() and (log["quadrant"] == 0).all()
    assert int(log["loss_tokens"].sum()) == summary["loss_tokens"]
    fig, s = migration_figure(log)
    assert s["transitions"] == 0 and s["samples"] == 0


def test_heldout_split_config_is_checked():
    with pytest.raises(ValueError, match="needs a held-out split"):
        ExperimentConfig(training=TrainingConfig(eval_every_steps=2))
    with pytest.raises(ValueError, match="eval_source"):
        DataConfig(eval_source="/no/such/file.jsonl")
    with pytest.raises(Exception, match="hold out all"):
        load_rows(DataConfig(source="arc", eval_rows=10**6))


def test_heldout_rows_do_not_depend_on_limit_and_change_the_fingerprint():
    from qtuning.data import fingerprint

    a, b = load_rows(DataConfig(source="arc", limit=8, eval_rows=4)), load_rows(DataConfig(source="arc", limit=32, eval_rows=4))
    assert [e.sample_id for e in a.heldout] == [e.sample_id for e in b.heldout]
    assert [e.sample_id for e in load_rows(DataConfig(source="arc", limit=8)).examples] == [e.sample_id for e in a.examples]
    tok = load_tokenizer(tiny_model_config())
    assert fingerprint(DataConfig(source="arc", limit=8), tok) != fingerprint(DataConfig(source="arc", limit=8, eval_rows=4), tok)


def test_heldout_rows_from_a_separate_file(tmp_path, write_jsonl):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    path = write_jsonl(rows, "held.jsonl")
    loaded = load_rows(DataConfig(source="arc", limit=8, eval_source=str(path), eval_rows=3))
    assert len(loaded.examples) == 8 and len(loaded.heldout) == 3
    assert {e.messages[0]["content"] for e in loaded.heldout} <= {r["prompt"] for r in rows}
