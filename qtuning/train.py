"""The Q-Tuning training loop: score, triage, prune, step.

Run it as

    python -m qtuning.train --config run.yaml                 # one process (CPU or one GPU)
    accelerate launch -m qtuning.train --config run.yaml      # DDP / FSDP / DeepSpeed via accelerate
    python -m qtuning.train --config run.yaml --resume        # continue from the last checkpoint

Each optimizer step takes `grad_accum_steps` pools of `pool_size` samples:

1. score  - one no-grad forward gives every response token's NLL and entropy;
2. triage - the sample rule keeps K = round(pool * sample_ratio) rows (Q2 + Q4 for Q-Tuning);
3. prune  - the token rule removes the least useful tokens of Q2 rows from the loss;
4. learn  - forward and backward on the kept rows only, packed into lanes (training.layout).

Full-data runs skip step 1. The loss is a sum of token NLLs divided by the loss-token
count of the whole step across processes, known before the first backward, so gradient
accumulation equals one large batch and N processes equal one with the same global
batch. Both forwards run through the model accelerate prepared (qtuning.lm.ChunkedLM
under DDP/FSDP/ZeRO-3): never an unwrapped, possibly sharded module, never the full
logits of a micro-batch.

Everything leaves through `metrics.jsonl` in the output folder, `selection.parquet` (what each pool
decided about each sample: qtuning.selection), the accelerate trackers of `training.log_with`, and an
optional `log_fn(metrics, step)` the caller passes in; this module knows no other tracker. With a held-out
split (data.eval_rows / data.eval_source) the held-out loss is measured every `training.eval_every_steps`
and at the end (`eval/loss`, `eval/ppl`; summary.json's `heldout_loss`).

Nothing on disk is ever half-written: a checkpoint is written to `checkpoints/step-N.partial` and renamed
when complete (older ones are deleted only then), after checking that the disk has room for it; the final
model goes to `final.partial/` and is renamed to `final/`. Run from the command line, SIGTERM or SIGINT (or
the death of the process named by $QTUNING_PARENT_PID, the pipeline that started it) stops the loop at the
next step boundary: one process saves a checkpoint of that step, writes no final model and exits 128+signal.

This file is the loop; beside it: `qtuning.checkpoints` (TrainState, checkpoints on disk, resume),
`qtuning.stopping` (signals, parent watch), `qtuning.devices` (what this machine can run) and
`qtuning.step_metrics` (what a step did, reduced across processes by name; metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from qtuning.checkpoints import TrainState, checkpoints, resume_from, save_checkpoint
from qtuning.config import DataConfig, ExperimentConfig, TrainingConfig
from qtuning.pruning import NonFiniteScores, prune_pool
from qtuning.rules import PoolStats, Selection
from qtuning.data import IGNORE_INDEX as IGNORE, Batch, DataError, SFTData, build_sft_dataset, collate
from qtuning.lm import ChunkedLM, as_lm, build_lanes, lane_plan, lanes_forward, loss_targets, unpad
from qtuning.scoring import score_tokens
from qtuning.devices import check_device, precision, sync
from qtuning.selection import SelectionLog, log_rows
from qtuning.step_metrics import MetricsFile, record_step
from qtuning.stopping import StopRequest, stop_early

HELDOUT_ROWS_FILE = "heldout_rows.jsonl"  # the run folder's final held-out loss per row (write_heldout_rows)

LogFn = Callable[[dict[str, float], int], None]


# --------------------------------------------------------------------------- data order
def pool_order(lengths: np.ndarray, pool: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The pools of one epoch, a pure function of (seed, epoch): resumable without saved sampler state.

    Lengths play no part: which rows are triaged together is the spec's business, not the layout's (rows are
    grouped by length after triage, in `micro_batch_plan`)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    return [order[i : i + pool] for i in range(0, len(order), pool)]


# --------------------------------------------------------------------------- one pool
@dataclass
class Pruned:
    """A pool after stages 1 and 2: what trains, and what it cost to decide."""

    batch: Batch  # the rows that train (all rows, masked, for train_on: masked_batch)
    weight: Tensor  # (rows,) per-row loss weight
    sel: Selection
    response_tokens: int  # label tokens in the whole pool, before pruning
    real_tokens: int  # non-pad tokens in the whole pool
    loss_tokens: Tensor  # () on device: label tokens that train, after both stages
    pruned_tokens: Tensor | None = None  # (rows,) on device: response tokens token pruning took from each trained row
    q2_tokens: Tensor | None = None  # (2,) on device: response tokens of the kept token-pruned rows, before and after
    excluded: int = 0  # rows left out for non-finite scores (pruning.on_nonfinite: exclude)
    budget_tokens: int | None = None  # pruning.budget: equal_tokens: the loss tokens Q-Tuning would train on this pool
    score_fed_tokens: int = 0  # positions the scoring forward computed (lanes x width)
    score_real_tokens: int = 0  # of which real tokens


def select_pool(model, batch: Batch, cfg: ExperimentConfig, gen: torch.Generator, *, threshold: float | None = None,
                anneal: bool = False) -> Pruned:
    """Stages 1 and 2 for one pool: score (if the rules need it), triage, prune tokens. `threshold` and `anneal`:
    what the loop knows beyond the pool, for rules that read it (InfoBatch: `InfoBatchScores`)."""
    p = cfg.pruning
    lengths = batch.attention_mask.sum(1).cpu()
    response_lengths = (batch.labels[:, 1:] != IGNORE).sum(1).cpu()
    stats = PoolStats(lengths=lengths, response_lengths=response_lengths, threshold=threshold, anneal=anneal)
    nll, fed, real = None, 0, 0
    if p.needs_scores:
        # 1. where does each sample sit on the EU plane? (no grad, chunked over the vocabulary)
        model.eval()
        scores = score_tokens(
            model, batch.input_ids, batch.attention_mask, batch.labels, entropy_scope=p.entropy_scope,
            chunk_tokens=cfg.training.score_chunk_tokens, layout=cfg.training.layout, pack_tokens=cfg.training.pack_tokens,
        )
        fed, real = scores.fed_tokens, scores.real_tokens
        nll = scores.nll  # (b, T)
        stats.ppl, stats.ent = scores.sample_ppl().cpu(), scores.sample_ent().cpu()  # one sync
    # 2. keep misconceptions (Q2) and calibration (Q4); drop noise (Q1) and the mastered (Q3)
    # 3. trim the least useful tokens of Q2 rows from the loss; Q4 rows stay whole
    decision = prune_pool(stats, batch.labels, nll, batch.attention_mask, p, gen)
    sel, labels = decision.sel, decision.labels
    pruned = Batch(batch.input_ids, batch.attention_mask, labels)
    cut = (batch.labels[:, 1:] != IGNORE) & (labels[:, 1:] == IGNORE)  # (b, T-1) response tokens token pruning took
    if p.train_on == "kept_rows":
        keep = sel.keep.to(labels.device)
        trained, weight, cut_rows = pruned.rows(keep), sel.weight[sel.keep], cut.sum(1)[keep]
    else:  # the official code's single masked pass: same gradient, no saving
        trained = Batch(batch.input_ids, batch.attention_mask, labels.masked_fill(~sel.keep[:, None].to(labels.device), IGNORE))
        weight, cut_rows = sel.weight * sel.keep, cut.sum(1)
    loss_tokens = (trained.labels[:, 1:] != IGNORE).sum()
    prunable = (sel.keep & sel.prune_tokens).to(labels.device)[:, None]
    q2_tokens = torch.stack([((batch.labels[:, 1:] != IGNORE) & prunable).sum(), ((labels[:, 1:] != IGNORE) & prunable).sum()])
    return Pruned(trained, weight, sel, int(response_lengths.sum()), int(lengths.sum()), loss_tokens,
                  cut_rows, q2_tokens, decision.excluded, decision.budget_tokens, fed, real)


def loss_denominator(pruned: Pruned, loss_norm: str) -> Tensor:
    """Weighted count of what the loss averages over: kept response tokens (`response`), or (`all_tokens`, the
    authors' code) every real position of a kept row less the response tokens token pruning took from it."""
    b = pruned.batch
    w = pruned.weight.to(b.labels.device)
    if loss_norm == "response":
        per_row = (b.labels[:, 1:] != IGNORE).sum(1)
    else:
        cut = pruned.pruned_tokens if pruned.pruned_tokens is not None else torch.zeros_like(w, dtype=torch.long)
        per_row = (b.attention_mask[:, 1:].sum(1) - cut.to(b.labels.device)) * (w > 0)
    return (per_row.float() * w).sum()


def micro_batch_plan(lengths: list[int], t: TrainingConfig) -> list[list[list[int]]]:
    """A step's trained rows as micro-batches of lanes (lists of row indices). Grouping happens after triage, so
    it changes no pruning decision; each micro-batch holds at most micro_batch_size x (the step's longest row)
    positions, what a padded micro-batch of them could hold.

    padded: micro_batch_size rows per micro-batch, one per lane, in pool order (group_by_length: longest first);
    packed: rows spread over lanes of about pack_tokens (qtuning.lm.lane_plan), lanes grouped longest first.
    """
    if not lengths:
        return []
    if t.layout == "padded":
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if t.group_by_length else list(range(len(lengths)))
        return [[[i] for i in order[s : s + t.micro_batch_size]] for s in range(0, len(order), t.micro_batch_size)]
    budget = t.micro_batch_size * max(lengths)
    lanes = sorted(lane_plan(lengths, "packed", min(t.pack_tokens, budget)), key=lambda l: -sum(lengths[i] for i in l))
    plan: list[list[list[int]]] = []
    for lane in lanes:  # longest lane first: a micro-batch is as wide as its first lane
        if plan and (len(plan[-1]) + 1) * sum(lengths[i] for i in plan[-1][0]) <= budget:
            plan[-1].append(lane)
        else:
            plan.append([lane])
    return plan


@dataclass
class Learned:
    """What stage 4 did on this process: the step loss and what its forwards computed."""

    loss: Tensor  # () on device, detached: this process's share of the step loss (sum over processes = the loss)
    fed_tokens: int  # positions the training forwards computed
    real_tokens: int  # of which real tokens
    skipped: bool = False  # no process had a loss token: nothing ran, and the optimizer must not step


def learn(accelerator, model, pools: list[Pruned], cfg: ExperimentConfig) -> Learned:
    """Stage 4: forward and backward on the kept rows of a step's pools, micro-batch by micro-batch.

    The loss is the weighted NLL sum divided by the denominator of the whole step, over every pool of every
    process, so N processes equal one process with the same global batch, and accumulation equals one large
    batch: DDP/FSDP average gradients over processes, so each process's sum is scaled by N. Gradients are
    synchronised once, on the last backward, after every process has run the same number of forwards (FSDP
    gathers weights in each). A step without a loss token on any process runs nothing and says so (`skipped`:
    AdamW's momentum would still move the weights). One host sync: the collective of the step's counts.
    """
    model.train()
    lm, world = as_lm(model), accelerator.num_processes
    ids, targets, row_w = [], [], []
    for p in pools:  # the step's trained rows, unpadded, with their loss mask and weight
        rows, _ = unpad(p.batch.input_ids, p.batch.attention_mask)
        ids += rows
        targets += list(loss_targets(p.batch.labels))
        row_w += p.weight.tolist()
    plan = micro_batch_plan([len(r) for r in ids], cfg.training)
    device = accelerator.device
    denom = sum((loss_denominator(p, cfg.pruning.loss_norm) for p in pools), torch.zeros((), device=device)).float().to(device)
    tokens = sum((p.loss_tokens for p in pools), torch.zeros((), device=device)).float().to(device)
    counts = torch.stack([denom, tokens, torch.tensor(float(len(plan)), device=device)])[None]  # (1, 3)
    if world > 1:  # one collective: the step's global denominator and loss tokens, the most micro-batches of any process
        counts = accelerator.gather(counts)
    denom, n_tokens, n_micro = counts[:, 0].sum(), int(counts[:, 1].sum()), int(counts[:, 2].max())  # a host sync
    if n_tokens == 0:
        return Learned(torch.zeros((), device=device), 0, 0, skipped=True)
    scale = world / denom.clamp(min=1.0)
    pad_id = 0  # any id: no target is ever read from a padding position
    loss_sum = torch.zeros((), device=accelerator.device)
    fed = real = 0
    for k in range(n_micro):
        last = k == n_micro - 1
        if k < len(plan):
            lanes = build_lanes(ids, targets, plan[k], pad_id)
            w = torch.tensor(row_w, device=accelerator.device)[lanes.row] * scale  # (N,) per-target weight
        else:  # this process has fewer micro-batches than another: a one-token forward with no target keeps step
            one = torch.tensor([pad_id], device=accelerator.device)
            lanes = build_lanes([one], [torch.zeros_like(one, dtype=torch.bool)], [[0]], pad_id)
            w = torch.zeros(0, device=accelerator.device)
        # DeepSpeed reduces and steps at the boundary its backward is told of (it steps in every backward otherwise);
        # DDP and FSDP skip the gradient sync by no_sync, and step where the loop calls the optimizer
        accelerator.sync_gradients = last
        with (contextlib.nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
            loss = lanes_forward(lm, lanes, w, cfg.training.score_chunk_tokens)  # through DDP/FSDP when prepared
        accelerator.backward(loss)
        loss_sum += loss.detach()
        fed, real = fed + lanes.fed_tokens, real + lanes.real_tokens
    return Learned(loss_sum, fed, real)


class InfoBatchScores:
    """InfoBatch's score table (sample: infobatch): each data set row's loss when last scored, kept in
    TrainState.seen_loss (so a resume continues with it), its mean over the rows seen so far (the threshold of
    the next step's pools), and which steps anneal (the last `pruning.anneal` share train every row).

    Every process scores its own pools; their (row, loss) pairs are gathered each step, so every process holds
    the same table and takes the decisions one process would."""

    def __init__(self, state: TrainState, total_steps: int, anneal: float):
        self.table = state.seen_loss  # the checkpointed dict itself: updates are saved with the state
        self.anneal_from = total_steps - round(total_steps * anneal)

    def threshold(self) -> float | None:
        return float(np.mean(list(self.table.values()))) if self.table else None

    def annealing(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based: the steps done before it) trains every row."""
        return step >= self.anneal_from

    def update(self, accelerator, rows: list[np.ndarray], pools: list[Pruned], width: int) -> None:
        """Record the losses the step's pools measured (their rows in data set order), across processes."""
        idx = np.full(width, -1, dtype=np.int64)
        loss = np.full(width, np.nan)
        mine_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        mine_loss = torch.cat([torch.log(p.sel.ppl.double()) for p in pools]).numpy() if pools else np.zeros(0)
        idx[: len(mine_rows)], loss[: len(mine_loss)] = mine_rows, mine_loss
        if accelerator.num_processes > 1:  # one gather of every process's (row, loss): all hold the same table
            both = accelerator.gather(torch.tensor(np.stack([idx.astype(np.float64), loss]), device=accelerator.device)[None])
            idx, loss = both[:, 0].flatten().cpu().numpy().astype(np.int64), both[:, 1].flatten().cpu().numpy()
        for r, value in zip(idx.tolist(), loss.tolist()):
            if r >= 0 and math.isfinite(value):  # padding, and rows left out for non-finite scores, say nothing
                self.table[str(r)] = value


# --------------------------------------------------------------------------- what the run shows besides the loss
def heldout_batches(data: SFTData, size: int, pad_id: int, device) -> tuple[list[Batch], list[str]]:
    """The held-out rows (never trained on) as padded batches of `size`, longest first (less padding), and
    their sample ids in that order."""
    if data.heldout is None:
        return [], []
    ids, labels = list(data.heldout["input_ids"]), list(data.heldout["labels"])
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    sample_ids = list(data.heldout["sample_id"])
    batches = [collate([ids[i] for i in order[s : s + size]], [labels[i] for i in order[s : s + size]], pad_id).to(device)
               for s in range(0, len(order), size)]
    return batches, [sample_ids[i] for i in order]


def heldout_metrics(model, batches: list[Batch], cfg: ExperimentConfig) -> tuple[dict[str, float], np.ndarray]:
    """eval/loss (mean NLL per held-out response token) and eval/ppl, by the no-grad scoring forward (LM head
    chunked over positions), and each row's (NLL sum, response tokens) in batch order: what a comparison
    resamples to put an interval on the held-out loss. Every process measures every row (a few forwards), so
    no collective is needed."""
    model.eval()
    per_row = []
    for b in batches:
        scores = score_tokens(model, b.input_ids, b.attention_mask, b.labels, chunk_tokens=cfg.training.score_chunk_tokens,
                              layout=cfg.training.layout, pack_tokens=cfg.training.pack_tokens)
        mask = scores.response_mask
        per_row.append(torch.stack([(scores.nll.double() * mask).sum(1), mask.sum(1).double()], 1))
    rows = torch.cat(per_row).cpu().numpy()  # one host sync
    nll_sum, n_tokens = float(rows[:, 0].sum()), int(rows[:, 1].sum())
    loss = nll_sum / max(n_tokens, 1)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 80.0)), "eval/tokens": n_tokens}, rows


