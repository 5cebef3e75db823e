"""`qtuning doctor`: every code path this machine can run, once, on small shapes; one table, exit 1 on a failure.

    qtuning doctor                       # the first command on a new machine (no network: the asset cache only)
    qtuning doctor --json doctor.json    # also the table and the machine's versions as JSON
    qtuning doctor --skip-bench          # without the throughput bench (GPU)

On a CPU (under a minute on 2 cores) it checks what the CPU runs and names what it skipped:

- packed = alone, for eager and sdpa attention: a row's per-token NLL and entropy scored alone equal its scores
  among lane-mates in a packed pool of several lanes (qtuning.scoring.score_tokens, as the loop scores);
- the chunked loss and its gradient equal those of the full logits (fp32);
- the LM head check of the bundled SmolLM2-135M (qtuning.lm.check_head);
- gradient checkpointing: a step's loss and gradients equal those without it.

On a GPU (CUDA) the same, under the loop's bf16 autocast where it trains in it, plus flash-attention's packed =
alone (when the flash-attn package is installed), steps under bf16 and fp16 autocast (fp16 with a GradScaler)
and with bf16 weights against the fp32 step, LoRA on a bf16 base, FSDP2 on one GPU against the unsharded step,
and the bench (qtuning.bench.time_epochs on SmolLM2-135M: the Q-Tuning/full epoch cost ratio and real tokens/s,
graded against the GPU goals on an H100 or H200). Estimated under 4 minutes on one H100, the bench most of it.

A check that raises is reported as failed with the exception's one-line message; the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import io
import json
import math
import platform
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from qtuning.config import ModelConfig
from qtuning.data import IGNORE_INDEX as IGNORE

PACK = 200  # tokens per packed lane: the ARC rows below (60-128 tokens) share lanes two and three at a time
FP32_EPS = torch.finfo(torch.float32).eps
GRAD_TOL = 16.0  # fp32 gradients agree to GRAD_TOL x eps32 x sqrt(terms) x max|want| (tests/conftest.py's measure)
# A row that saw its lane-mates moves its NLL by ~2 nats on the tiny model with 10x the default weight scale
# (0.05 at the default 0.02, too close to bf16's rounding); rounding moves it by < 1e-5 in fp32, < 0.02 in bf16.
INIT_RANGE = 0.2
PACKED_TOL = {"fp32": 1e-3, "bf16": 0.25}  # max |NLL alone - NLL packed|, nats
PRECISION_TOL = 0.02  # a lower-precision step's loss within 2% of the fp32 one ...
GRAD_COSINE = 0.99  # ... and its gradient (all parameters as one vector) pointing where fp32's does
# qtuning.bench's goals on a GPU: full-data SFT of SmolLM2-135M in bf16 on one H100
GPU_GOALS = {"cost_ratio_qtuning_pool": 0.62, "padding_share": 0.10, "real_tokens_per_second_full": 200_000}
GOAL_DEVICES = ("H100", "H200")
BENCH = {"rows": 256, "max_length": 1024, "micro_batch": 8, "repeats": 2}  # ~8 k real tokens a step, 32 full steps

Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    """One row of the table: a check's name, its result, the figure it measured (or why it was skipped)."""

    name: str
    status: Status
    figure: str = ""
    detail: str = ""
    seconds: float = 0.0


def verdict(ok: bool, figure: str, detail: str = "") -> Check:
    """A measured check's result (the runner fills in its name)."""
    return Check("", "pass" if ok else "fail", figure, detail)


def skipped(reason: str, detail: str = "") -> Check:
    return Check("", "skip", reason, detail)


