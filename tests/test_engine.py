"""The engine at scale on CPU: lanes, the chunked loss, N processes = one, every core, refusals before loading."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FP32_EPS, GRAD_TOL, assert_grads_close, skip_unless_bf16_attention_runs_here
from qtuning.config import ConfigError, DataConfig, ExperimentConfig, PipelineConfig, PruningConfig, TrainingConfig, validate
from qtuning.data import IGNORE_INDEX as IGNORE
from qtuning.data import build_sft_dataset, collate
from qtuning.lm import ChunkedLM, build_lanes, lane_plan, lanes_forward, loss_targets, unpad
from qtuning.modeling import tiny_model_config
from qtuning.scoring import score_tokens
from qtuning.devices import check_device
from qtuning.train import micro_batch_plan, train


@pytest.fixture(scope="module")
def arc_batch(tokenizer):
    data = build_sft_dataset(DataConfig(source="arc", limit=8, max_length=128), tokenizer, progress=False).dataset
    return collate(list(data["input_ids"]), list(data["labels"]), tokenizer.pad_token_id)


# --------------------------------------------------------------------------- lanes
@pytest.mark.numerics
@pytest.mark.parametrize("layout,pack_tokens", [("packed", 200), ("packed", 4096), ("padded", 512)])
def test_a_rows_scores_alone_equal_its_scores_among_batch_mates(tiny_model, arc_batch, layout, pack_tokens):
    b = arc_batch
    together = score_tokens(tiny_model.eval(), b.input_ids, b.attention_mask, b.labels, layout=layout, pack_tokens=pack_tokens)
    if layout == "packed":
        assert together.fed_tokens < b.attention_mask.numel()  # several rows shared a lane: less than padded
    for r in range(b.input_ids.shape[0]):
        n = int(b.attention_mask[r].sum())
        alone = score_tokens(tiny_model, b.input_ids[r : r + 1, :n], b.attention_mask[r : r + 1, :n], b.labels[r : r + 1, :n])
        torch.testing.assert_close(together.nll[r, :n], alone.nll[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.ent[r, :n], alone.ent[0], rtol=1e-4, atol=1e-5)


def _reference_loss(model, b, row_weight):
    """The textbook loss: full logits of the padded batch, sum of w_row * NLL over label tokens."""
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE, reduction="none").view(b.labels.shape[0], -1)
    return (nll * row_weight[:, None]).sum()


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [7, 4096])  # logit scales, softcaps, adapters on the head: tests/test_heads.py
def test_chunked_loss_and_its_gradient_equal_the_full_logits_ones(tiny_model, arc_batch, chunk):
    model, b = tiny_model.train(), arc_batch
    row_w = torch.linspace(0.5, 2.0, b.input_ids.shape[0])
    ref = _reference_loss(model, b, row_w)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    rows, lengths = unpad(b.input_ids, b.attention_mask)
    lanes = build_lanes(rows, list(loss_targets(b.labels)), lane_plan(lengths, "packed", 100), pad_id=0)
    got = lanes_forward(ChunkedLM(model), lanes, row_w[lanes.row], chunk)
    got.backward()
    terms = int(b.attention_mask.sum())
    torch.testing.assert_close(got, ref, rtol=GRAD_TOL * FP32_EPS * terms ** 0.5, atol=0)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want, terms)


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["bf16 weights", "fp32 weights, bf16 autocast"])
def test_the_chunked_loss_in_bf16_follows_the_fp32_one(tiny_model, arc_batch, mode):
    # the GPU's precisions, run on the CPU: gradients come back in each weight's dtype and point where fp32's do
    skip_unless_bf16_attention_runs_here()
    b, row_w = arc_batch, torch.linspace(0.5, 2.0, arc_batch.input_ids.shape[0])
    rows, lengths = unpad(b.input_ids, b.attention_mask)
    lanes = build_lanes(rows, list(loss_targets(b.labels)), lane_plan(lengths, "packed", 100), pad_id=0)
    model = tiny_model.train()
    ref = lanes_forward(ChunkedLM(model), lanes, row_w[lanes.row], 64)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    if mode == "bf16 weights":
        model.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "bf16 weights"):
        got = lanes_forward(ChunkedLM(model), lanes, row_w[lanes.row], 64)
    got.backward()
    assert got.dtype == torch.float32  # the loss sum is accumulated in fp32 whatever the matmuls ran in
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)
    for n, p in model.named_parameters():
        assert p.grad.dtype == p.dtype, n
        cos = F.cosine_similarity(p.grad.float().flatten(), want[n].flatten(), dim=0)
        assert cos > 0.98, (n, float(cos))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_a_training_step_never_holds_the_logits_of_its_micro_batch(tiny_model, arc_batch):
    b = arc_batch
    rows, lengths = unpad(b.input_ids, b.attention_mask)
    lanes = build_lanes(rows, list(loss_targets(b.labels)), [[i] for i in range(len(rows))], pad_id=0)
    vocab, chunk = tiny_model.config.vocab_size, 32
    full_logits = b.input_ids.numel() * vocab  # what model(...).logits of the micro-batch holds
    with _LargestTensor() as seen:
        lanes_forward(ChunkedLM(tiny_model.train()), lanes, torch.ones(len(lanes.src)), chunk).backward()
    embedding = tiny_model.get_input_embeddings().weight.numel()
    assert seen.numel <= max(chunk * vocab, embedding) < full_logits / 4, (seen.numel, full_logits)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_micro_batches_hold_every_row_once_and_no_more_than_a_padded_micro_batch(layout):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 250, (21,), generator=g).tolist()
    t = TrainingConfig(micro_batch_size=4, layout=layout, pack_tokens=300, group_by_length=True)
    plan = micro_batch_plan(lengths, t)
    rows = sorted(i for mb in plan for lane in mb for i in lane)
    assert rows == list(range(21))
    for mb in plan:
        width = max(sum(lengths[i] for i in lane) for lane in mb)
        assert len(mb) * width <= t.micro_batch_size * max(lengths)
    fed = sum(len(mb) * max(sum(lengths[i] for i in lane) for lane in mb) for mb in plan)
    padded = sum(max(lengths[i] for i in range(s, min(21, s + 4))) * len(range(s, min(21, s + 4))) for s in range(0, 21, 4))
    if layout == "packed":
        assert 1 - sum(lengths) / fed < 0.10 < 1 - sum(lengths) / padded  # what packing is for
    else:
        assert [lane[0] for mb in plan for lane in mb] == sorted(range(21), key=lambda i: -lengths[i])


def test_packing_widens_lanes_only_where_it_saves_positions():
    # rows of one length: packing saves no position and widens each lane's attention, so one row per lane
    assert lane_plan([256] * 8, "packed", 512) == [[i] for i in range(8)]
    # one long row among short ones: one row per lane would feed 8 x 256 positions, packing about half
    lengths = [256] + [100] * 7
    plan = lane_plan(lengths, "packed", 512)
    assert sorted(i for lane in plan for i in lane) == list(range(8))  # every row once
    fed = len(plan) * max(sum(lengths[i] for i in lane) for lane in plan)
    assert fed <= 0.6 * 8 * 256, plan


# --------------------------------------------------------------------------- config and device refusals
def test_bad_combinations_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        validate(ExperimentConfig, {"training": {"weight_dtype": "bf16", "precision": "fp32"}, "model": {"attn_implementation": "flash_attention_2"}})
    msg = str(e.value)
    assert "training.weight_dtype: bf16 with training.precision: fp32" in msg and "use training.precision: bf16" in msg
    assert "flash_attention_2 runs in bf16/fp16 only" in msg  # both problems at once
    if not torch.cuda.is_available():
        cfg = ExperimentConfig(training=TrainingConfig(precision="bf16", weight_dtype="bf16"))
        with pytest.raises(ValueError) as e:
            check_device(cfg)
        assert "training.precision: bf16 needs a GPU" in str(e.value) and "training.weight_dtype: bf16 needs a GPU" in str(e.value)


def _cfg(tmp_path: Path, pruning: dict | None = None, **training) -> ExperimentConfig:
    t = dict(micro_batch_size=4, lr=1e-3, epochs=1, schedule="constant", output_dir=str(tmp_path / "out"), max_grad_norm=None)
    return ExperimentConfig(
        name="engine", model=tiny_model_config(), data=DataConfig(source="arc", limit=16, max_length=128),
        pruning=PruningConfig(**(pruning or dict(sample="qtuning", token="qtuning", sample_ratio=0.5, token_ratio=0.5))),
        training=TrainingConfig(**{**t, **training}),
    )


def test_grouping_by_length_changes_no_pool(tmp_path, monkeypatch):
    """group_by_length sorts a step's trained rows; it used to regroup the pools, and so the triage."""
    import qtuning.train as T

    runs, select = [], T.select_pool
    for flag in (False, True):
        cfg = _cfg(tmp_path / str(flag), layout="padded", group_by_length=flag, micro_batch_size=2)
        cfg = cfg.model_copy(update={"pruning": cfg.pruning.model_copy(update={"selection_batch_size": 8})})
        pools = []

        def spy(model, batch, *args, pools=pools, select=select):
            p = select(model, batch, *args)
            pools.append(([tuple(r) for r in batch.input_ids.tolist()], p.sel.keep.tolist()))
            return p

        monkeypatch.setattr(T, "select_pool", spy)
        train(cfg, progress=False, save=False)
        runs.append(pools)
    assert [rows for rows, _ in runs[0]] == [rows for rows, _ in runs[1]]  # the same rows triaged together
    assert runs[0][0] == runs[1][0]  # and, on the same weights, the same decisions (later steps differ by float noise)


