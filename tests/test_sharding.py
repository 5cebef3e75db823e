"""Sharding that really shards: qtuning.train under FSDP2 on two CPU processes, step for step equal to one process.

accelerate 1.16 runs an FSDP config on a CPU as plain DDP, silently: `AcceleratorState` switches to FSDP only
when the process group is of a GPU-like type (accelerate/state.py:947, `elif self.distributed_type in
[MULTI_GPU, MULTI_MLU, ...]`, which leaves out MULTI_CPU), and no config key or environment variable changes
that (`Accelerator(fsdp_plugin=...)` included). The worker at the bottom of this file is what `accelerate launch
--config_file configs/accelerate/fsdp2.yml` starts here: it gives accelerate the state the same launch gets on
a GPU machine (FSDP, with the plugin the launcher's FSDP_* variables describe), then runs qtuning.train's own
`main` unchanged: accelerate's FSDP2 preparation (fully_shard per decoder layer, from `_no_split_modules`),
qtuning's scoring and training through the prepared ChunkedLM, accelerate's sharded checkpoint and its
gathered final model. Spies on qtuning.train record what each rank held, scored and stepped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FSDP2_CONFIG = REPO / "configs" / "accelerate" / "fsdp2.yml"
DEEPSPEED_CONFIG = REPO / "configs" / "accelerate" / "deepspeed-zero3.yml"
LR = 1e-3


# --------------------------------------------------------------------------- what a run recorded
def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter or gradient (a DTensor's local shard under FSDP2; the tensor itself else)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective under FSDP2: every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def spy_on_training(monkeypatch, whole: bool = True) -> dict:
    """Record, in the returned dict, what qtuning.train does: each scoring call's per-token scores (`scores`, in
    call order), the sharded units of the model scored through (`units`), and at the first optimizer step the
    elements this rank holds (`local`, `local_grads`, of `full`) and, when `whole`, the gathered gradients
    (after clipping) and weights after the step (`grads`, `weights`)."""
    import qtuning.train as T

    seen: dict = {"scores": []}
    score, adamw = T.score_tokens, T._adamw

    def score_spy(model, *args, **kwargs):
        s = score(model, *args, **kwargs)
        if "model" not in seen:
            from torch.distributed.fsdp import FSDPModule

            seen["model"] = model
            seen["units"] = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
        seen["scores"].append({"nll": s.nll.clone(), "ent": s.ent.clone(), "mask": s.response_mask.clone()})
        return s

    def adamw_spy(params, t):
        opt = adamw(params, t)

        def before(o, args, kwargs):
            if "local" in seen:
                return
            named = dict(seen["model"].named_parameters())  # at rest: every unit resharded after the backward
            if any(hasattr(p, "ds_tensor") for p in named.values()):  # ZeRO-3, inside its engine's step: no gathering
                seen["full"] = sum(p.ds_numel for p in named.values())
                seen["local"] = sum(p.ds_tensor.numel() for p in named.values())
                return
            seen["full"] = sum(p.numel() for p in named.values())
            seen["local"] = sum(_local(p).numel() for p in named.values())
            seen["local_grads"] = sum(_local(p.grad).numel() for p in named.values())
            grads = {n: _full(p.grad).clone() for n, p in named.items()}
            if whole:
                seen["grads"] = grads

        def after(o, args, kwargs):
            if "weights" not in seen and "local_grads" in seen:  # not under ZeRO-3 (see before)
                weights = {n: _full(p.detach()).clone() for n, p in seen["model"].named_parameters()}
                seen["weights"] = weights if whole else {}

        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)
        return opt

    monkeypatch.setattr(T, "score_tokens", score_spy)
    monkeypatch.setattr(T, "_adamw", adamw_spy)
    return seen


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny random llama saved as a model folder: every run loads the same weights. (Random weights would not
    do: under ZeRO-3 transformers initialises them partitioned, from another random stream.)"""
    from qtuning.modeling import load_model, save_final, tiny_model_config

    torch.manual_seed(0)
    return save_final(load_model(tiny_model_config()), tokenizer, tmp_path_factory.mktemp("tiny") / "model")


def _cfg(model_dir: Path, out: Path, **training):
    from qtuning.config import DataConfig, ExperimentConfig, ModelConfig, PruningConfig, TrainingConfig

    # micro_batch_size 1: the two rows a pool keeps train in two micro-batches (gradients accumulate, then sync once)
    t = dict(micro_batch_size=1, lr=LR, epochs=1, schedule="constant", output_dir=str(out), max_steps=1, max_grad_norm=1.0)
    return ExperimentConfig(
        name="sharding", model=ModelConfig(name=str(model_dir)), data=DataConfig(source="arc", limit=16, max_length=128),
        pruning=PruningConfig(sample="qtuning", token="qtuning", sample_ratio=0.5, token_ratio=0.5, selection_batch_size=4),
        training=TrainingConfig(**{**t, **training}),
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir):
    """The reference: one process, no sharding, the two pools the two ranks take as one step of two pools."""
    from qtuning.train import train

    out = tmp_path_factory.mktemp("one") / "out"
    with pytest.MonkeyPatch.context() as mp:
        seen = spy_on_training(mp)
        summary = train(_cfg(tiny_dir, out, grad_accum_steps=2), progress=False)
    seen.pop("model")
    return summary, seen


