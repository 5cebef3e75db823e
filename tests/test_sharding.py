"""Sharding that really shards: qtuning.train under FSDP2 and DeepSpeed ZeRO-3 on two CPU processes, step for step
equal to one process; and multi-node launches from the pipeline's machine fields, two "machines" on loopback.

accelerate 1.16 runs an FSDP config on a CPU as plain DDP, silently: `AcceleratorState` switches to FSDP only
when the process group is of a GPU-like type (accelerate/state.py:947, `elif self.distributed_type in
[MULTI_GPU, MULTI_MLU, ...]`, which leaves out MULTI_CPU), and no config key or environment variable changes
that (`Accelerator(fsdp_plugin=...)` included). The worker at the bottom of this file is what `accelerate launch
--config_file configs/accelerate/fsdp2.yml` starts here: it gives accelerate the state the same launch gets on
a GPU machine (FSDP, with the plugin the launcher's FSDP_* variables describe), then runs qtuning.train's own
`main` unchanged: accelerate's FSDP2 preparation (fully_shard per decoder layer, from `_no_split_modules`),
qtuning's scoring and training through the prepared ChunkedLM, accelerate's sharded checkpoint and its
gathered final model. Spies on qtuning.train record what each rank held, scored and stepped. DeepSpeed ZeRO-3
(when installed) runs the same way on DeepSpeed's CPU accelerator over gloo; the worker's comments say where
accelerate leaves it out on a CPU.
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
        # the root, each decoder layer, and the embedding and head (ChunkedLM exposes them as transformers models do)
        assert seen["units"] == ["", "model.model.embed_tokens", "model.model.layers.0", "model.model.layers.1",
                                 "model.lm_head"], seen["units"]
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


# --------------------------------------------------------------------------- multi-node
def _pipe(**kw):
    from qtuning.config import PipelineConfig

    return PipelineConfig(progress=False, **kw)


def test_the_launch_carries_the_machine_settings_and_the_pipelines_win_over_the_files(tmp_path):
    from qtuning.config import ConfigError, validate
    from tasks.training import launch_command

    def flags(cmd: list[str]) -> dict[str, str]:
        names = ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port", "--config_file")
        return {a: cmd[i + 1] for i, a in enumerate(cmd[: cmd.index("qtuning.train")]) if a in names}

    cfg = _cfg(tmp_path, tmp_path / "out")
    two = dict(num_processes=4, num_machines=2, main_process_ip="node0.cluster", main_process_port=29501)
    assert flags(launch_command(Path("r.yaml"), cfg, _pipe(), resume=False)) == {"--num_machines": "1"}
    assert flags(launch_command(Path("r.yaml"), cfg, _pipe(**two, machine_rank=1), resume=False)) == {
        "--num_machines": "2", "--machine_rank": "1", "--main_process_ip": "node0.cluster", "--main_process_port": "29501"}

    # with an accelerate config: the file's values hold, and what the pipeline sets is passed and wins
    shipped = REPO / "configs" / "accelerate" / "multi-node.yml"
    with_file = cfg.model_copy(update={"training": cfg.training.model_copy(update={"accelerate_config": str(shipped)})})
    assert flags(launch_command(Path("r.yaml"), with_file, _pipe(), resume=False)) == {"--config_file": str(shipped)}
    assert flags(launch_command(Path("r.yaml"), with_file, _pipe(machine_rank=1, main_process_port=4000), resume=False)) == {
        "--config_file": str(shipped), "--machine_rank": "1", "--main_process_port": "4000"}

    # refused: in the config, each problem named with its field; at launch, what only the file and pipeline together show
    for raw, said in (({"main_process_ip": "node 0", "main_process_port": 70000},  # fields first (pydantic), both at once
                       ("main_process_ip: 'node 0' is neither an IP address nor a hostname", "main_process_port")),
                      ({"num_machines": 2, "machine_rank": 2, "num_processes": 3},  # then the fields together
                       ("pipeline.machine_rank=2 with pipeline.num_machines=2: ranks run from 0 to 1",
                        "multiple of pipeline.num_machines"))):
        with pytest.raises(ConfigError) as e:
            validate(type(_pipe()), raw, "pipeline.yaml")
        assert all(part in str(e.value) for part in said), str(e.value)
    for v in ("10.0.0.1", "::1", "node-0.cluster.local", "localhost"):
        assert _pipe(main_process_ip=v).main_process_ip == v
    with pytest.raises(ValueError, match="needs machine 0's address"):
        launch_command(Path("r.yaml"), cfg, _pipe(num_processes=2, num_machines=2), resume=False)
    with pytest.raises(ValueError, match="ranks run from 0 to 1"):
        launch_command(Path("r.yaml"), with_file, _pipe(machine_rank=2), resume=False)  # the file says 2 machines


def test_every_shipped_accelerate_config_loads_and_launches():
    from accelerate.commands.config.config_args import load_config_from_file

    from tasks.training import machine_flags

    shipped = sorted((REPO / "configs" / "accelerate").glob("*.yml"))
    assert {p.name for p in shipped} >= {"fsdp2.yml", "deepspeed-zero3.yml", "multi-node.yml"}
    for path in shipped:
        load_config_from_file(str(path))  # accelerate's own reading: unknown keys refused
        cfg = _cfg(REPO, REPO / "out", accelerate_config=str(path))
        machine_flags(cfg, _pipe())


def test_two_machines_on_loopback_train_as_one_machine_of_two_processes(tmp_path, tiny_dir):
    """Two `accelerate launch --num_machines 2 --machine_rank 0/1 --main_process_ip 127.0.0.1` of one CPU process each,
    as launch_command builds them from the pipeline's machine fields, against one launch of two processes, all three
    at once: the same pools, losses and final weights, bit for bit (a 2-rank all-reduce is one addition)."""
    from conftest import free_port
    from tasks.training import launch_command, launch_env

    port = free_port()
    runs = {"machines": [_pipe(num_processes=2, num_machines=2, machine_rank=r, main_process_ip="127.0.0.1",
                               main_process_port=port) for r in (0, 1)],
            "processes": [_pipe(num_processes=2)]}
    procs = []
    for name, pipes in runs.items():
        cfg = _cfg(tiny_dir, tmp_path / name / "out")
        run_yaml = cfg.save(tmp_path / name / "run.yaml")
        for pipe in pipes:
            cmd = launch_command(run_yaml, cfg, pipe, resume=False)
            cmd[cmd.index("--num_cpu_threads_per_process") + 1] = "1"  # the "machines" share this one's cores
            log = tmp_path / name / f"launch-{pipe.machine_rank or 0}.log"
            with log.open("w") as f:
                procs.append((log, subprocess.Popen(cmd, env=launch_env(None, pipe), stdout=f, stderr=subprocess.STDOUT)))
    for log, proc in procs:
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    summaries = {name: json.loads((tmp_path / name / "out" / "summary.json").read_text()) for name in runs}
    two, one = summaries["machines"], summaries["processes"]
    assert two["world_size"] == one["world_size"] == 2 and two["distributed_type"] == one["distributed_type"] == "MULTI_CPU"
    for key in ("samples_seen", "samples_trained", "loss_tokens", "final_loss"):
        assert two[key] == one[key], key
    w2, w1 = _weights(two["final_dir"]), _weights(one["final_dir"])
    assert w2.keys() == w1.keys() and all(torch.equal(w2[n], w1[n]) for n in w1)


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
    from qtuning.train_cli import main

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
