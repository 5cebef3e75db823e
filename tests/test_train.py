"""The training loop on a tiny random llama with the real tokenizer: invariances, learning, determinism, resume."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from conftest import assert_grads_close
from qtuning.config import DataConfig, ExperimentConfig, PruningConfig, TrainingConfig
from qtuning.data import build_sft_dataset
from qtuning.modeling import load_model, load_tokenizer, tiny_model_config
from qtuning.data import collate
from qtuning.train import learn, select_pool, train

FULL = dict(sample="all", token="all", sample_ratio=1.0, token_ratio=1.0)


def make_cfg(tmp_path: Path, pruning: dict | None = None, **training) -> ExperimentConfig:
    t = dict(micro_batch_size=8, lr=3e-3, epochs=3, schedule="constant", output_dir=str(tmp_path / "out"), max_grad_norm=None)
    t.update(training)
    return ExperimentConfig(
        name="test",
        model=tiny_model_config(),
        data=DataConfig(source="arc", limit=16, max_length=128),
        pruning=PruningConfig(**(pruning or {})),
        training=TrainingConfig(**t),
    )


@pytest.fixture(scope="module")
def rows():
    tok = load_tokenizer(tiny_model_config())
    data = build_sft_dataset(DataConfig(source="arc", limit=16, max_length=128), tok, progress=False).dataset
    return tok, list(data["input_ids"]), list(data["labels"])


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _learn(model, cfg, batches, gen_seed=0):
    """Stages 1-4 of one optimizer step on the given pools; returns the gradients."""
    model = copy.deepcopy(model)
    acc = Accelerator(cpu=True)
    pools = [select_pool(model, b, cfg, torch.Generator().manual_seed(gen_seed + i)) for i, b in enumerate(batches)]
    learn(acc, model, pools, cfg)
    return _grads(model), pools


@pytest.mark.numerics
@pytest.mark.parametrize("sample,token", [("qtuning", "qtuning"), ("infobatch", "random"), ("longest", "ppl")])
def test_kept_rows_step_equals_masked_full_batch_step(tmp_path, rows, sample, token):
    tok, ids, labels = rows
    set_seed(0)
    model = load_model(tiny_model_config())
    batch = collate(ids[:8], labels[:8], tok.pad_token_id)
    kept_cfg = make_cfg(tmp_path, dict(sample=sample, token=token))
    masked_cfg = make_cfg(tmp_path, dict(sample=sample, token=token, train_on="masked_batch"))
    g_kept, p_kept = _learn(model, kept_cfg, [batch])
    g_masked, p_masked = _learn(model, masked_cfg, [batch])
    assert torch.equal(p_kept[0].sel.keep, p_masked[0].sel.keep)
    assert p_kept[0].batch.input_ids.shape[0] == int(p_kept[0].sel.keep.sum()) < 8  # only kept rows were fed
    assert p_masked[0].batch.input_ids.shape[0] == 8
    assert_grads_close(g_kept, g_masked, terms=int(batch.attention_mask.sum()))


@pytest.mark.numerics
def test_gradient_accumulation_equals_one_larger_batch(tmp_path, rows):
    tok, ids, labels = rows
    set_seed(0)
    model = load_model(tiny_model_config())
    halves = [collate(ids[:4], labels[:4], tok.pad_token_id), collate(ids[4:8], labels[4:8], tok.pad_token_id)]
    whole = collate(ids[:8], labels[:8], tok.pad_token_id)
    g_accum, _ = _learn(model, make_cfg(tmp_path, FULL, micro_batch_size=4, grad_accum_steps=2), halves)
    g_whole, _ = _learn(model, make_cfg(tmp_path, FULL, micro_batch_size=8), [whole])
    g_split, _ = _learn(model, make_cfg(tmp_path, {**FULL, "selection_batch_size": 8}, micro_batch_size=3), [whole])
    assert_grads_close(g_accum, g_whole, terms=int(whole.attention_mask.sum()))
    assert_grads_close(g_split, g_whole, terms=int(whole.attention_mask.sum()))


def _eval_loss(model_dir_or_model, tok, ids, labels) -> float:
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model_dir_or_model)
    b = collate(ids, labels, tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss.item()


@pytest.mark.parametrize(
    "sample,token",
    [
        ("all", "all"),
        ("qtuning", "qtuning"),
        ("random", "random"),
        ("longest", "ppl"),
        ("infobatch", "qtuning"),
        ("ppl", "random"),
        ("entropy", "ppl"),
    ],
)
def test_a_few_steps_lower_the_loss(tmp_path, rows, sample, token):
    tok, ids, labels = rows
    pruning = FULL if sample == "all" else dict(sample=sample, token=token)
    cfg = make_cfg(tmp_path, pruning)
    set_seed(cfg.training.seed)
    before = _eval_loss(load_model(cfg.model), tok, ids, labels)
    summary = train(cfg, progress=False)
    after = _eval_loss(summary["final_dir"], tok, ids, labels)
    assert after < before - 0.1, (before, after)
    assert summary["optimizer_steps"] == 6  # 16 rows, pools of 8, 3 epochs: every method gets the same steps
    metrics = [json.loads(l) for l in Path(cfg.training.output_dir, "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6
    kept = sum(m["prune/kept_samples"] for m in metrics) / 6
    if sample == "infobatch":  # published InfoBatch keeps every row above the pool's mean loss: more than K
        assert 0.25 <= kept < 1.0
    else:
        assert kept == 1.0 if sample == "all" else 0.25 <= kept < 0.5


def _decisions(path: Path) -> list[dict]:
    """Per-step metrics without wall-clock figures: what was kept, and what it learned."""
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k.startswith("time/") or k.endswith("_per_second"))} for r in rows]


@pytest.mark.numerics
def test_same_seed_same_decisions(tmp_path, rows):
    a = make_cfg(tmp_path / "a", dict(sample="qtuning", token="qtuning"), epochs=2)
    b = make_cfg(tmp_path / "b", dict(sample="qtuning", token="qtuning"), epochs=2)
    train(a, progress=False, save=False)
    train(b, progress=False, save=False)
    da = _decisions(Path(a.training.output_dir, "metrics.jsonl"))
    db = _decisions(Path(b.training.output_dir, "metrics.jsonl"))
    assert da == db
    # decisions that depend on the pools (so equal histories say something): the triage's alpha and the quadrant
    # counts move from pool to pool, and every pool drops rows
    assert len(da) > 1 and len({m["prune/alpha"] for m in da}) > 1 and len({m["prune/q1"] for m in da}) > 1
    assert all(m["prune/kept_samples"] < 1 for m in da)


def test_a_pool_that_keeps_no_row_trains_nothing_and_the_step_is_skipped(tmp_path, rows):
    """InfoBatch against the data set's mean can drop every row of a pool (all below the threshold, none drawn to
    survive): the pool is an empty batch, and a step of such pools is skipped rather than failing."""
    tok, ids, labels = rows
    set_seed(0)
    model = load_model(tiny_model_config())
    cfg = make_cfg(tmp_path, dict(sample="infobatch", token="random", sample_ratio=0.01))
    pool = select_pool(model, collate(ids[:8], labels[:8], tok.pad_token_id), cfg, torch.Generator().manual_seed(0),
                       threshold=1e9)
    assert pool.batch.input_ids.shape[0] == 0 and int(pool.loss_tokens) == 0 and not pool.sel.keep.any()
    from accelerate import Accelerator

    assert learn(Accelerator(cpu=True), model, [pool], cfg).skipped


def test_infobatch_keeps_a_data_set_score_table_and_anneals_the_last_steps(tmp_path, rows):
    """Published InfoBatch in the loop: every scored row's loss enters the score table (saved in the checkpoint's
    TrainState), the threshold of a step is the table's mean before it, and the last round(steps x anneal) steps
    keep every row. 15 rows in pools of 8 for 4 epochs: 8 steps, the last 2 anneal at anneal=0.25."""
    from qtuning.checkpoints import TrainState

    cfg = make_cfg(tmp_path, dict(sample="infobatch", token="random", anneal=0.25), epochs=4, checkpoint_every_steps=4,
                   keep_checkpoints_after_training=True)
    summary = train(cfg, progress=False)
    assert summary["optimizer_steps"] == 8
    metrics = _decisions(Path(cfg.training.output_dir, "metrics.jsonl"))
    kept = [m["prune/kept_samples"] for m in metrics]
    assert kept[-2:] == [1.0, 1.0] and min(kept[:-2]) < 1.0, kept
    saved = TrainState(**json.loads(Path(cfg.training.output_dir, "checkpoints", "step-8", "trainer_state.json").read_text()))
    assert sorted(map(int, saved.seen_loss)) == list(range(summary["data_rows"]))  # every row of the data set, by index
    assert all(0 < v < 20 for v in saved.seen_loss.values())


class Stop(Exception):
    pass


@pytest.mark.numerics
@pytest.mark.parametrize("pruning", [dict(sample="qtuning", token="qtuning"), dict(sample="infobatch", token="random")],
                         ids=["qtuning", "infobatch"])  # infobatch: its score table comes back with the checkpoint
def test_resume_after_a_stop_continues_with_identical_decisions(tmp_path, rows, pruning):
    ref = make_cfg(tmp_path / "ref", pruning, checkpoint_every_steps=2)
    train(ref, progress=False)

    cfg = make_cfg(tmp_path / "run", pruning, checkpoint_every_steps=2)

    def crash_at_step_4(metrics, step):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, progress=False, log_fn=crash_at_step_4)
    ckpts = sorted(p.name for p in Path(cfg.training.output_dir, "checkpoints").iterdir())
    assert ckpts == ["step-2"]  # step 4's checkpoint was never written
    with Path(cfg.training.output_dir, "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "train/lo')  # and the disk filled mid-line: a torn last line, no newline
    summary = train(cfg, resume=True, progress=False)
    assert summary["optimizer_steps"] == 6
    got = _decisions(Path(cfg.training.output_dir, "metrics.jsonl"))
    want = _decisions(Path(ref.training.output_dir, "metrics.jsonl"))
    assert [m["step"] for m in got] == list(range(1, 7))  # steps 3-4 were redone, not duplicated
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "train/loss"} == {k: v for k, v in w.items() if k != "train/loss"}
        assert g["train/loss"] == pytest.approx(w["train/loss"], rel=1e-4)


def test_accelerate_launch_two_cpu_processes(tmp_path):
    cfg = make_cfg(tmp_path, dict(sample="qtuning", token="qtuning"), epochs=2)
    path = cfg.save(tmp_path / "run.yaml")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "qtuning.train", "--config", str(path), "--no-progress",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(Path(cfg.training.output_dir, "summary.json").read_text())
    assert summary["world_size"] == 2
    # <= 16 rows = 2 pools per epoch, 2 epochs = 4 pools; each process takes one pool per step
    assert summary["optimizer_steps"] == 2
    assert summary["samples_seen"] == 2 * summary["data_rows"]  # every row seen once per epoch, across both ranks
    assert Path(summary["final_dir"], "config.json").exists()
    from qtuning.selection import read_selection

    log = read_selection(cfg.training.output_dir)  # both processes' pools, each sample once per (step, pool)
    assert len(log) == summary["samples_seen"] and not log.duplicated(["step", "pool", "sample_id"]).any()
    assert sorted(log["pool"].unique()) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- issue 10
def test_all_tokens_denominator_leaves_pruned_tokens_out(tmp_path, rows):
    """loss_norm: all_tokens divides by kept rows' non-pad positions less their pruned response tokens (the authors'
    code), so the option that reproduces their code does not train with a smaller effective learning rate."""
    from qtuning.data import IGNORE_INDEX as IGNORE
    from qtuning.train import loss_denominator

    tok, ids, labels = rows
    set_seed(0)
    model = load_model(tiny_model_config())
    batch = collate(ids[:8], labels[:8], tok.pad_token_id)
    for train_on in ("kept_rows", "masked_batch"):
        cfg = make_cfg(tmp_path, dict(sample="random", token="random", loss_norm="all_tokens", train_on=train_on))
        p = select_pool(model, batch, cfg, torch.Generator().manual_seed(0))
        keep = p.sel.keep
        positions = int(batch.attention_mask[keep][:, 1:].sum())
        pruned = int(((batch.labels[keep][:, 1:] != IGNORE) & (p.batch.labels[keep.nonzero().flatten()][:, 1:] == IGNORE)).sum()) \
            if train_on == "masked_batch" else int((batch.labels[keep][:, 1:] != IGNORE).sum() - p.loss_tokens)
        assert pruned > 0
        assert float(loss_denominator(p, "all_tokens")) == positions - pruned, train_on


def test_q2_token_keep_counts_the_token_pruned_rows_only(tmp_path, rows):
    import math

    from qtuning.data import IGNORE_INDEX as IGNORE

    tok, ids, labels = rows
    set_seed(0)
    model = load_model(tiny_model_config())
    batch = collate(ids[:8], labels[:8], tok.pad_token_id)
    p = select_pool(model, batch, make_cfg(tmp_path, dict(token_ratio=0.5)), torch.Generator())
    prunable = p.sel.keep & p.sel.prune_tokens
    resp = (batch.labels[:, 1:] != IGNORE).sum(1)
    before, after = p.q2_tokens.tolist()
    assert before == int(resp[prunable].sum())
    assert after == sum(math.ceil(0.5 * int(t)) for t in resp[prunable])  # per_sample: ceil(r_t T) of each Q2 row


def test_a_step_without_loss_tokens_is_skipped_and_counted(tmp_path, rows, monkeypatch):
    """Step 2's pool carries no loss token: no optimizer step (AdamW's momentum would still move the weights), no
    scheduler step, counted in train/skipped_steps; the weights equal those after step 1."""
    import qtuning.train as T
    from qtuning.data import IGNORE_INDEX as IGNORE
    from transformers import AutoModelForCausalLM

    one = make_cfg(tmp_path / "one", FULL, max_steps=1, warmup_steps=3)
    train(one, progress=False)

    select, calls = T.select_pool, []

    def second_pool_empty(model, batch, cfg, gen):
        calls.append(1)
        if len(calls) == 2:
            batch = type(batch)(batch.input_ids, batch.attention_mask, torch.full_like(batch.labels, IGNORE))
        return select(model, batch, cfg, gen)

    monkeypatch.setattr(T, "select_pool", second_pool_empty)
    two = make_cfg(tmp_path / "two", FULL, max_steps=2, warmup_steps=3)
    summary = train(two, progress=False)
    assert summary["optimizer_steps"] == 2 and summary["skipped_steps"] == 1
    m = [json.loads(l) for l in Path(two.training.output_dir, "metrics.jsonl").read_text().splitlines()]
    assert [x["train/skipped_steps"] for x in m] == [0, 1]
    assert "train/loss" not in m[1] and m[1]["train/loss_tokens"] == m[0]["train/loss_tokens"]
    assert m[1]["train/lr"] == m[0]["train/lr"]  # the warmup did not advance
    a = AutoModelForCausalLM.from_pretrained(Path(one.training.output_dir, "final")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(Path(two.training.output_dir, "final")).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_nonfinite_scores_stop_the_run_with_the_sample_ids(tmp_path, rows, monkeypatch):
    import qtuning.train as T
    from qtuning.pruning import NonFiniteScores

    def nan_in_row_1(*args, **kwargs):
        raise NonFiniteScores([1], [float("nan")], [1.0])

    monkeypatch.setattr(T, "select_pool", nan_in_row_1)
    cfg = make_cfg(tmp_path, dict(sample="qtuning", token="qtuning"), max_steps=1)
    with pytest.raises(NonFiniteScores, match=r"row-\d+ \(ppl=nan") as err:
        train(cfg, progress=False, save=False)
    assert err.value.names[0].startswith("row-") and "pool row" not in str(err.value)


def test_qtuning_train_answers_help_before_loading_torch_and_refuses_in_one_line(tmp_path):
    """`qtuning train --help` parses before torch, transformers and datasets load; a config the machine cannot
    run (bf16 on a CPU) is one line and exit 2, as in `qtuning run`, not a traceback."""
    probe = ("import sys\nfrom qtuning.train_cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
             "    assert e.code == 0\nheavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
             "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "qtuning train" in res.stdout and "--resume" in res.stdout

    cfg = make_cfg(tmp_path, dict(sample="qtuning", token="qtuning"), precision="bf16")
    path = cfg.save(tmp_path / "run.yaml")
    res = subprocess.run([sys.executable, "-m", "qtuning.train", "--config", str(path), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = [l for l in res.stderr.splitlines() if l.startswith("qtuning train:")]
    assert lines and "training.precision: bf16 needs a GPU" in lines[0] and "Traceback" not in res.stderr


def test_an_equal_tokens_arm_reports_the_budget_it_was_given(tmp_path):
    """budget: equal_tokens meets Q-Tuning's count only where the kept rows hold enough tokens: the summary keeps
    the budget summed over the pools, and the arm's loss tokens never exceed it."""
    cfg = make_cfg(tmp_path, {"sample": "random", "token": "random", "sample_ratio": 0.25, "token_ratio": 0.5,
                              "budget": "equal_tokens"}, epochs=1)
    s = train(cfg, progress=False, save=False)
    assert 0 < s["loss_tokens"] <= s["budget_tokens"]
    own = train(make_cfg(tmp_path / "own", {"sample": "random", "token": "random", "sample_ratio": 0.25, "token_ratio": 0.5},
                         epochs=1), progress=False, save=False)
    assert "budget_tokens" not in own