# --------------------------------------------------------------------------- processes and cores
def _launch(cfg: ExperimentConfig, path: Path, processes: int) -> dict:
    from tasks.training import launch_command, launch_env

    pipe = PipelineConfig(num_processes=processes, progress=False)
    env = launch_env(None, pipe)
    env.pop("OMP_NUM_THREADS", None)  # what a fresh shell has: the launcher alone must share the cores out
    res = subprocess.run(launch_command(cfg.save(path), cfg, pipe, resume=False), env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(Path(cfg.training.output_dir, "summary.json").read_text())


def test_the_launcher_gives_one_process_every_core(tmp_path):
    summary = _launch(_cfg(tmp_path, max_steps=1), tmp_path / "run.yaml", processes=1)
    assert summary["cpu_threads"] == len(os.sched_getaffinity(0))


def _weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(summary["final_dir"], "model.safetensors")))


@pytest.mark.numerics
@pytest.mark.parametrize("rules", ["full", "qtuning"])
def test_two_processes_take_the_step_of_one_process_with_the_same_global_batch(tmp_path, rules):
    """Each process normalises by the whole step's loss tokens: N processes x 1 pool = 1 process x N pools.

    Adam's first step moves every weight by about lr whatever the gradient's scale, so weights that agree to
    lr / 20 agree in the sign of every gradient entry; a mean of per-process means would flip many."""
    pruning = dict(sample="all", token="all", sample_ratio=1.0, token_ratio=1.0) if rules == "full" else None
    two = _launch(_cfg(tmp_path / "two", pruning, max_steps=1), tmp_path / "two.yaml", processes=2)
    assert two["world_size"] == 2 and two["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    one = train(_cfg(tmp_path / "one", pruning, max_steps=1, grad_accum_steps=2), progress=False)
    assert two["samples_seen"] == one["samples_seen"] == 8 and two["loss_tokens"] == one["loss_tokens"]
    if rules == "full":  # the two pools carry different token counts, so per-process means would not do
        steps = [json.loads(l) for l in Path(one["final_dir"]).parent.joinpath("metrics.jsonl").read_text().splitlines()]
        assert steps[0]["train/loss_tokens"] == one["loss_tokens"] and _pool_tokens_differ(tmp_path)
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)
    w1, w2, w0 = _weights(one), _weights(two), _weights_before()
    for name, w in w1.items():
        torch.testing.assert_close(w2[name], w, rtol=0, atol=1e-3 / 20, msg=name)
    assert sum(not torch.equal(w, w0[name]) for name, w in w1.items()) > len(w1) // 2  # the step moved the weights


