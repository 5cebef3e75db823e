"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random llama built on it.

They need the embedded assets (`qtuning assets`); without them the tests fail with the message that says
how to fetch them, rather than skip, so a CI that forgot the set-up step cannot pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from qtuning.assets import AssetsMissing
from qtuning.config import ModelConfig
from qtuning.modeling import load_model, load_tokenizer, tiny_model_config


@pytest.fixture(scope="session")
def tiny_model_cfg() -> ModelConfig:
    """2 layers x 64 wide, random weights, the real 49,152-token vocabulary and tokenizer."""
    return tiny_model_config()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_cfg: ModelConfig) -> Any:
    """The bundled SmolLM2 tokenizer (pad = eos = <|im_end|>). Shared: do not modify it in a test."""
    try:
        return load_tokenizer(tiny_model_cfg)
    except AssetsMissing as e:
        missing = str(e)
    pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback around the message


@pytest.fixture
def tiny_model(tiny_model_cfg: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    """A fresh tiny llama seeded with 0 for each test (~0.1 s), so tests that train it cannot leak into others."""
    torch.manual_seed(0)
    return load_model(tiny_model_cfg)


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """write_jsonl(rows, name="train.jsonl") -> path; a str row is written verbatim (for broken lines)."""

    def write(rows: Iterable[dict[str, Any] | str], name: str = "train.jsonl") -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write
