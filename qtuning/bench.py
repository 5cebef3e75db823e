"""Benchmark: what a Q-Tuning epoch costs against full-data SFT, and what its forwards cost in memory.

    python -m qtuning.bench --json bench.json        # the embedded SmolLM2-135M-Instruct (< 10 min on a 2-core CPU)
    python -m qtuning.bench --quick --json b.json    # a tiny random model with the real tokenizer (smoke check)

In one process, on the same model initialisation and data slice, it times one epoch (the training loop's
own scoring and training seconds, not model loading or saving; `--repeats` rounds, each arm's fastest kept) of

- full-data SFT (the denominator of every cost ratio);
- Q-Tuning 25% x 50% with pool = micro-batch, the paper's layout (`cost_ratio_qtuning`);
- Random+Random 25% x 50% (`cost_ratio_random`);
- Q-Tuning with a selection pool of micro-batch / r_s whose kept rows train as one full micro-batch, the
  cost-efficient layout (`cost_ratio_qtuning_pool`; a quarter of the optimizer steps);

each in the run's default layout (packed rows) and reports the share of padding among the positions the
forwards computed and the real tokens per second. Then, on the same 8 rows cut to one length, the per-row cost
of an 8-row training step over that of a 2-row step (`row_linearity`: 1.0 = cost grows linearly with rows).
Last, each in a fresh subprocess so allocator caches do not blur the figures, the peak memory of the scoring
forward, of one training step (forward + backward, gradients already allocated) and of a plain no-grad
forward (full logits) on the same batch: on a GPU the CUDA allocator's peak, on a CPU the process's peak
resident set (VmHWM, reset before the pass).

Targets (SmolLM2-135M, 2-core CPU): cost_ratio_qtuning_pool <= 0.62, cost_ratio_qtuning <= 0.70 (the model's
floor is about 1/3 + r_s = 0.58), padding shares <= 0.10, scoring peak <= 1.1 x plain forward,
row_linearity <= 1.2. Measured figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qtuning.config import DataConfig, ExperimentConfig, ModelConfig, PruningConfig, TrainingConfig

ARMS = {
    "full": PruningConfig(sample="all", token="all", sample_ratio=1.0, token_ratio=1.0),
    "qtuning": PruningConfig(sample="qtuning", token="qtuning", sample_ratio=0.25, token_ratio=0.5),
    "random": PruningConfig(sample="random", token="random", sample_ratio=0.25, token_ratio=0.5),
    # the pool of 32 is scored together and its 8 kept rows train as one full micro-batch: a quarter of the
    # optimizer steps, full-width matmuls (algorithm.md: "let the triage pool differ from the micro-batch")
    "qtuning_pool": PruningConfig(sample="qtuning", token="qtuning", sample_ratio=0.25, token_ratio=0.5, selection_batch_size=32),
}


def bench_config(quick: bool, rows: int, max_length: int, micro_batch: int, out: Path) -> ExperimentConfig:
    from qtuning.modeling import tiny_model_config

    model = tiny_model_config() if quick else ModelConfig()
    return ExperimentConfig(
        name="bench",
        model=model,
        data=DataConfig(source="sharegpt", limit=rows, max_length=max_length),
        training=TrainingConfig(
            epochs=1, micro_batch_size=micro_batch, lr=1e-5, output_dir=str(out), seed=0, schedule="constant"
        ),
    )


def steal_seconds() -> float | None:
    """Seconds the hypervisor gave this machine's CPUs to someone else so far (Linux /proc/stat), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def time_epochs(base: ExperimentConfig, out: Path, repeats: int = 1) -> dict[str, dict]:
    """Each arm's epoch, `repeats` times, the rounds in alternating order (forward, then backward) so that drift
    in the machine's speed reaches every arm alike; an arm's figures are those of its fastest round (best of N,
    as `timeit` takes: noise only ever adds time), with every round's loop seconds beside them."""
    from qtuning.data import build_sft_dataset
    from qtuning.modeling import load_tokenizer
    from qtuning.train import train

    # the rows are read and tokenized once: every arm and round trains on the same prepared set
    data = build_sft_dataset(base.data, load_tokenizer(base.model), progress=False)
    # warm-up: thread pools, allocator, kernels (not timed)
    warm = base.model_copy(update={"training": base.training.model_copy(update={"max_steps": 1, "output_dir": str(out / "warm")})})
    train(warm, data=data, progress=False, save=False)
    keys = ("loop_seconds", "loop_cpu_seconds", "score_seconds", "optimizer_steps", "loss_tokens", "final_loss", "padding_share",
            "real_tokens_per_second", "cpu_threads")
    rounds: dict[str, list[dict]] = {name: [] for name in ARMS}
    for r in range(repeats):
        for name in (list(ARMS) if r % 2 == 0 else list(reversed(ARMS))):
            pruning = ARMS[name]
            if pruning.selection_batch_size:  # pool = micro-batch / r_s, whatever --micro-batch is
                pruning = pruning.model_copy(update={"selection_batch_size": round(base.training.micro_batch_size / pruning.sample_ratio)})
            cfg = base.model_copy(
                update={"pruning": pruning, "training": base.training.model_copy(update={"output_dir": str(out / name / str(r))})}
            )
            stolen = steal_seconds()
            s = train(cfg, data=data, progress=True, save=False)
            rec = {k: s[k] for k in keys}
            rec["steal_seconds"] = None if stolen is None else round(steal_seconds() - stolen, 2)
            rounds[name].append(rec)
    results = {}
    for name, recs in rounds.items():
        if len({r["loss_tokens"] for r in recs}) > 1:  # the same seed must train the same tokens every round
            raise RuntimeError(f"bench arm {name}: rounds trained different loss tokens {[r['loss_tokens'] for r in recs]}")
        best = min(recs, key=lambda r: r["loop_seconds"])
        results[name] = {**best, "loop_seconds_rounds": [r["loop_seconds"] for r in recs],
                         "steal_seconds_rounds": [r["steal_seconds"] for r in recs]}
    return results


