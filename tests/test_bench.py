"""The benchmark script runs end to end and reports every figure issue 8 names (its values are not asserted:
speed is measured by running it, not by timed tests)."""

import json
import subprocess
import sys

FIGURES = (
    "cost_ratio_qtuning", "cost_ratio_qtuning_pool", "cost_ratio_random", "padding_share_full", "padding_share_qtuning",
    "real_tokens_per_second_full", "scoring_peak_mem_ratio", "train_peak_mem_ratio", "row_linearity", "device",
)


def test_the_quick_bench_reports_every_figure_from_its_fastest_rounds(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "qtuning.bench", "--quick", "--rows", "32", "--max-length", "128", "--repeats", "2", "--json", str(out)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert set(FIGURES) <= set(report), set(FIGURES) - set(report)
    assert report["repeats"] == 2
    for arm, e in report["epochs"].items():
        assert len(e["loop_seconds_rounds"]) == 2 and e["loop_seconds"] == min(e["loop_seconds_rounds"]), arm
    full = report["epochs"]["full"]["loop_seconds"]
    assert report["cost_ratio_qtuning_pool"] == report["epochs"]["qtuning_pool"]["loop_seconds"] / full
    # the pool arm trains a quarter of the full arm's rows in full micro-batches: a quarter of its steps
    assert report["epochs"]["qtuning_pool"]["optimizer_steps"] * 4 == report["epochs"]["full"]["optimizer_steps"]
    assert 0 <= report["padding_share_full"] < 1