def _weights(final_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(final_dir, "model.safetensors")))


def _run_worker(mode: str, cfg, tmp_path: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` as tasks.training.launch_command builds it for `cfg`, with this file's worker in place
    of `-m qtuning.train`; the environment is launch_env's."""
    from qtuning.config import PipelineConfig
    from tasks.training import launch_command, launch_env

    pipe = PipelineConfig(num_processes=processes, progress=False)
    cmd = launch_command(cfg.save(tmp_path / "run.yaml"), cfg, pipe, resume=False)
    i = cmd.index("qtuning.train")
    cmd[i - 1 : i + 1] = [str(Path(__file__)), mode, str(tmp_path)]
    env = launch_env(None, pipe)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def _launched(mode: str, cfg, tmp_path: Path, one_process) -> tuple[dict, list[dict]]:
    """Run the worker on two processes; check what every sharded run shares with the one-process reference: the
    same pools, loss tokens and loss, and (b) each rank's pool (global pool = rank) scored as one process scored it."""
    res = _run_worker(mode, cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(Path(cfg.training.output_dir, "summary.json").read_text())
    ranks = [torch.load(tmp_path / f"seen-{r}.pt") for r in (0, 1)]
    ref, want = one_process
    assert summary["world_size"] == 2 and summary["samples_seen"] == ref["samples_seen"] == 8
    for rank, seen in enumerate(ranks):
        got, ref_pool = seen["scores"][0], want["scores"][rank]
        assert torch.equal(got["mask"], ref_pool["mask"])
        for key in ("nll", "ent"):
            torch.testing.assert_close(got[key], ref_pool[key], rtol=1e-4, atol=1e-5, msg=f"rank {rank} {key}")
    assert summary["loss_tokens"] == ref["loss_tokens"] and summary["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)
    return summary, ranks


def _assert_same_step(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                      terms: int) -> None:
    """The weights after AdamW's first step, which moves each by lr x g / (|g| + eps), about lr x sign(g): within
    lr / 20 of the reference wherever the reference gradient `g` stands above its rounding noise (assert_grads_close's
    bound), and at most 2 lr away where it does not (a gradient entry that rounds to either sign may step either way).
    `grads` are named as the ChunkedLM's parameters ("model." + the weight's name)."""
    from conftest import FP32_EPS, GRAD_TOL

    assert got.keys() == want.keys()
    for name, w in want.items():
        g = grads[name if name in grads else f"model.{name}"]
        clear = g.abs() > GRAD_TOL * FP32_EPS * terms ** 0.5 * g.abs().max()
        torch.testing.assert_close(got[name][clear], w[clear], rtol=0, atol=LR / 20, msg=name)
        assert float((got[name] - w).abs().max()) <= 2.01 * LR, name


# --------------------------------------------------------------------------- FSDP2
def test_fsdp2_shards_the_model_and_takes_the_step_of_one_process(tmp_path, tiny_dir, one_process):
    from conftest import assert_grads_close

    cfg = _cfg(tiny_dir, tmp_path / "out", accelerate_config=str(FSDP2_CONFIG))
    summary, ranks = _launched("fsdp", cfg, tmp_path, one_process)  # (b) inside
    ref, want = one_process
    assert summary["distributed_type"] == "FSDP"

    # (a) sharded: one unit per decoder layer besides the root, and each rank holds half of every unit's elements
    for seen in ranks:
        assert seen["units"] == ["", "model.model.layers.0", "model.model.layers.1"]
        assert seen["local"] == seen["local_grads"] == pytest.approx(seen["full"] / 2, abs=64), (seen["local"], seen["full"])

    # (c) one step: the same (clipped) gradient, gathered from the shards, and the same weights after AdamW
    got = ranks[0]
    assert float(torch.stack([g.norm() for g in want["grads"].values()]).norm()) == pytest.approx(1.0, rel=1e-4)  # clipped
    assert_grads_close(got["grads"], want["grads"], terms=ref["loss_tokens"])
    _assert_same_step(got["weights"], want["weights"], want["grads"], ref["loss_tokens"])

    # (d) the final model accelerate gathered and qtuning.train saved is exactly the sharded step's weights
    final = _weights(summary["final_dir"])
    assert final.keys() == {n.removeprefix("model.") for n in got["weights"]}
    for name, w in final.items():
        assert torch.equal(w, got["weights"][f"model.{name}"]), name
    _assert_same_step(final, _weights(ref["final_dir"]), want["grads"], ref["loss_tokens"])


# --------------------------------------------------------------------------- DeepSpeed ZeRO-3
def test_deepspeed_zero3_shards_the_model_and_takes_the_step_of_one_process(tmp_path, tiny_dir, one_process):
    """ZeRO-3 through DeepSpeed's CPU accelerator (gloo). Its gradients live in the engine's flat partitions, so the
    step is checked by its result: the final model accelerate gathers (zero3_save_16bit_model) and qtuning saves."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    cfg = _cfg(tiny_dir, tmp_path / "out", accelerate_config=str(DEEPSPEED_CONFIG))
    summary, ranks = _launched("deepspeed", cfg, tmp_path, one_process)  # (b) inside
    ref, want = one_process
    assert summary["distributed_type"] == "DEEPSPEED"
    for seen in ranks:  # (a) each rank's partitions hold half the elements (each tensor's padded to the world size)
        assert seen["local"] == pytest.approx(seen["full"] / 2, abs=64), (seen["local"], seen["full"])
    _assert_same_step(_weights(summary["final_dir"]), _weights(ref["final_dir"]), want["grads"], ref["loss_tokens"])  # (c), (d)
    if skipped := ranks[0].get("check_head_skipped"):
        import warnings

        warnings.warn(f"qtuning.lm.check_head cannot run on ZeRO-3-partitioned weights ({skipped}); the worker "
                      "skipped it, as check_head skips a model on the meta device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine's launch")
def test_every_launch_on_a_cpu_machine_tells_accelerate_so():
    """Without ACCELERATE_USE_CPU the processes of a torchrun launch (an accelerate config's, with pipeline.num_processes
    left at 1) find no device backend, and each takes itself for the only one (accelerate/state.py:285: no backend,
    num_processes 1): two trainings of world size 1 into one folder, seen before launch_env set it for every launch."""
    from qtuning.config import PipelineConfig
    from tasks.training import launch_env

    assert launch_env(None, PipelineConfig())["ACCELERATE_USE_CPU"] == "true"


# --------------------------------------------------------------------------- the worker (run by accelerate launch)
def _as_on_a_gpu() -> None:
    """This process's accelerate state as the same launch makes it on a GPU machine (see the module docstring)."""
    import torch.distributed as dist
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # with ACCELERATE_USE_CPU, accelerate leaves DeepSpeed out (state.py:935, `... and not cpu`) and runs DDP;
        # without it, DeepSpeed's CPU accelerator starts the gloo group (state.py:212), but accelerate finds no device
        # backend and sets every process to rank 0 of 1 (state.py:285-289) before switching to DeepSpeed (state.py:308)
        os.environ.pop("ACCELERATE_USE_CPU", None)
        accelerator = Accelerator()  # the shared state every later Accelerator (qtuning.train's) joins
        assert accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.num_processes == 1
        world = dict(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                     local_process_index=int(os.environ["LOCAL_RANK"]))
        PartialState._shared_state.update(world)
        AcceleratorState._shared_state.update(world)
        return
    accelerator = Accelerator()
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ does


def _skip_head_check_on_partitioned_weights(mp, seen: dict) -> None:
    """Under ZeRO-3 transformers loads the weights partitioned (each parameter empty outside DeepSpeed's engine), and
    the forward qtuning.lm.check_head runs in ChunkedLM's constructor fails ("Padding_idx must be within
    num_embeddings"). There the worker returns what check_head returns for a model it cannot run (meta device)."""
    import qtuning.lm as lm

    check = lm.check_head

    def check_unless_partitioned(model, *args, **kwargs):
        if any(p.numel() == 0 and hasattr(p, "ds_numel") for p in model.parameters()):
            try:
                return check(model, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - recorded for the test to report
                seen["check_head_skipped"] = f"{type(e).__name__}: {e}"
                return None, None  # the tiny llama: no logit scale, no softcap
        return check(model, *args, **kwargs)

    mp.setattr(lm, "check_head", check_unless_partitioned)


def _worker(out: Path, argv: list[str]) -> int:
    from qtuning.train import main

    _as_on_a_gpu()
    rank = int(os.environ["RANK"])
    mp = pytest.MonkeyPatch()
    seen = spy_on_training(mp, whole=rank == 0)
    _skip_head_check_on_partitioned_weights(mp, seen)
    rc = main(argv)
    seen.pop("model", None)
    torch.save(seen, out / f"seen-{rank}.pt")
    return rc


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(_worker(Path(sys.argv[2]), sys.argv[3:]))