def row_linearity(quick: bool, max_length: int, repeats: int = 3) -> dict[str, float]:
    """Per-row seconds of a training step (forward + backward, chunked loss) on 8 rows over that on 2 rows,
    the rows cut to one length so that only the row count differs (process CPU time on a CPU, wall on a GPU)."""
    import time

    from qtuning.data import build_sft_dataset
    from qtuning.lm import ChunkedLM, build_lanes, lanes_forward, loss_targets
    from qtuning.modeling import load_model, load_tokenizer, tiny_model_config

    mcfg = tiny_model_config() if quick else ModelConfig()
    tok = load_tokenizer(mcfg)
    data = build_sft_dataset(DataConfig(source="sharegpt", limit=64, max_length=max_length), tok, progress=False).dataset
    rows = sorted(range(len(data)), key=lambda i: -data[i]["length"])[:8]
    width = min(data[i]["length"] for i in rows)
    ids = [torch.tensor(data[i]["input_ids"][:width]) for i in rows]
    targets = [loss_targets(torch.tensor(data[i]["labels"][:width])) for i in rows]
    torch.manual_seed(0)
    lm = ChunkedLM(load_model(mcfg)).train()

    clock = time.perf_counter if torch.cuda.is_available() else time.process_time

    def step(n: int) -> float:
        lanes = build_lanes(ids[:n], targets[:n], [[i] for i in range(n)], tok.pad_token_id)
        start = clock()
        loss = lanes_forward(lm, lanes, torch.full((len(lanes.src),), 1.0 / max(len(lanes.src), 1)))
        loss.backward()
        return clock() - start

    step(2), step(8)  # warm-up: allocator, thread pools
    t2 = min(step(2) for _ in range(repeats))
    t8 = min(step(8) for _ in range(repeats))
    return {"step_seconds_2_rows": t2, "step_seconds_8_rows": t8, "row_linearity": (t8 / 8) / (t2 / 2), "row_tokens": width}


# --------------------------------------------------------------------------- memory (child processes)
def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set (Linux)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_forward_memory(kind: str, quick: bool, rows: int, max_length: int) -> int:
    """Bytes a forward adds at its peak over what the loaded model already holds."""
    from qtuning.data import build_sft_dataset
    from qtuning.modeling import load_model, load_tokenizer, tiny_model_config
    from qtuning.config import PACK_TOKENS
    from qtuning.data import collate
    from qtuning.lm import ChunkedLM, build_lanes, lane_plan, lanes_forward, loss_targets, unpad
    from qtuning.scoring import score_tokens

    mcfg = tiny_model_config() if quick else ModelConfig()
    tok = load_tokenizer(mcfg)
    data = build_sft_dataset(DataConfig(source="sharegpt", limit=rows * 4, max_length=max_length), tok).dataset
    longest = sorted(range(len(data)), key=lambda i: -data[i]["length"])[:rows]
    batch = collate([data[i]["input_ids"] for i in longest], [data[i]["labels"] for i in longest], tok.pad_token_id)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(mcfg).to(device).eval()
    batch = batch.to(device)
    rows = unpad(batch.input_ids, batch.attention_mask)[0]
    lanes = build_lanes(rows, list(loss_targets(batch.labels)), lane_plan([len(r) for r in rows], "packed", PACK_TOKENS), 0)
    lm = ChunkedLM(model)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if kind == "train":  # one training step's forward and backward, the loss chunked over positions
                lm.train()
                loss = lanes_forward(lm, lanes, torch.full((len(lanes.src),), 1.0 / len(lanes.src), device=device))
                loss.backward()
                return loss.detach()
            with torch.no_grad():
                if kind == "plain":
                    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                return score_tokens(model, batch.input_ids, batch.attention_mask, batch.labels)

    run()  # warm-up allocations of the first call (and the gradients of a training step) are not what we compare
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    import gc

    gc.collect()
    before = _status_kb("VmRSS")
    _rss_peak_reset()
    out = run()  # noqa: F841 (kept alive until the peak is read, like a caller would)
    return (_status_kb("VmHWM") - before) * 1024