# --------------------------------------------------------------------------- the shared inputs
class Env:
    """The device and the small inputs every check shares, built on first use (a check that needs the asset
    cache fails with the message that says how to fill it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.train_dtype = torch.bfloat16 if self.cuda else None  # the loop's precision here (training.precision auto)
        self.bench: dict | None = None  # the bench's report, for the goals check

    @cached_property
    def tokenizer(self):
        from qtuning.modeling import load_tokenizer, tiny_model_config

        return load_tokenizer(tiny_model_config())

    @cached_property
    def pool(self):
        """8 ARC rows of up to 128 tokens (those that keep a response token), right-padded, on the device."""
        from qtuning.config import DataConfig
        from qtuning.data import build_sft_dataset, collate

        data = build_sft_dataset(DataConfig(source="arc", limit=8, max_length=128), self.tokenizer, progress=False,
                                 log=lambda _: None).dataset
        return collate(list(data["input_ids"]), list(data["labels"]), self.tokenizer.pad_token_id).to(self.device)

    @cached_property
    def lanes(self):
        """The pool's rows packed into lanes of about PACK tokens, its targets the response tokens."""
        from qtuning.lm import build_lanes, lane_plan, loss_targets, unpad

        rows, lengths = unpad(self.pool.input_ids, self.pool.attention_mask)
        return build_lanes(rows, list(loss_targets(self.pool.labels)), lane_plan(lengths, "packed", PACK), pad_id=0)

    @cached_property
    def row_weight(self) -> Tensor:
        """(B,) per-row loss weights, uneven so that a row's weight reaching another row would show."""
        return torch.linspace(0.5, 2.0, self.pool.input_ids.shape[0], device=self.device)

    @cached_property
    def token_weight(self) -> Tensor:
        """(N,) each target's weight in the step's loss: its row's weight over the target count (a mean-sized loss)."""
        return self.row_weight[self.lanes.row] / len(self.lanes.src)

    @property
    def terms(self) -> int:
        return int(self.pool.attention_mask.sum())

    def autocast(self, dtype: torch.dtype | None):
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def tiny(self, **fields) -> torch.nn.Module:
        """The 2-layer random llama (real tokenizer), seeded, on the device; `fields` update its ModelConfig
        (`initializer_range` its config override)."""
        from qtuning.modeling import load_model, tiny_model_config

        base = tiny_model_config()
        overrides = dict(base.config_overrides)
        if "initializer_range" in fields:
            overrides["initializer_range"] = fields.pop("initializer_range")
        torch.manual_seed(0)
        return load_model(ModelConfig(**{**base.model_dump(), "config_overrides": overrides, **fields})).to(self.device)

    def bundled(self, dtype: torch.dtype = torch.float32, **fields) -> torch.nn.Module:
        """The bundled SmolLM2-135M-Instruct (from the asset cache), on the device."""
        from qtuning.modeling import load_model

        torch.manual_seed(0)  # LoRA adapters' initialisation
        return load_model(ModelConfig(**fields), dtype=dtype).to(self.device)


def step(env: Env, lm: torch.nn.Module, dtype: torch.dtype | None = None) -> tuple[float, dict[str, Tensor]]:
    """One training step's loss (the loop's chunked loss over the packed lanes) and the gradients it leaves."""
    from qtuning.lm import lanes_forward

    lm.zero_grad(set_to_none=True)
    with env.autocast(dtype):
        loss = lanes_forward(lm, env.lanes, env.token_weight, 64)  # chunks of 64 targets: several per step
    loss.backward()  # outside autocast, as torch.amp documents
    return float(loss), grads(lm)


def grads(lm: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}


def grad_error(got: dict[str, Tensor], want: dict[str, Tensor], terms: int) -> float:
    """The worst tensor's max |got - want| in units of eps32 x sqrt(terms) x max|want| (<= GRAD_TOL: equal)."""
    if got.keys() != want.keys():
        raise AssertionError(f"gradients of different parameters: {sorted(got.keys() ^ want.keys())[:3]}")
    worst = 0.0
    for name, w in want.items():
        scale = float(w.abs().max()) * FP32_EPS * terms**0.5
        worst = max(worst, float((got[name].double() - w.double()).abs().max()) / max(scale, 1e-30))
    return worst


