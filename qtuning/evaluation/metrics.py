"""Answer normalisation and scoring for the generative benchmarks (GSM8K, SQuAD, TriviaQA).

These are the functions the task YAMLs in `tasks/` name with
`!function qtuning.evaluation.metrics.<fn>`; lm-eval 0.4.13 resolves a dotted
name by ordinary import when no file of that name sits next to the YAML, so
one copy of the logic serves lm-eval and the unit tests. Pure Python: no
torch, no lm-eval, nothing heavy to import.

The rules follow the paper's protocol (OpenCompass):
- GSM8K: the last number in the generated chain of thought equals the gold
  number (commas, `$` and a trailing period ignored; compared as numbers so
  "18.00" matches "18").
- SQuAD: exact match after the official SQuAD normalisation (lower case, no
  punctuation, no articles, single spaces) against any of the gold answers.
- TriviaQA: "answer contained": some normalised gold alias occurs in the
  normalised prediction as whole words ("paris" is in "it is paris france",
  "us" is not in "bus").
"""

# Not lm-eval's `regex` filter + `exact_match`: they can take the last number (group_select: -1) and drop commas
# (regexes_to_ignore), but compare strings, so "18.00" misses "18"; lm-eval's SQuAD scoring loads HF evaluate's
# metric from the hub (offline here), and it has no whole-word answer-contained metric. Hence these, unit-tested.
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

# A number as written in a worked solution: optional sign, digits with optional
# thousands commas, optional decimals ("-1,234.50", "18", ".5" is not matched).
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


# --------------------------------------------------------------------------- GSM8K
def last_number(text: str) -> str | None:
    """The last number in `text`, commas stripped ("1,000" -> "1000"), or None.

    The chain-of-thought prompt ends each worked answer with "So the answer is
    N.", and generation stops at the next blank line, so the last number the
    model wrote is its answer; taking the last rather than the one after "the
    answer is" also credits a model that states the result in other words.
    """
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def numbers_equal(pred: str | None, gold: str) -> bool:
    """True when two number strings denote the same value ("18.0" == "18", "1,000" == "1000")."""
    if pred is None:
        return False
    try:
        return Decimal(pred.replace(",", "").replace("$", "")) == Decimal(gold.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return False


def last_number_filter(resps: Iterable[Sequence[str]], docs: Iterable[dict[str, Any]]) -> list[list[str]]:
    """lm-eval `custom` filter: replace each generation by its last number ("" when it has none).

    Running the extraction as a filter (not inside `process_results`) makes the
    extracted answer visible as `filtered_resps` in the logged samples.
    """
    return [[last_number(r) or "" for r in doc_resps] for doc_resps in resps]


def gsm8k_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Per-sample score for `qt_gsm8k`: 1.0 when the extracted number equals `doc["short_answer"]`."""
    pred = results[0] if results else ""
    return {"exact_match": float(numbers_equal(pred or None, str(doc["short_answer"])))}


# --------------------------------------------------------------------------- SQuAD
def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, drop punctuation and articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _first_line(text: str) -> str:
    # Generation stops at a newline already; this guards user-changed stop sequences.
    return text.strip().split("\n", 1)[0].strip()


def squad_exact_match(prediction: str, golds: Iterable[str]) -> bool:
    """True when the normalised prediction equals some normalised gold answer."""
    pred = normalize_answer(_first_line(prediction))
    return any(pred == normalize_answer(g) for g in golds)


def squad_f1(prediction: str, golds: Iterable[str]) -> float:
    """Best token-overlap F1 against the gold answers (reported beside EM, as SQuAD does)."""
    pred_toks = normalize_answer(_first_line(prediction)).split()
    best = 0.0
    for gold in golds:
        gold_toks = normalize_answer(gold).split()
        if not pred_toks or not gold_toks:
            best = max(best, float(pred_toks == gold_toks))
            continue
        common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_toks), common / len(gold_toks)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def squad_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Per-sample scores for `qt_squad`: exact match (headline) and F1 against `doc["answers"]`."""
    pred = results[0] if results else ""
    golds = doc["answers"]
    return {"exact_match": float(squad_exact_match(pred, golds)), "f1": squad_f1(pred, golds)}


# --------------------------------------------------------------------------- TriviaQA
def answer_contained(prediction: str, aliases: Iterable[str]) -> bool:
    """True when some normalised alias occurs in the normalised prediction as whole words.

    Matching on word boundaries (space-padded strings) keeps short aliases
    from matching inside longer words; empty aliases never match.
    """
    pred = f" {normalize_answer(_first_line(prediction))} "
    return any(f" {a} " in pred for a in map(normalize_answer, aliases) if a)


def triviaqa_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Per-sample scores for `qt_triviaqa`: answer contained (headline) and exact match, over all aliases."""
    pred = results[0] if results else ""
    aliases = list(doc["answer"]["aliases"]) + list(doc["answer"].get("normalized_aliases", []))
    return {
        "contains": float(answer_contained(pred, aliases)),
        "exact_match": float(squad_exact_match(pred, aliases)),
    }
