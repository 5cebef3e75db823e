"""What lm-eval's output means for qtuning: each task's headline score, the merged record, one row per scored item."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qtuning.config import BUNDLED_TASKS
from qtuning.evaluation import TASK_PREFIX


@dataclass(frozen=True)
class Headline:
    """The one number a task contributes to the average: lm-eval reports it as `"{metric},{filter}"`."""

    metric: str
    filter: str = "none"

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"


# The headline metric of each bundled task, in one place. Every one is a
# fraction in [0, 1], reported ×100.
HEADLINES: dict[str, Headline] = {
    "qt_arc_easy": Headline("acc"),  # 0-shot, per-choice log-likelihood (acc_norm also logged)
    "qt_arc_challenge": Headline("acc"),
    "qt_gsm8k": Headline("exact_match", "last_number"),  # last number of the CoT == gold number
    "qt_squad": Headline("exact_match"),  # SQuAD-normalised EM against any gold answer (f1 also logged)
    "qt_triviaqa": Headline("contains"),  # some normalised alias inside the prediction (EM also logged)
}
assert set(HEADLINES) == set(BUNDLED_TASKS)

# For tasks the table does not know (any lm-eval task or YAML a user adds):
# the first of these metrics that the task reports is its headline, ×100.
FRACTION_METRICS = ("acc", "exact_match", "contains", "em", "f1", "acc_norm", "mc2", "mc1", "pass@1")

# The entries of simple_evaluate's output that hold one value per task (merged
# across the per-task runs), and the run-wide ones kept from the first run.
PER_TASK_KEYS = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
RUN_KEYS = ("config", "git_hash", "date", "pretty_env_info", "transformers_version", "lm_eval_version")


def short_name(task: str) -> str:
    """The name scores and samples use: `qt_gsm8k` -> `gsm8k`; other tasks as lm-eval names them."""
    return task[len(TASK_PREFIX) :] if task.startswith(TASK_PREFIX) else task


def headline(task: str, metrics: dict[str, Any]) -> tuple[str, float]:
    """The headline `(metric key, score)` of one task's lm-eval results, in percent when a fraction.

    Bundled tasks use the `HEADLINES` table; other tasks the first metric of
    `FRACTION_METRICS` they report (any filter), else their first numeric
    metric, unscaled (e.g. a perplexity).
    """
    if task in HEADLINES:
        key = HEADLINES[task].key
        return key, 100.0 * float(metrics[key])
    numeric = {
        k: float(v)
        for k, v in metrics.items()
        if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for name in FRACTION_METRICS:
        for key, value in numeric.items():
            if key.split(",", 1)[0] == name:
                return key, 100.0 * value
    if not numeric:
        raise KeyError(f"task {task!r} reported no numeric metric: {sorted(metrics)}")
    key = next(iter(numeric))
    return key, numeric[key]


def headline_stderrs(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's standard error of each task's headline score, in the score's units (points for fractions), by
    short name. From a results JSON's `results` section: the headline `"{metric},{filter}"` has its error at
    `"{metric}_stderr,{filter}"`; a task that reports none (or 'N/A') is left out."""
    out: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        try:
            key, _ = headline(task, metrics)
        except KeyError:
            continue
        metric, _, filt = key.partition(",")
        value = metrics.get(f"{metric}_stderr,{filt}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            fraction = task in HEADLINES or metric in FRACTION_METRICS
            out[short_name(task)] = float(value) * (100.0 if fraction else 1.0)
    return out


def pick_result_name(spec: str, results: dict[str, Any], groups: dict[str, Any]) -> str:
    """Which entry of lm-eval's results stands for the requested task spec (name, group or YAML path)."""
    if spec in results:
        return spec
    if groups:
        return next(iter(groups))
    return next(iter(results))


def task_headline(spec: str, out: dict[str, Any]) -> tuple[str, str, float]:
    """`(task name, metric key, score)` of the task a `simple_evaluate` run over `[spec]` reported."""
    groups = out.get("groups") or {}
    name = pick_result_name(spec, out["results"], groups)
    key, score = headline(name, {**out["results"].get(name, {}), **groups.get(name, {})})
    return name, key, score


def merge_output(merged: dict[str, Any], out: dict[str, Any]) -> None:
    """Fold one `simple_evaluate` output into `merged`: per-task entries side by side, run-wide ones from the first."""
    for k in PER_TASK_KEYS:
        merged.setdefault(k, {}).update(out.get(k) or {})
    for k in RUN_KEYS:
        if k in out and k not in merged:
            merged[k] = out[k]


def _as_float(x: Any) -> float:
    return float(x[0]) if isinstance(x, (list, tuple)) else float(x)


def sample_rows(task: str, samples: list[dict[str, Any]], config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Flatten lm-eval's logged samples to one row per item, for the headline filter only.

    Each row: task (short name), doc_id, prompt, prediction, target, correct
    (the headline metric of the item), plus the raw `generation` for
    generative tasks.
    """
    head = HEADLINES.get(task)
    filters = {s["filter"] for s in samples}
    filt = head.filter if head and head.filter in filters else sorted(filters)[0] if filters else "none"
    for s in samples:
        if s["filter"] != filt:
            continue
        metric = head.metric if head else (s.get("metrics") or [None])[0]
        args = s["arguments"]
        row: dict[str, Any] = {"task": short_name(task), "doc_id": s["doc_id"], "prompt": args[0][0]}
        output_type = config.get("output_type")
        if output_type == "multiple_choice":  # prediction: the choice of highest log-likelihood
            choices = [a[1].strip() for a in args]
            lls = [_as_float(r) for r in s["filtered_resps"]]
            pred = max(range(len(lls)), key=lls.__getitem__)
            target = s["target"]
            row["prediction"] = choices[pred]
            row["target"] = choices[target] if isinstance(target, int) and 0 <= target < len(choices) else target
        elif output_type == "generate_until":
            raw = s["resps"][0][0] if s["resps"] and s["resps"][0] else ""
            filtered = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            row["prediction"] = filtered
            row["generation"] = raw
            row["target"] = s["target"]
        else:  # loglikelihood(_rolling): the scores themselves
            row["prediction"] = s["filtered_resps"]
            row["target"] = s["target"]
        row["correct"] = s.get(metric) if metric else None
        yield row