def grad_cosine(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """Cosine between two gradients, all parameters as one vector (sums in fp64: over 135M elements fp32's drift)."""
    dot = aa = bb = 0.0
    for n, w in want.items():
        a, b = got[n].double(), w.double()
        dot, aa, bb = dot + float((a * b).sum()), aa + float((a * a).sum()), bb + float((b * b).sum())
    return dot / max(math.sqrt(aa * bb), 1e-300)


def all_finite(g: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in g.values())


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


# --------------------------------------------------------------------------- checks the CPU runs too
def packed_equals_alone(implementation: str) -> Callable[[Env], Check]:
    """A row's NLL and entropy alone = among lane-mates, through `implementation`'s own kernels."""

    def run(env: Env) -> Check:
        from qtuning.lm import lane_plan, unpad
        from qtuning.scoring import score_tokens

        if implementation == "flash_attention_2":
            if not env.cuda:
                return skipped("needs CUDA and the flash-attn package")
            if importlib.util.find_spec("flash_attn") is None:
                return skipped("flash-attn is not installed", "pip install flash-attn --no-build-isolation")
        b = env.pool
        lengths = unpad(b.input_ids, b.attention_mask)[1]
        plan = lane_plan(lengths, "packed", PACK)
        if not (len(plan) >= 2 and max(map(len, plan)) >= 2):
            return verdict(False, f"the pool did not pack ({plan})", "expected several lanes, rows sharing them")
        model = env.tiny(attn_implementation=implementation, initializer_range=INIT_RANGE).eval()
        dtype, precision = env.train_dtype, "bf16" if env.cuda else "fp32"
        with env.autocast(dtype):
            together = score_tokens(model, b.input_ids, b.attention_mask, b.labels, layout="packed", pack_tokens=PACK)
            worst = 0.0
            for r, n in enumerate(lengths):
                alone = score_tokens(model, b.input_ids[r : r + 1, :n], b.attention_mask[r : r + 1, :n], b.labels[r : r + 1, :n])
                for x, y in ((together.nll[r, :n], alone.nll[0]), (together.ent[r, :n], alone.ent[0])):
                    worst = max(worst, float((x - y).abs().max()))
        tol = PACKED_TOL[precision]
        return verdict(worst <= tol, f"max |dNLL|, |dH| {worst:.1e} nats (tol {tol:g})",
                       f"{len(lengths)} rows in {len(plan)} lanes of <= {PACK} tokens, {precision}; NLL and entropy "
                       "of each row alone vs among its lane-mates")

    return run


def chunked_loss(env: Env) -> Check:
    """The chunked loss and its gradient = those of the full logits (fp32)."""
    from qtuning.lm import ChunkedLM

    b, model = env.pool, env.tiny().train()
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()  # (B, T, V)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1),
                          ignore_index=IGNORE, reduction="none").view(b.labels.shape[0], -1)
    ref = (nll * env.row_weight[:, None]).sum() / len(env.lanes.src)
    ref.backward()
    want = grads(model)
    del logits, nll
    loss, got = step(env, ChunkedLM(model))
    loss_err = _rel(loss, float(ref)) / (FP32_EPS * env.terms**0.5)
    err = grad_error(got, {f"model.{n}": g for n, g in want.items()}, env.terms)  # ChunkedLM names them model.*
    return verdict(loss_err <= GRAD_TOL and err <= GRAD_TOL, f"loss {loss_err:.1f}, gradients {err:.1f} units (tol {GRAD_TOL:g})",
                   "unit: eps32 x sqrt(tokens) x the largest value; chunks of 64 targets against the full logits, fp32")


def lm_head(env: Env) -> Check:
    """The bundled model's logits are its output layer's, as the chunked head computes them."""
    from qtuning.lm import check_head

    scale, softcap = check_head(env.bundled())
    return verdict(True, f"scale {scale or 'none'}, softcap {softcap or 'none'}",
                   "SmolLM2-135M-Instruct: the chunked head's logits = the model's own on 8 tokens (fp32)")


def gradient_checkpointing(env: Env) -> Check:
    """A step with the decoder's activations recomputed in the backward = the step that keeps them (fp32)."""
    from qtuning.lm import ChunkedLM

    lm = ChunkedLM(env.tiny().train())
    layer = next(m for m in lm.modules() if type(m).__name__ in (lm._no_split_modules or []))
    calls = []  # a recomputed layer runs its modules twice a step (transformers checkpoints the layer's forward, so
    next(layer.children()).register_forward_hook(lambda *_: calls.append(1))  # the layer's own hooks run once)
    ref, want = step(env, lm)
    plain, calls[:] = len(calls), []
    lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train() does
    loss, got = step(env, lm)
    loss_err, err = _rel(loss, ref) / (FP32_EPS * env.terms**0.5), grad_error(got, want, env.terms)
    ok = loss_err <= GRAD_TOL and err <= GRAD_TOL and (plain, len(calls)) == (1, 2)
    return verdict(ok, f"loss {loss_err:.1f}, gradients {err:.1f} units (tol {GRAD_TOL:g})",
                   f"non-reentrant checkpointing against none, fp32; a decoder layer's first module ran {plain} time(s) "
                   f"a step without it, {len(calls)} with it")


# --------------------------------------------------------------------------- GPU checks
def cuda_device(env: Env) -> Check:
    """The GPU computes, and supports bf16."""
    props = torch.cuda.get_device_properties(env.device)
    a = torch.randn(256, 256, device=env.device)
    ok = torch.allclose((a @ a).cpu(), a.cpu() @ a.cpu(), rtol=1e-3, atol=1e-3) and torch.cuda.is_bf16_supported()
    return verdict(ok, f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB",
                   f"CUDA {torch.version.cuda}; bf16 {'supported' if torch.cuda.is_bf16_supported() else 'NOT supported'}")


