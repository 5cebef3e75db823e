"""Q-Tuning inside `transformers.Trainer` and TRL's `SFTTrainer`: the engine's score -> triage -> prune per batch.

For those who already train with a Trainer: keep your model, data set, collator, `TrainingArguments` /
`SFTConfig` and `report_to`, swap the class, pass a `PruningConfig`:

    from qtuning.config import PruningConfig
    from qtuning.hf_trainer import QTuningTrainer        # or QTuningSFTTrainer (needs `pip install trl`)

    trainer = QTuningTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                             pruning=PruningConfig(sample_ratio=0.25, token_ratio=0.5))
    trainer.train()

What changes, and where (all through the Trainer's documented hooks, nothing of its loop is copied):

- `get_batch_samples` (called once per optimizer step with the step's `gradient_accumulation_steps` batches):
  each batch is one **pool**. `qtuning.train.select_pool` scores it (no-grad forward), triages it with the
  sample rule and prunes tokens with the token rule, exactly as `python -m qtuning.train` does; the batch is
  replaced by its kept rows (or, for `pruning.train_on: masked_batch`, the whole pool with dropped rows masked).
  The step's loss denominator, `qtuning.train.loss_denominator` summed over the step's pools, is returned as
  the Trainer's `num_items_in_batch`.
- `compute_loss`: the weighted sum of token NLLs of the micro-batch divided by that denominator, so the
  accumulated gradient is the one of a single large batch, as in `qtuning.train.learn` (`loss_is_scaled_for_ga`
  tells `training_step` not to divide again). Across processes, with the Trainer's
  `average_tokens_across_devices` (its default), the denominator is the step's count summed over every process
  (one gather per step) and each process's loss is scaled by their number, since DDP averages the gradients:
  N processes take the step of one process with the same global batch, as in `qtuning.train.learn`. Without it,
  each process divides by its own count (a mean of per-process means). Evaluation (no pruning) keeps the parent
  class's loss.
- `log`: the pruning metrics of the steps since the last log (`prune/kept_samples`, `prune/kept_tokens`,
  `prune/q1`..`prune/q4`, ...) join the Trainer's own log line, so every `report_to` integration gets them.

`per_device_train_batch_size` is the pool: the paper scores micro-batches of 8; a pool of
`micro-batch / sample_ratio` trains full micro-batches of kept rows. Batches must be padded (one sample per
row, right padding): TRL's `padding_free` and packing put several samples in one row and are refused.
Randomness of the random rules is seeded per pool from `args.seed` and the pool's global index, as in the
engine, so a resumed run repeats its decisions.

Several processes: DDP (tested with 2 CPU processes). The scoring forward runs on the unwrapped model, which
under FSDP or DeepSpeed ZeRO-3 holds one shard of the weights: for sharded training use `python -m
qtuning.train` (`training.accelerate_config`), which scores through the prepared model.

TRL is imported only when `QTuningSFTTrainer` is first used, never at import of this module.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor
from transformers import Trainer

from qtuning.config import SCORE_CHUNK_TOKENS, ExperimentConfig, PruningConfig, TrainingConfig, load_yaml, validate
from qtuning.data import IGNORE_INDEX, Batch, collate
from qtuning.train import Pruned, loss_denominator, select_pool

TOTALS_FILE = "qtuning_totals.json"  # running totals (train/loss_tokens, ...) beside each checkpoint
WEIGHT_KEY = "qtuning_weight"  # per-row loss weights ride in the batch dict from get_batch_samples to compute_loss
PRUNED_KEY = "qtuning_pruned_tokens"  # and per-row counts of the response tokens token pruning took (all_tokens norm)
_SEED_STRIDE = 1_000_003  # the engine's per-pool seed: seed * stride + global pool index (qtuning.train)


class QTuningMixin:
    """Q-Tuning's per-pool pruning for a `transformers.Trainer` subclass; put it first: `class X(QTuningMixin, Trainer)`.

    Extra constructor arguments: `pruning` (a `qtuning.config.PruningConfig`; default Q-Tuning 25% x 50%) and
    `score_chunk_tokens` (positions per chunk of the scoring head).
    """

    # compute_loss divides by the whole optimizer step's loss-token count: training_step must not divide again
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, pruning: PruningConfig | dict | str | Path | None = None,
                 score_chunk_tokens: int = SCORE_CHUNK_TOKENS, **kwargs: Any):
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(train_args, "padding_free", False) or getattr(train_args, "packing", False):
            # before the parent's __init__, which tokenizes and packs the whole data set
            raise ValueError(
                "Q-Tuning triages the rows of each batch as samples, but padding_free/packing put several samples "
                "in one row; set padding_free=False and packing=False in the SFTConfig"
            )
        pruning = as_pruning_config(pruning)
        super().__init__(*args, **kwargs)
        self.qtuning_config = experiment_for(pruning, self.args, score_chunk_tokens)
        self._qt_window = _Window()  # pruning figures since the last log
        self._qt_totals = {"loss_tokens": 0.0, "samples_trained": 0.0}
        self._qt_warned: dict[str, bool] = {}  # what _qt_check_batch has said already
        # The recipe as `qtuning_<field>` entries of the model's config: every report_to integration (MLflow,
        # W&B, TensorBoard's hparams, ...) logs the model config as the run's params, so runs compare by ratio in
        # their UIs; the saved model's config.json keeps the recipe it was trained with
        config = getattr(self.model, "config", None)
        if config is not None:
            for field, value in pruning.model_dump(mode="json").items():
                setattr(config, f"qtuning_{field}", value)

    # ---- running totals travel with the checkpoints: a resumed run continues them
    def save_model(self, output_dir: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().save_model(output_dir, *args, **kwargs)
        if self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / TOTALS_FILE).write_text(json.dumps(self._qt_totals))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint and (saved := Path(checkpoint) / TOTALS_FILE).is_file():
            self._qt_totals = json.loads(saved.read_text())
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- stages 1-3, once per optimizer step, on the step's batches
    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """The step's batches, each pruned by the engine's `select_pool`, and the step's loss denominator."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        start = time.perf_counter()
        cfg = self.qtuning_config
        scorer = self.accelerator.unwrap_model(self.model)
        rank, world = self.args.process_index, self.args.world_size
        pools: list[Pruned] = []
        for j, inputs in enumerate(batches):
            self._qt_check_batch(inputs)
            i = (self.state.global_step * self.args.gradient_accumulation_steps + j) * world + rank  # global pool index
            gen = torch.Generator().manual_seed(self.args.seed * _SEED_STRIDE + i)
            with self.accelerator.autocast():
                pools.append(select_pool(scorer, batch_from_inputs(inputs, device), cfg, gen))
        denom = sum(loss_denominator(p, cfg.pruning.loss_norm) for p in pools)
        if self._qt_global_denominator():  # the whole step's count over every process, as the Trainer's own
            denom = self.accelerator.gather(denom.reshape(1).to(device)).sum()
        denom = denom.clamp(min=1.0)
        self._qt_window.add(pools, time.perf_counter() - start)
        pruned = [
            {"input_ids": p.batch.input_ids, "attention_mask": p.batch.attention_mask, "labels": p.batch.labels,
             WEIGHT_KEY: p.weight,
             PRUNED_KEY: p.pruned_tokens if p.pruned_tokens is not None else torch.zeros_like(p.weight, dtype=torch.long)}
            for p in pools
        ]
        return pruned, denom

    def _qt_check_batch(self, inputs: dict[str, Any]) -> None:
        """Say once what would otherwise pass silently: a short last batch, which triage cannot prune as a pool
        of the configured size (it keeps round(rows x sample_ratio), at least one), and a collator that masks
        every end-of-turn token because the pad token is the eos token (the model would never learn to stop)."""
        rows, pool = int(inputs["input_ids"].shape[0]), self.args.per_device_train_batch_size
        if rows < pool and not self._qt_warned.get("short"):
            self._qt_warned["short"] = True
            warnings.warn(f"Q-Tuning: a batch of {rows} row(s), fewer than per_device_train_batch_size={pool} (the data "
                          "set's last): it is triaged as a pool of its own size, so its sample ratio is not the "
                          "configured one; set dataloader_drop_last=True to leave it out", stacklevel=2)
        tok = self.processing_class
        eos, pad = getattr(tok, "eos_token_id", None), getattr(tok, "pad_token_id", None)
        if eos is None or eos != pad or self._qt_warned.get("eos"):
            return
        real_eos = (inputs["input_ids"] == eos) & inputs["attention_mask"].bool()
        labelled = inputs["labels"] != IGNORE_INDEX
        if bool(real_eos.any()) and bool(labelled.any()) and not bool((real_eos & labelled).any()):
            self._qt_warned["eos"] = True
            warnings.warn("Q-Tuning: the pad token is the eos token and the collator masked every eos from the loss "
                          "(it masks padding by token id): the model will not learn to end its turns. Use "
                          "qtuning.hf_trainer.collator(tokenizer.pad_token_id), which masks padding by position, or "
                          "give the tokenizer a pad token of its own", stacklevel=2)

    # ---- stage 4: the loss of one micro-batch over the step's denominator
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if WEIGHT_KEY not in inputs:  # evaluation, prediction: the parent's loss, nothing pruned
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._qt_parent_takes_the_loss(inputs):
            # Every row weighs 1 (Q-Tuning, random, full data): the parent's own loss, the sum of the NLL of the
            # label tokens left after pruning over `num_items_in_batch`, is this loss once it gets the step's
            # denominator; so its metrics (TRL's entropy, mean_token_accuracy, num_tokens) and its fused LM head
            # stay as they are
            denom = num_items_in_batch if num_items_in_batch is not None else loss_denominator_of(inputs, self.qtuning_config)
            plain = {k: v for k, v in inputs.items() if k not in (WEIGHT_KEY, PRUNED_KEY)}
            return super().compute_loss(model, plain, return_outputs=return_outputs, num_items_in_batch=denom)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        logits = outputs.logits  # (b, T, V)
        weight = inputs[WEIGHT_KEY].to(logits.device)
        denom = num_items_in_batch if num_items_in_batch is not None else loss_denominator_of(inputs, self.qtuning_config)
        loss = weighted_nll_sum(logits, inputs["labels"], weight) / denom
        if self._qt_global_denominator():  # DDP averages the processes' gradients: undo the 1/N
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _qt_parent_takes_the_loss(self, inputs: dict[str, Any]) -> bool:
        """Whether the parent's compute_loss computes this loss: rows all of weight 1 (InfoBatch's are not), and a
        parent that divides its token sum by `num_items_in_batch` (a model that takes loss kwargs, no label
        smoothing or custom loss function of the user's)."""
        return (bool((inputs[WEIGHT_KEY] == 1).all()) and self.label_smoother is None and self.compute_loss_func is None
                and bool(getattr(self, "model_accepts_loss_kwargs", False)))

    def _qt_global_denominator(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.accelerator.num_processes > 1

    # ---- metrics through the Trainer's own logging (report_to: mlflow, tensorboard, wandb, ...)
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._qt_window.steps:
            logs = {**logs, **self._qt_window.metrics(self.accelerator, self._qt_totals)}
            self._qt_window = _Window()
        super().log(logs, *args, **kwargs)


def weighted_nll_sum(logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """Sum over loss tokens of w_row * NLL from the (b, T, V) logits the Trainer's model returns; the caller divides
    by the step's denominator. The Trainer runs the user's model through its own (DDP-wrapped) forward, so the
    loss starts from its logits; qtuning.train's chunked head (qtuning.lm) is for the model it prepares itself."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return (nll.view_as(targets) * weight[:, None].to(nll.dtype)).sum()


class QTuningTrainer(QTuningMixin, Trainer):
    """`transformers.Trainer` with Q-Tuning's sample and token pruning on every batch (see the module doc)."""


_SFT_CLASS: type | None = None


def qtuning_sft_trainer_class() -> type:
    """`QTuningSFTTrainer(QTuningMixin, trl.SFTTrainer)`, built on first use so that trl stays optional."""
    global _SFT_CLASS
    if _SFT_CLASS is None:
        try:
            from trl import SFTTrainer
        except ImportError as e:
            raise ImportError("QTuningSFTTrainer needs TRL: pip install 'qtuning[trl]' (or pip install trl)") from e
        _SFT_CLASS = type(
            "QTuningSFTTrainer",
            (QTuningMixin, SFTTrainer),
            {"__doc__": "TRL's `SFTTrainer` with Q-Tuning's sample and token pruning on every batch.",
             "__module__": __name__},
        )
    return _SFT_CLASS


def __getattr__(name: str) -> Any:
    """`from qtuning.hf_trainer import QTuningSFTTrainer` imports trl then, not when this module loads."""
    if name == "QTuningSFTTrainer":
        return qtuning_sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- helpers
def as_pruning_config(pruning: PruningConfig | dict | str | Path | None) -> PruningConfig:
    """A PruningConfig from itself, a dict of its fields, or a YAML file of them (None: the paper's defaults);
    a bad field is a ConfigError that names it."""
    if pruning is None or isinstance(pruning, PruningConfig):
        return pruning or PruningConfig()
    if isinstance(pruning, dict):
        return validate(PruningConfig, pruning, "pruning")
    if isinstance(pruning, (str, Path)):
        return load_yaml(PruningConfig, pruning)
    raise TypeError(f"pruning: expected a PruningConfig, a dict of its fields or a YAML path, not {type(pruning).__name__}")


def experiment_for(pruning: PruningConfig, args: Any, score_chunk_tokens: int = SCORE_CHUNK_TOKENS) -> ExperimentConfig:
    """The engine's config for a Trainer's arguments: the pool is the per-device batch; checked like a YAML run."""
    pool = args.per_device_train_batch_size
    if pruning.sample == "infobatch":
        raise ValueError(
            "pruning.sample: infobatch (as published) keeps each sample's last-seen loss across the data set and "
            "anneals the last steps, which a Trainer's batches cannot tell it (they carry no sample ids); use "
            "sample: infobatch_pool (the batch's mean loss as threshold, no annealing), or `qtuning train`"
        )
    if pruning.selection_batch_size not in (None, pool):
        raise ValueError(
            f"pruning.selection_batch_size={pruning.selection_batch_size}: in a Trainer the pool is the per-device "
            f"batch ({pool}); set per_device_train_batch_size={pruning.selection_batch_size} and leave "
            "pruning.selection_batch_size unset"
        )
    try:
        return ExperimentConfig(
            name="hf-trainer",
            pruning=pruning,
            training=TrainingConfig(micro_batch_size=pool, grad_accum_steps=args.gradient_accumulation_steps,
                                    seed=args.seed, score_chunk_tokens=score_chunk_tokens),
        )
    except ValidationError as e:
        msg = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ValueError(
            f"Q-Tuning scores each batch of per_device_train_batch_size={pool} rows as one pool: {msg} "
            "(training.micro_batch_size is per_device_train_batch_size here)"
        ) from None


def batch_from_inputs(inputs: dict[str, Any], device: torch.device) -> Batch:
    """A collated Trainer batch as the engine's right-padded `Batch`; what cannot be triaged row by row is refused."""
    missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in inputs]
    if missing:
        raise ValueError(
            f"Q-Tuning needs padded batches with input_ids, attention_mask and labels; the collator gave "
            f"{sorted(inputs)} (missing {missing}); padding-free collators are not supported"
        )
    mask = inputs["attention_mask"].to(device)
    if bool((mask[:, 1:] > mask[:, :-1]).any()):  # a host sync, once per pool
        raise ValueError("Q-Tuning needs right-padded batches; set tokenizer.padding_side = 'right'")
    return Batch(inputs["input_ids"].to(device), mask, inputs["labels"].to(device))


def loss_denominator_of(inputs: dict[str, Any], cfg: ExperimentConfig) -> torch.Tensor:
    """One micro-batch's own denominator (compute_loss called without the step's, e.g. by a subclass)."""
    b = Batch(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    weight, cut = inputs[WEIGHT_KEY], inputs.get(PRUNED_KEY)
    pruned = Pruned(b, weight, None, 0, 0, torch.zeros(()), pruned_tokens=cut)
    return loss_denominator(pruned, cfg.pruning.loss_norm).clamp(min=1.0)


def collator(pad_token_id: int) -> Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A Trainer data collator for qtuning's tokenized rows (`SFTData.dataset`: input_ids, labels): right padding,
    padding masked by position (qtuning.data.collate), so pad = eos keeps its label on real tokens."""

    def collate_rows(features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = collate([f["input_ids"] for f in features], [f["labels"] for f in features], pad_token_id)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    return collate_rows


class _Window:
    """Pruning figures of the optimizer steps since the last log; host numbers but the on-device loss-token count."""

    def __init__(self) -> None:
        self.steps = 0
        self.host = torch.zeros(9, dtype=torch.float64)  # seen, kept, response, real, q1..q4, filled
        self.loss_tokens: torch.Tensor | float = 0.0
        self.alphas: list[float] = []
        self.score_seconds = 0.0

    def add(self, pools: list[Pruned], seconds: float) -> None:
        self.steps += 1
        self.score_seconds += seconds
        for p in pools:
            self.host += torch.tensor(
                [p.sel.keep.numel(), int(p.sel.keep.sum()), p.response_tokens, p.real_tokens,
                 *[int((p.sel.quadrant == q).sum()) for q in (1, 2, 3, 4)], p.sel.filled],
                dtype=torch.float64,
            )
            self.loss_tokens = self.loss_tokens + p.loss_tokens  # stays on the device until the log
            if p.sel.alpha == p.sel.alpha:  # not NaN: the rule searched alpha
                self.alphas.append(p.sel.alpha)

    def metrics(self, accelerator, totals: dict[str, float]) -> dict[str, float]:
        """The window's metrics summed over processes (one reduction per log, called by every process)."""
        local = torch.cat([self.host, torch.as_tensor(self.loss_tokens, dtype=torch.float64).reshape(1).cpu()])
        if accelerator.num_processes > 1:
            local = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
        seen, kept, resp, real, q1, q2, q3, q4, filled, loss_tok = local.tolist()
        totals["loss_tokens"] += loss_tok
        totals["samples_trained"] += kept
        n = self.steps
        out = {
            "prune/kept_samples": kept / max(seen, 1),
            "prune/kept_tokens": loss_tok / max(resp, 1),
            "prune/q1": q1 / n, "prune/q2": q2 / n, "prune/q3": q3 / n, "prune/q4": q4 / n,
            "prune/filled": filled / n,
            "train/loss_tokens": totals["loss_tokens"],
            "train/samples_trained": totals["samples_trained"],
            "time/score_seconds": self.score_seconds / n,
        }
        if self.alphas:
            out["prune/alpha"] = sum(self.alphas) / len(self.alphas)
        return out