def write_heldout_rows(path: Path, sample_ids: list[str], rows: np.ndarray) -> None:
    """The final held-out measurement per row (sample_id, nll: summed over its response tokens, tokens), JSON lines."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for sid, (nll, tokens) in zip(sample_ids, rows.tolist()):
            f.write(json.dumps({"sample_id": sid, "nll": nll, "tokens": int(tokens)}) + "\n")
    tmp.replace(path)


def selection_rows(step: int, pools: list[Pruned], pool_ids: list[int], rows_of: Callable[[int], np.ndarray],
                   sample_ids: list[str], response_tokens: np.ndarray, pools_per_epoch: int) -> list[dict]:
    """This process's selection-log rows of one step (qtuning.selection), one per (pool, sample); one host sync."""
    if not pools:
        return []
    loss_tokens = torch.cat([_row_loss_tokens(p) for p in pools]).tolist()
    rows, k = [], 0
    for p, i in zip(pools, pool_ids):
        idx = rows_of(i)
        rows += log_rows(step, i // pools_per_epoch, i, [sample_ids[r] for r in idx], response_tokens[idx], p.sel,
                          loss_tokens[k : k + len(idx)])
        k += len(idx)
    return rows


def _row_loss_tokens(p: Pruned) -> Tensor:
    """(b,) label tokens each row of the pool trains on after both stages; 0 for dropped rows."""
    trained = (p.batch.labels[:, 1:] != IGNORE).sum(1)  # one per trained row (kept_rows) or per pool row (masked)
    keep = p.sel.keep.to(trained.device)
    if len(trained) == len(keep):
        return trained * keep
    return torch.zeros(len(keep), dtype=trained.dtype, device=trained.device).masked_scatter(keep, trained)