def _against_fp32(ref: float, want: dict, loss: float, got: dict, what: str, extra: str = "") -> Check:
    """A lower-precision step against the fp32 step of the same weights and batch."""
    rel, cos = _rel(loss, ref), grad_cosine(got, want)
    ok = math.isfinite(loss) and all_finite(got) and rel <= PRECISION_TOL and cos >= GRAD_COSINE
    return verdict(ok, f"loss {loss:.4f} vs fp32 {ref:.4f} ({(loss - ref) / ref:+.2%}); gradient cosine {cos:.4f}{extra}",
                   f"SmolLM2-135M, {what}; tol {PRECISION_TOL:.0%} and cosine >= {GRAD_COSINE}; gradients "
                   f"{'finite' if all_finite(got) else 'NOT finite'}")


def bf16_autocast(env: Env) -> Check:
    from qtuning.lm import ChunkedLM

    lm = ChunkedLM(env.bundled()).train()
    ref, want = step(env, lm)
    loss, got = step(env, lm, torch.bfloat16)
    return _against_fp32(ref, want, loss, got, "fp32 weights, bf16 autocast (training.precision: bf16)")


def fp16_autocast(env: Env) -> Check:
    """fp16 autocast with a GradScaler, as accelerate runs training.precision: fp16: a step whose scaled gradients
    overflow is skipped and the scale halved; the check needs a taken step within 4 tries."""
    from qtuning.lm import ChunkedLM, lanes_forward

    lm = ChunkedLM(env.bundled()).train()
    ref, want = step(env, lm)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler(env.device.type)
    for attempt in range(1, 5):
        optimizer.zero_grad(set_to_none=True)
        with env.autocast(torch.float16):
            loss = lanes_forward(lm, env.lanes, env.token_weight, 64)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the true gradients, as clipping would see them
        got = grads(lm)
        scaler.step(optimizer)  # skipped when a gradient is inf/nan
        scaler.update()
        if all_finite(got):
            break
    return _against_fp32(ref, want, float(loss), got, "fp32 weights, fp16 autocast, GradScaler",
                         f"; scale {scale:g}, step taken on try {attempt}")


def bf16_weights(env: Env) -> Check:
    from qtuning.lm import ChunkedLM

    lm = ChunkedLM(env.bundled()).train()
    ref, want = step(env, lm)
    lm.to(torch.bfloat16)
    loss, got = step(env, lm)
    dtypes = {str(g.dtype).removeprefix("torch.") for g in got.values()}
    check = _against_fp32(ref, want, loss, got, f"bf16 weights, no autocast (gradients {', '.join(dtypes)})")
    return check if dtypes == {"bfloat16"} else replace(check, status="fail")


