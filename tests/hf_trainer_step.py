"""One QTuningTrainer step, run by tests/test_hf_trainer.py in one process or under `accelerate launch`.

    python tests/hf_trainer_step.py OUT GRAD_ACCUM AVERAGE_TOKENS...   # for each AVERAGE_TOKENS (1 or 0), from the
        same seeded model: OUT/weights-<AVERAGE_TOKENS>.safetensors (rank 0) and OUT/pools-<AVERAGE_TOKENS>-<rank>.json

Plain SGD, so a step moves each weight by lr x its gradient and the saved weights compare gradients.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from qtuning.config import DataConfig, PruningConfig
from qtuning.data import build_sft_dataset
from qtuning.hf_trainer import QTuningTrainer, collator
from qtuning.modeling import load_model, load_tokenizer, tiny_model_config


class Recording(QTuningTrainer):
    """Records which rows each process triaged together (a digest per pool)."""

    pools: list[str] = []

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        self.pools += [hashlib.sha256(str(sorted(b["input_ids"].tolist())).encode()).hexdigest() for b in batches]
        return super().get_batch_samples(iter(batches), len(batches), device)


def main(out: Path, grad_accum: int, variants: list[bool]) -> None:
    cfg = tiny_model_config()
    tok = load_tokenizer(cfg)
    rows = build_sft_dataset(DataConfig(source="arc", limit=16, max_length=160), tok, progress=False).dataset
    for average_tokens in variants:  # one launch, every variant: the processes start (and import) once
        step(out, cfg, tok, rows, grad_accum, average_tokens)
    if torch.distributed.is_initialized():  # the Trainer leaves its group open; a gloo rank that exits with it open
        torch.distributed.destroy_process_group()  # aborted once ("terminate called without an active exception")


def step(out: Path, cfg, tok, rows, grad_accum: int, average_tokens: bool) -> None:
    torch.manual_seed(0)
    model = load_model(cfg)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=grad_accum, max_steps=1,
        learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, seed=3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        average_tokens_across_devices=average_tokens,
    )
    trainer = Recording(model=model, args=args, train_dataset=rows, data_collator=collator(tok.pad_token_id),
                        pruning=PruningConfig(sample="qtuning", token="qtuning", sample_ratio=0.25, token_ratio=0.5))
    trainer.pools = []  # this step's own
    trainer.train()
    rank = trainer.args.process_index
    (out / f"pools-{int(average_tokens)}-{rank}.json").write_text(json.dumps(trainer.pools))
    if rank == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  str(out / f"weights-{int(average_tokens)}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), [v == "1" for v in sys.argv[3:]])