def check_trackers(t: TrainingConfig) -> None:
    """Refuse, before anything loads, trackers of training.log_with whose package is missing (accelerate would
    drop them silently)."""
    import accelerate.utils

    missing = [name for name in t.log_with if not getattr(accelerate.utils, f"is_{name}_available")()]
    if missing:
        raise ValueError(f"training.log_with: {', '.join(missing)} not installed here; pip install {' '.join(missing)} "
                         "or remove them from training.log_with")


def with_trackers(accelerator, cfg: ExperimentConfig, log_fn: LogFn | None) -> LogFn | None:
    """`log_fn` that also sends each logged step to the accelerate trackers of training.log_with (started here)."""
    if not cfg.training.log_with:
        return log_fn
    flat = {f"{section}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for section, fields in cfg.model_dump(mode="json").items() if isinstance(fields, dict) for k, v in fields.items()}
    accelerator.init_trackers(cfg.name, config=flat)

    def log(metrics: dict[str, float], step: int) -> None:
        accelerator.log(metrics, step=step)
        if log_fn:
            log_fn(metrics, step)

    return log


# --------------------------------------------------------------------------- the loop
def plan_steps(n_samples: int, cfg: ExperimentConfig, world: int) -> tuple[int, int, int]:
    """(pools per epoch, global pools to train, optimizer steps), each process taking one pool of every `world`."""
    t = cfg.training
    pools_per_epoch = math.ceil(n_samples / cfg.pool_size)
    total_pools = max(world, (math.ceil(t.epochs * pools_per_epoch) // world) * world)
    steps = math.ceil(total_pools // world / t.grad_accum_steps)
    if t.max_steps is not None:
        steps = min(steps, t.max_steps)
        total_pools = min(total_pools, steps * t.grad_accum_steps * world)
    return pools_per_epoch, total_pools, steps


def _adamw(params: list[torch.nn.Parameter], t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (CPU and CUDA): on a 2-core CPU the per-tensor loop over SmolLM2's
    135M weights took about 2 s a step, the fused kernel 0.2 s, a cost that does not shrink with the rows trained."""
    if t.fused_adamw:
        try:
            return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            pass
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def train(
    cfg: ExperimentConfig,
    *,
    data: SFTData | None = None,
    resume: bool = False,
    log_fn: LogFn | None = None,
    progress: bool = True,
    save: bool = True,
    stop: StopRequest | None = None,
) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.pruning`; returns the run summary (also in summary.json).

    `data`: the tokenized set `cfg.data` describes, prepared once (`qtuning.data.build_sft_dataset`, saved and
    loaded with `SFTData.save/load`); without it the rows are read and tokenized here. `cfg.data.subset` applies
    either way. `save=False` writes no checkpoint and no final model (benchmarks, tests of the loop itself).
    `stop`: when it becomes true the loop ends at the next step boundary, a one-process run saves a checkpoint
    of that step, and TrainingStopped is raised (no final model, no summary).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from qtuning.modeling import load_model, load_tokenizer, save_final

    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    wall_start = time.perf_counter()
    t, out = cfg.training, Path(cfg.training.output_dir)
    check_trackers(t)
    check_device(cfg)
    mixed_precision, weight_dtype = precision(t, cfg.model.finetune)
    # broadcast_buffers=False: no buffer needs syncing (rotary tables), and the broadcast would be a collective
    # in every forward, which processes with different numbers of scoring forwards must not need
    accelerator = Accelerator(
        mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        log_with=t.log_with or None, project_dir=str(out),
    )
    asked = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(var, "").lower() == "true"]  # what the launcher's accelerate config asked for
    if asked and accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # accelerate 1.16 turns FSDP/DeepSpeed on for GPU-like devices only: on a CPU the config runs as DDP
        accelerator.print(f"qtuning.train: warning: the accelerate config asks for {asked[0]}, which accelerate runs as "
                          f"{accelerator.distributed_type.value} on this machine: every process holds the whole model")
    set_seed(t.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---- data, model, optimizer
    tokenizer = load_tokenizer(cfg.model)
    if data is None:
        with accelerator.main_process_first():
            data = build_sft_dataset(cfg.data, tokenizer, progress=progress and accelerator.is_main_process)
    else:
        data = matching_data(data, cfg.data)
    all_ids, all_labels = list(data.dataset["input_ids"]), list(data.dataset["labels"])
    lengths = np.asarray(data.dataset["length"])
    model = load_model(cfg.model, dtype=weight_dtype)
    if t.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and with no_sync
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = ChunkedLM(model)  # what accelerate wraps: scoring and training both go through the prepared module
    optimizer = _adamw([p for p in model.parameters() if p.requires_grad], t)
    pools_per_epoch, total_pools, total_steps = plan_steps(len(lengths), cfg, world)
    schedule = "constant_with_warmup" if t.schedule == "constant" else t.schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # no dataloader for accelerate to read DeepSpeed's batch size from (DeepSpeed only logs it); clipping is the
        # engine's, since accelerate's clip_grad_norm_ only reads its norm under DeepSpeed
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        if ds.get("gradient_clipping", "auto") == "auto" and t.max_grad_norm is not None:
            ds["gradient_clipping"] = t.max_grad_norm
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    device = accelerator.device

    state = TrainState()
    if resume and (ckpts := checkpoints(out)):
        state, ckpt = resume_from(accelerator, ckpts)
        accelerator.print(f"resumed from {ckpt} (step {state.step}/{total_steps})")
    elif resume:
        accelerator.print(f"--resume: no checkpoint under {out / 'checkpoints'}, starting from scratch")
    infobatch = InfoBatchScores(state, total_steps, cfg.pruning.anneal) if cfg.pruning.sample == "infobatch" else None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    metrics_file = MetricsFile(out / "metrics.jsonl", keep_until=state.step) if accelerator.is_main_process else None
    selection = SelectionLog(out, rank, accelerator.is_main_process, keep_until=state.step)
    accelerator.wait_for_everyone()  # the main process has trimmed the selection log before anyone appends
    log_fn = with_trackers(accelerator, cfg, log_fn)
    sample_ids = list(data.dataset["sample_id"])
    response_tokens = np.asarray(data.dataset["response_length"]) - np.asarray([l[0] != IGNORE for l in all_labels])
    heldout, heldout_ids = heldout_batches(data, t.micro_batch_size, tokenizer.pad_token_id, device)
    eval_metrics: dict[str, float] = {}
    heldout_rows = None  # the last measurement's per-row NLL sums and token counts

    epoch_pools: dict[int, list[np.ndarray]] = {}

    def pool_rows(i: int) -> np.ndarray:
        """Global pool i: epoch i // pools_per_epoch, in that epoch's seeded order (data set row indices)."""
        epoch, j = divmod(i, pools_per_epoch)
        if epoch not in epoch_pools:
            epoch_pools.clear()
            epoch_pools[epoch] = pool_order(lengths, cfg.pool_size, t.seed, epoch)
        return epoch_pools[epoch][j]

    def pool(i: int) -> Batch:
        idx = pool_rows(i)
        return collate([all_ids[k] for k in idx], [all_labels[k] for k in idx], tokenizer.pad_token_id).to(device)

    bar = tqdm(total=total_steps, initial=state.step, desc=cfg.name, disable=not (progress and accelerator.is_main_process))
    while state.step < total_steps and not stop:
        step_start, step_cpu = time.perf_counter(), time.process_time()
        # ---- stages 1-2 on this step's pools (this process takes one of every `world`)
        pools = []
        context = {"threshold": infobatch.threshold(), "anneal": infobatch.annealing(state.step)} if infobatch else {}
        while len(pools) < t.grad_accum_steps and state.pools_done < total_pools:
            i = state.pools_done + rank
            state.pools_done += world
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + i)  # per-pool: resume-safe randomness
            try:
                with accelerator.autocast():
                    pools.append(select_pool(model, pool(i), cfg, gen, **context))  # the prepared model: sharded under FSDP/ZeRO-3
            except NonFiniteScores as e:  # name the samples, not their positions in the pool
                ids = data.dataset["sample_id"]
                raise e.with_names([ids[int(pool_rows(i)[r])] for r in e.rows]) from None
        sync(device)
        score_end = time.perf_counter()

        # ---- 4. learn from what is left, and only from it (a step without a loss token anywhere is skipped)
        learned = learn(accelerator, model, pools, cfg)
        if not learned.skipped:
            if t.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        step_end = time.perf_counter()
        state.step += 1

        # ---- what the step did, on every process: one reduction and one host sync
        metrics = record_step(accelerator, state, pools, learned, scheduler.get_last_lr()[0],
                              (score_end - step_start, step_end - score_end, time.process_time() - step_cpu),
                              pools_per_epoch, cfg.pruning.budget == "equal_tokens")
        pool_ids = [state.pools_done - (len(pools) - k) * world + rank for k in range(len(pools))]
        selection.record(selection_rows(state.step, pools, pool_ids, pool_rows, sample_ids, response_tokens, pools_per_epoch))
        if infobatch:
            infobatch.update(accelerator, [pool_rows(i) for i in pool_ids], pools, t.grad_accum_steps * cfg.pool_size)
        if heldout and (state.step == total_steps or (t.eval_every_steps and state.step % t.eval_every_steps == 0)):
            with accelerator.autocast():
                eval_metrics, heldout_rows = heldout_metrics(model, heldout, cfg)  # the prepared model, as in scoring
            metrics.update(eval_metrics)
        if state.step % t.log_every_steps == 0 or state.step == total_steps or "eval/loss" in metrics:
            if metrics_file:
                metrics_file.write(state.step, metrics)
            if log_fn and accelerator.is_main_process:
                log_fn(metrics, state.step)
        bar.set_postfix(loss=f"{state.last_loss:.3f}", kept=f"{metrics['prune/kept_samples']:.2f}", tok=f"{metrics['prune/kept_tokens']:.2f}")
        bar.update(1)
        if save and ((t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0) or state.step == total_steps):
            save_checkpoint(accelerator, out, state, t.keep_checkpoints, model)
    bar.close()
    if stop and state.step < total_steps:
        stop_early(accelerator, out, state, t.keep_checkpoints, model, save, stop)

    accelerator.wait_for_everyone()
    selection.close()
    if heldout and not eval_metrics:  # resumed at the end: nothing ran, measure once
        with accelerator.autocast():
            eval_metrics, heldout_rows = heldout_metrics(model, heldout, cfg)  # the prepared model, as in scoring
    if heldout_rows is not None and accelerator.is_main_process:
        write_heldout_rows(out / HELDOUT_ROWS_FILE, heldout_ids, heldout_rows)
    summary = {
        "optimizer_steps": state.step,
        "final_loss": state.last_loss,
        "loss_tokens": state.loss_tokens,
        "samples_trained": state.samples_trained,
        "samples_seen": state.samples_seen,
        "skipped_steps": state.skipped_steps,
        "nonfinite_samples": state.nonfinite,
        "score_seconds": round(state.score_seconds, 3),
        "learn_seconds": round(state.learn_seconds, 3),
        "loop_seconds": round(state.score_seconds + state.learn_seconds, 3),  # the training loop: what pruning changes
        "loop_cpu_seconds": round(state.loop_cpu_seconds, 3),  # the same, in this process's CPU time
        "wall_seconds": round(time.perf_counter() - wall_start, 3),  # loop + data, model load and saving
        "data_fingerprint": data.fingerprint,
        "data_rows": len(lengths),
        "data_skipped": data.skipped,
        "final_dir": str(out / "final"),
        "world_size": world,
        "distributed_type": accelerator.distributed_type.value,  # what accelerate ran: NO, MULTI_CPU (DDP), FSDP, ...
        **({"heldout_loss": eval_metrics["eval/loss"], "heldout_ppl": eval_metrics["eval/ppl"],
            "heldout_rows": len(data.heldout), "heldout_tokens": eval_metrics["eval/tokens"]} if eval_metrics else {}),
        "cpu_threads": torch.get_num_threads(),  # per process: what the launcher gave it
        # equal_tokens: Q-Tuning's count on the same pools, the budget loss_tokens reaches only where the kept rows
        # hold enough tokens (a comparison table says by how much an arm falls short)
        **({"budget_tokens": state.budget_tokens} if cfg.pruning.budget == "equal_tokens" else {}),
        "padding_share": round(1 - state.fed_real_tokens / max(state.fed_tokens, 1), 4),
        "real_tokens_per_second": round(state.fed_real_tokens / max(state.score_seconds + state.learn_seconds, 1e-9), 1),
        "mixed_precision": mixed_precision,
        "weight_dtype": str(weight_dtype).removeprefix("torch."),
    }
    if save:
        # the whole model, gathered from every process's shard under FSDP/ZeRO-3 (a collective: all ranks call it)
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            final = accelerator.unwrap_model(model)
            if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                final = ChunkedLM(whole_model(accelerator, cfg, weight_dtype))  # rank 0's module holds only its shard
                final.load_state_dict(state_dict)
            partial = out / "final.partial"  # renamed when complete: a final/ folder is always a whole model
            shutil.rmtree(partial, ignore_errors=True)
            save_final(final.model, tokenizer, partial)
            shutil.rmtree(out / "final", ignore_errors=True)
            partial.rename(out / "final")
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if save and not t.keep_checkpoints_after_training:  # the final model is what later steps read
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def whole_model(accelerator, cfg: ExperimentConfig, dtype: torch.dtype):
    """A fresh unsharded model on this process alone (the main one, to hold the gathered weights). Under ZeRO-3
    transformers would load it partitioned (zero.Init, whatever zero3_init_flag says in accelerate 1.16): a
    collective that the other processes would never join."""
    from accelerate.utils import DistributedType

    from qtuning.modeling import load_model

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return load_model(cfg.model, dtype=dtype)
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        return load_model(cfg.model, dtype=dtype)
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def matching_data(data: SFTData, cfg: DataConfig) -> SFTData:
    """`data` narrowed to `cfg.subset`, after checking that it was prepared from `cfg` (anything else would train on
    rows the config does not describe)."""
    if data.config != cfg.model_copy(update={"subset": None}):
        raise DataError(
            f"the tokenized data set ({data.source}, fingerprint {data.fingerprint[:12]}) was prepared from another "
            f"data config than the run's; prepare it from this run's data section"
        )
    return data.select_ids(cfg.subset) if cfg.subset else data


# --------------------------------------------------------------------------- CLI
if __name__ == "__main__":  # `python -m qtuning.train` / `accelerate launch -m qtuning.train`: the command line
    import runpy

    runpy.run_module("qtuning.train_cli", run_name="__main__", alter_sys=True)