def lora_bf16(env: Env) -> Check:
    """LoRA r=8 on q_proj and v_proj of a bf16 base (fp32 adapters), bf16 autocast: 3 AdamW steps on one batch."""
    from qtuning.lm import ChunkedLM

    model = env.bundled(torch.bfloat16, finetune="lora", lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"])
    lm = ChunkedLM(model).train()
    trainable = [p for p in lm.parameters() if p.requires_grad]
    frozen_dtypes = {p.dtype for p in lm.parameters() if not p.requires_grad}
    adapter_dtypes = {p.dtype for p in trainable}
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for i in range(4):  # 4 losses: before each of 3 steps and after the last
        loss, got = step(env, lm, torch.bfloat16)
        losses.append(loss)
        if i < 3:
            optimizer.step()
    ok = (all(map(math.isfinite, losses)) and losses[-1] < losses[0] and frozen_dtypes == {torch.bfloat16}
          and adapter_dtypes == {torch.float32} and len(got) == len(trainable))
    return verdict(ok, f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in 3 steps",
                   f"{sum(p.numel() for p in trainable):,} adapter weights ({', '.join(map(str, adapter_dtypes))}) on a "
                   f"{', '.join(map(str, frozen_dtypes))} base; losses {[round(x, 4) for x in losses]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_one_gpu(env: Env) -> Check:
    """FSDP2 (fully_shard on each decoder layer, then on the ChunkedLM, as accelerate wraps it) on a 1-process
    group: the step's loss and gradients = the unsharded step's (fp32)."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from qtuning.lm import ChunkedLM

    model = env.tiny().train()
    ref, want = step(env, ChunkedLM(copy.deepcopy(model)))
    lm = ChunkedLM(model)  # its head is checked here, on the unsharded model
    if dist.is_initialized():
        return verdict(False, "a process group already exists in this process", "run qtuning doctor on its own")
    backend = "nccl" if env.cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh(env.device.type, (1,))
        layers = [m for m in lm.modules() if type(m).__name__ in (lm._no_split_modules or [])]
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(lm, mesh=mesh)
        sharded = all(isinstance(p, DTensor) for p in lm.parameters())
        loss, got = step(env, lm)
        got = {n: (g.full_tensor() if isinstance(g, DTensor) else g) for n, g in got.items()}
    finally:
        dist.destroy_process_group()
    loss_err, err = _rel(loss, ref) / (FP32_EPS * env.terms**0.5), grad_error(got, want, env.terms)
    ok = bool(layers) and sharded and loss_err <= GRAD_TOL and err <= GRAD_TOL
    return verdict(ok, f"loss {loss_err:.1f}, gradients {err:.1f} units (tol {GRAD_TOL:g})",
                   f"{backend}, world size 1, {len(layers)} decoder layers sharded, fp32, against the unsharded step")


def bench(env: Env) -> Check:
    """qtuning.bench's epochs on SmolLM2-135M (bf16 autocast): full data, Q-Tuning 25% x 50% in both layouts,
    Random; its tqdm output is swallowed."""
    from qtuning.bench import bench_config, time_epochs

    with tempfile.TemporaryDirectory(prefix="qtuning-doctor-") as tmp:
        cfg = bench_config(False, BENCH["rows"], BENCH["max_length"], BENCH["micro_batch"], Path(tmp))
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            epochs = time_epochs(cfg, Path(tmp), BENCH["repeats"])
    full = epochs["full"]
    env.bench = report = {
        "epochs": epochs,
        "cost_ratio_qtuning": epochs["qtuning"]["loop_seconds"] / full["loop_seconds"],
        "cost_ratio_qtuning_pool": epochs["qtuning_pool"]["loop_seconds"] / full["loop_seconds"],
        "cost_ratio_random": epochs["random"]["loop_seconds"] / full["loop_seconds"],
        "padding_share": max(epochs[a]["padding_share"] for a in ("full", "qtuning", "qtuning_pool")),
        "real_tokens_per_second_full": full["real_tokens_per_second"],
    }
    ok = all(math.isfinite(e["final_loss"]) and e["loop_seconds"] > 0 for e in epochs.values())
    tps = report["real_tokens_per_second_full"]
    return verdict(ok, f"Q-Tuning 25%x50% = {report['cost_ratio_qtuning_pool']:.2f} of full; "
                   + (f"{tps / 1000:.0f}k tok/s" if tps >= 10_000 else f"{tps:.0f} tok/s"),
                   f"{BENCH['rows']} ShareGPT rows x <= {BENCH['max_length']} tokens, micro-batch {BENCH['micro_batch']}, "
                   f"best of {BENCH['repeats']}; pool of 32 {report['cost_ratio_qtuning_pool']:.2f}, paper layout "
                   f"{report['cost_ratio_qtuning']:.2f}, Random {report['cost_ratio_random']:.2f}; full epoch "
                   f"{full['loop_seconds']:.1f} s; padding <= {report['padding_share']:.1%}")


def bench_goals(env: Env) -> Check:
    """The bench's figures against the GPU goals, graded on the GPUs they are set for."""
    if env.bench is None:
        return skipped("the bench did not run")
    r, g = env.bench, GPU_GOALS
    missed = [f"{k} {r[k]:.3g} > {g[k]:g}" for k in ("cost_ratio_qtuning_pool", "padding_share") if r[k] > g[k]]
    if r["real_tokens_per_second_full"] < g["real_tokens_per_second_full"]:
        missed.append(f"real tokens/s {r['real_tokens_per_second_full']:.0f} < {g['real_tokens_per_second_full']:,}")
    figure = f"{3 - len(missed)}/3 met" + (f"; missed: {'; '.join(missed)}" if missed else "")
    detail = (f"goals: Q-Tuning 25%x50% (pool 32) <= {g['cost_ratio_qtuning_pool']} of a full-data epoch, padding "
              f"<= {g['padding_share']:.0%}, >= {g['real_tokens_per_second_full']:,} real tokens/s (full-data SFT, bf16)")
    name = torch.cuda.get_device_name(env.device)
    if not any(d in name for d in GOAL_DEVICES):
        return skipped(f"goals are set for one H100/H200, not {name} ({figure})", detail)
    return verdict(not missed, figure, detail)


# --------------------------------------------------------------------------- the list and the runner
# (name, needs CUDA, check); the GPU checks run after the CPU ones, the bench last
CHECKS: list[tuple[str, bool, Callable[[Env], Check]]] = [
    ("packed = alone (eager)", False, packed_equals_alone("eager")),
    ("packed = alone (sdpa)", False, packed_equals_alone("sdpa")),
    ("packed = alone (flash_attention_2)", False, packed_equals_alone("flash_attention_2")),
    ("chunked loss = full logits", False, chunked_loss),
    ("LM head (SmolLM2-135M)", False, lm_head),
    ("gradient checkpointing", False, gradient_checkpointing),
    ("CUDA device", True, cuda_device),
    ("bf16 autocast step", True, bf16_autocast),
    ("fp16 autocast step", True, fp16_autocast),
    ("bf16 weights step", True, bf16_weights),
    ("LoRA on a bf16 base", True, lora_bf16),
    ("FSDP2 on one GPU", True, fsdp_one_gpu),
    ("bench (SmolLM2-135M, bf16)", True, bench),
    ("bench goals (H100)", True, bench_goals),
]


def run_check(name: str, needs_cuda: bool, fn: Callable[[Env], Check], env: Env, skip_bench: bool) -> Check:
    """One check's result; an exception is a failure with its one-line message, never the end of the run."""
    start = time.perf_counter()
    if needs_cuda and not env.cuda:
        result = skipped("needs CUDA" + (" (--device cpu)" if torch.cuda.is_available() else ": this machine has no GPU"))
    elif skip_bench and fn in (bench, bench_goals):
        result = skipped("--skip-bench")
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # library chatter (dtype advice, deprecations): the table is the output
                result = fn(env)
        except Exception as e:  # noqa: BLE001 (any failure is this check's result)
            lines = str(e).strip().splitlines()
            result = Check("", "fail", f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": "),
                           "\n".join(lines[1:]))
        finally:
            gc.collect()
            if env.cuda:
                torch.cuda.empty_cache()
    return replace(result, name=name, seconds=round(time.perf_counter() - start, 2))


def machine_info(device: torch.device) -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    from qtuning import __version__

    info = {
        "qtuning": __version__, "python": platform.python_version(), "platform": platform.platform(),
        **{name: version(name) for name in ("torch", "transformers", "accelerate", "peft", "flash-attn")},
        "device": device.type, "cpu_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
        "device_name": None, "cuda_capability": None, "gpu_memory_gib": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, cuda_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info["device_name"] = f"cpu ({torch.get_num_threads()} threads)"
    return info


def table(results: list[Check]) -> str:
    width = max(len("check"), *(len(r.name) for r in results))
    lines = [f"{'check':<{width}}  {'result':<6}  figure"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.figure}" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qtuning doctor", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results and the machine's versions to this file")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when there is a GPU")
    ap.add_argument("--skip-bench", action="store_true", help="skip the throughput bench (GPU, most of the run's time)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("qtuning doctor: --device cuda, but torch sees no CUDA GPU; use --device cpu or auto", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    from transformers.utils import logging as hf_logging

    env, results, start = Env(device), [], time.perf_counter()
    info = machine_info(device)
    print(f"qtuning doctor on {info['device_name']}: torch {info['torch']}, transformers {info['transformers']}, "
          f"flash-attn {info['flash-attn'] or 'not installed'}", flush=True)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # transformers' advice and loading bars: the table is the output
    hf_logging.disable_progress_bar()
    try:
        for i, (name, needs_cuda, fn) in enumerate(CHECKS, 1):
            print(f"[{i:>2}/{len(CHECKS)}] {name} ...", end=" ", flush=True)
            results.append(run_check(name, needs_cuda, fn, env, args.skip_bench))
            print(f"{results[-1].status} ({results[-1].seconds:.1f} s)", flush=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    seconds = time.perf_counter() - start
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    print("\n" + table(results))
    for r in results:
        if r.status == "fail" and r.detail:
            print(f"\n{r.name}: {r.detail}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "seconds": round(seconds, 1), "summary": counts,
                                         "checks": [asdict(r) for r in results], "bench": env.bench}, indent=2, default=str))
        print(f"\nwrote {args.json} ({seconds:.0f} s)")
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