def memory_ratio(quick: bool, rows: int, max_length: int) -> dict[str, float]:
    """Peaks of the scoring forward and of a training step over that of a plain no-grad forward, on the `rows`
    longest of a slice. Each in a process of its own (a clean allocator and peak), the three at once: a peak is
    its own process's, and most of each process's time is loading torch and the model."""
    procs = {}
    for kind in ("plain", "scoring", "train"):
        cmd = [sys.executable, "-m", "qtuning.bench", "--_memory", kind, "--micro-batch", str(rows), "--max-length", str(max_length)]
        if quick:
            cmd.append("--quick")
        procs[kind] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = {kind: proc.communicate() for kind, proc in procs.items()}  # every one waited for, then checked
    peaks = {}
    for kind, (out, err) in outputs.items():
        if procs[kind].returncode:
            raise subprocess.CalledProcessError(procs[kind].returncode, procs[kind].args, out, err)
        peaks[kind] = int(out.strip().splitlines()[-1])
    return {
        "plain_forward_peak_bytes": peaks["plain"],
        "scoring_peak_bytes": peaks["scoring"],
        "scoring_peak_mem_ratio": peaks["scoring"] / max(peaks["plain"], 1),
        "train_step_peak_bytes": peaks["train"],
        "train_peak_mem_ratio": peaks["train"] / max(peaks["plain"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qtuning bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model with the real tokenizer (a smoke check)")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    ap.add_argument("--rows", type=int, default=None, help="training rows (default 64; --quick 48)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per row (default 256; --quick 192)")
    ap.add_argument("--micro-batch", type=int, default=8, help="micro-batch = selection pool size (the paper's setting)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="epochs per arm, best taken (default 2; --quick 1): a shared CPU's noise only adds time")
    ap.add_argument("--_memory", choices=["plain", "scoring", "train"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory:
        print(measure_forward_memory(args._memory, args.quick, args.micro_batch, args.max_length or 256))
        return 0
    rows = args.rows or (48 if args.quick else 64)
    args.max_length = args.max_length or (192 if args.quick else 256)
    with tempfile.TemporaryDirectory(prefix="qtuning-bench-") as tmp:
        repeats = args.repeats or (1 if args.quick else 2)
        epochs = time_epochs(bench_config(args.quick, rows, args.max_length, args.micro_batch, Path(tmp)), Path(tmp), repeats)
    full = epochs["full"]["loop_seconds"]
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "model": "tiny-random (real tokenizer)" if args.quick else "SmolLM2-135M-Instruct",
        "rows": rows,
        "max_length": args.max_length,
        "micro_batch": args.micro_batch,
        "repeats": repeats,
        "epochs": epochs,
        "cost_ratio_qtuning": epochs["qtuning"]["loop_seconds"] / full,
        "cost_ratio_random": epochs["random"]["loop_seconds"] / full,
        "cost_ratio_qtuning_pool": epochs["qtuning_pool"]["loop_seconds"] / full,
        "scoring_share_qtuning": epochs["qtuning"]["score_seconds"] / full,
        # on a CPU shared with other jobs, the process's CPU time is steadier than the wall clock
        **{f"cpu_time_ratio_{arm}": epochs[arm]["loop_cpu_seconds"] / epochs["full"]["loop_cpu_seconds"]
           for arm in ("qtuning", "qtuning_pool", "random")},
        "load_average_1min": os.getloadavg()[0],
        "padding_share_full": epochs["full"]["padding_share"],
        "padding_share_qtuning": epochs["qtuning"]["padding_share"],
        "padding_share_qtuning_pool": epochs["qtuning_pool"]["padding_share"],
        "real_tokens_per_second_full": epochs["full"]["real_tokens_per_second"],
        **row_linearity(args.quick, args.max_length),
        **memory_ratio(args.quick, args.micro_batch, args.max_length),
    }
    print(f"\n{report['model']} on {report['device']}: {rows} rows x <= {args.max_length} tokens, micro-batch {args.micro_batch}")
    print(f"{'arm':<14}{'epoch s':>10}{'scoring s':>11}{'ratio':>8}{'steps':>7}{'loss tokens':>13}  every round (s), stolen by the host (s)")
    for name, e in epochs.items():
        print(
            f"{name:<14}{e['loop_seconds']:>10.1f}{e['score_seconds']:>11.1f}{e['loop_seconds'] / full:>8.2f}"
            f"{e['optimizer_steps']:>7}{e['loss_tokens']:>13}  {e['loop_seconds_rounds']}, {e['steal_seconds_rounds']}"
        )
    print(
        f"scoring forward peak {report['scoring_peak_bytes'] / 2**20:.0f} MiB, training step peak "
        f"{report['train_step_peak_bytes'] / 2**20:.0f} MiB vs plain forward {report['plain_forward_peak_bytes'] / 2**20:.0f} "
        f"MiB: ratios {report['scoring_peak_mem_ratio']:.2f}, {report['train_peak_mem_ratio']:.2f}"
    )
    print(
        f"padding share: full {report['padding_share_full']:.1%}, qtuning {report['padding_share_qtuning']:.1%}; "
        f"full data {report['real_tokens_per_second_full']:.0f} real tokens/s; row linearity {report['row_linearity']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
