"""TRL's SFTTrainer with Q-Tuning: the same script you already have, one class swapped, one argument added.

    pip install 'qtuning[trl]'
    python examples/trl_sft_qtuning.py                              # bundled SmolLM2-135M-Instruct, a chat data set
    python examples/trl_sft_qtuning.py --tiny --max-steps 2         # a 2-layer random model: a smoke test in seconds
    python examples/trl_sft_qtuning.py --data my_chats.jsonl --report-to mlflow
    python examples/trl_sft_qtuning.py --qtuning-data --data examples/data/alpaca.jsonl   # any qtuning format

Each batch of per_device_train_batch_size rows is one pool: scored by the model as it is (no-grad forward),
triaged on the Error-Uncertainty plane (keep misconception Q2 and calibration Q4 rows), and the least useful
tokens of Q2 rows leave the loss. Then the usual forward/backward on the kept rows. prune/kept_samples,
prune/kept_tokens and the quadrant counts join TRL's log line and go wherever report_to sends them.

batch 8 x sample_ratio 0.25 = 2 kept rows per step, each Q2 row keeping half its response tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import torch
from trl import SFTConfig

from qtuning.config import DataConfig, ModelConfig, PruningConfig
from qtuning.data import build_sft_dataset
from qtuning.hf_trainer import QTuningSFTTrainer
from qtuning.modeling import load_model, load_tokenizer, tiny_model_config

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(HERE / "data" / "messages.jsonl"), help="a JSONL with a 'messages' column")
    ap.add_argument("--model", default=None, help="a local model folder or hub id (default: the bundled SmolLM2)")
    ap.add_argument("--tiny", action="store_true", help="2-layer random model with the real tokenizer (smoke test)")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--output-dir", default="runs/trl-sft-qtuning")
    ap.add_argument("--report-to", default="none", help="none, mlflow, tensorboard, wandb, ...")
    ap.add_argument("--qtuning-data", action="store_true",
                    help="read --data with qtuning.data: any format (alpaca, sharegpt, prompt/completion, messages, "
                    "text), loss on the assistant tokens only, whatever the chat template (TRL uses its labels as is)")
    args = ap.parse_args()

    model_cfg = tiny_model_config() if args.tiny else ModelConfig(**({"name": args.model} if args.model else {}))
    torch.manual_seed(0)
    model, tokenizer = load_model(model_cfg), load_tokenizer(model_cfg)  # or AutoModelForCausalLM/AutoTokenizer
    if args.qtuning_data:  # tokenized here: input_ids and labels (-100 off the assistant's tokens)
        train = build_sft_dataset(DataConfig(source=args.data, max_length=512), tokenizer).dataset
    else:  # TRL tokenizes the messages itself (every token trains unless the template supports assistant_only_loss)
        train = datasets.load_dataset("json", data_files=args.data, split="train")

    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=8,  # the pool Q-Tuning triages (the paper: 8)
        gradient_accumulation_steps=1,
        max_steps=args.max_steps,
        learning_rate=2e-5 if not args.tiny else 1e-3,
        max_length=512,
        logging_steps=1,
        report_to=args.report_to,
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = QTuningSFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        pruning=PruningConfig(sample="qtuning", token="qtuning", sample_ratio=0.25, token_ratio=0.5),
    )
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
