"""Seeded runs on the tiny model keep the decisions and step metrics recorded in tests/data/reference_run.json.

The reference was recorded before the house refactor (issue 7) with the same configs: which rows each pool kept,
their quadrants, per-row loss weights and loss-token counts, and every step's metrics but wall-clock figures.
A change that moves any pruning decision, or the loss by more than float noise, fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import qtuning.train as T
from qtuning.config import ExperimentConfig

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_run.json").read_text())


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_seeded_run_matches_the_recorded_reference(tmp_path, monkeypatch, name):
    ref = REFERENCE[name]
    raw = json.loads(json.dumps(ref["config"]))
    raw["training"]["output_dir"] = str(tmp_path / name)
    cfg = ExperimentConfig.model_validate(raw)

    pools = []
    select = T.select_pool

    def spy(*args, **kwargs):
        p = select(*args, **kwargs)
        pools.append({"keep": p.sel.keep.int().tolist(), "quadrant": p.sel.quadrant.tolist(),
                      "loss_tokens": int(p.loss_tokens), "weight": [round(float(w), 6) for w in p.weight]})
        return p

    monkeypatch.setattr(T, "select_pool", spy)
    T.train(cfg, progress=False, save=False)

    assert pools == ref["pools"]
    got = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(ref["metrics"])
    for g, w in zip(got, ref["metrics"]):
        for key, want in w.items():
            assert key in g, key
            if key == "train/loss":
                assert g[key] == pytest.approx(want, rel=1e-4), (g["step"], key)
            else:
                assert g[key] == pytest.approx(want, rel=1e-9, abs=1e-12), (g["step"], key)
