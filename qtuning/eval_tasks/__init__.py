"""Hooks that qtuning's generated lm-eval task YAMLs call (`!function qtuning.eval_tasks.metrics.*`).

Kept apart from `qtuning.evaluate` so lm-eval can import them by dotted name
without pulling in anything heavy: pure Python, no torch, no lm-eval.
"""