@pytest.mark.numerics
def test_two_processes_share_infobatchs_score_table(tmp_path):
    """InfoBatch's threshold is the mean of a score table every process must hold whole: each step's (row, loss)
    pairs are gathered, so two processes with a pool each decide what one process with both pools decides, at
    every step (a table of one's own pools would give each process another threshold from the second step on)."""
    pruning = dict(sample="infobatch", token="random", sample_ratio=0.25, token_ratio=1.0, anneal=0.0)
    two = _launch(_cfg(tmp_path / "two", pruning, max_steps=2), tmp_path / "two.yaml", processes=2)
    one = train(_cfg(tmp_path / "one", pruning, max_steps=2, grad_accum_steps=2), progress=False)
    read = lambda s: [json.loads(l) for l in Path(s["final_dir"]).parent.joinpath("metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [m["train/samples_trained"] for m in read(two)] == [m["train/samples_trained"] for m in read(one)]
    assert two["samples_trained"] == one["samples_trained"] and two["loss_tokens"] == one["loss_tokens"]
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)


def _pool_tokens_differ(tmp_path: Path) -> bool:
    import numpy as np

    from qtuning.modeling import load_tokenizer
    from qtuning.train import pool_order

    cfg = _cfg(tmp_path)
    data = build_sft_dataset(cfg.data, load_tokenizer(cfg.model), progress=False).dataset
    pools = pool_order(np.asarray(data["length"]), 4, cfg.training.seed, 0)[:2]
    tokens = [sum(int((torch.tensor(data[int(i)]["labels"][1:]) != IGNORE).sum()) for i in p) for p in pools]
    return tokens[0] != tokens[1]


def _weights_before() -> dict[str, torch.Tensor]:
    from accelerate.utils import set_seed

    from qtuning.modeling import load_model

    if not hasattr(_weights_before, "cache"):
        set_seed(0)
        _weights_before.cache = {k: v.clone() for k, v in load_model(tiny_model_config()).state_dict().items()}
    return _weights_before.cache


def test_gradient_checkpointing_and_lora_take_the_same_path(tmp_path):
    """Checkpointing recomputes activations and changes no number; LoRA trains through the chunked head frozen."""
    plain = train(_cfg(tmp_path / "plain", max_steps=2), progress=False, save=False)
    ckpt = train(_cfg(tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True), progress=False, save=False)
    assert ckpt["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5) and ckpt["loss_tokens"] == plain["loss_tokens"]
    cfg = _cfg(tmp_path / "lora", max_steps=2, gradient_checkpointing=True)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"finetune": "lora", "lora_r": 4})})
    lora = train(cfg, progress=False)
    w0 = _weights_before()
    merged = _weights(lora)
    assert any(not torch.equal(w, w0[n]) for n, w in merged.items() if "proj" in n)  # the adapters moved, merged in
    assert torch.equal(merged["model.embed_tokens.weight"], w0["model.embed_tokens.weight"])  # the head is frozen
