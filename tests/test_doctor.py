"""`qtuning doctor` on this CPU: every CPU check passes, every GPU check says it needs CUDA, one failure is reported
as such without stopping the others."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from qtuning import doctor

GPU_ONLY = [name for name, needs_cuda, _ in doctor.CHECKS if needs_cuda]
CPU_CHECKS = [name for name, needs_cuda, _ in doctor.CHECKS if not needs_cuda and "flash" not in name]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, tokenizer):
    """One `qtuning doctor --device cpu --json ...` run (about 20 s on 2 cores): exit code, printed text, JSON."""
    path = tmp_path_factory.mktemp("doctor") / "doctor.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = doctor.main(["--device", "cpu", "--json", str(path)])
    return code, out.getvalue(), json.loads(path.read_text())


def test_every_cpu_check_passes_and_every_gpu_check_says_it_needs_cuda(cpu_run):
    code, text, report = cpu_run
    results = {c["name"]: c for c in report["checks"]}
    assert list(results) == [name for name, _, _ in doctor.CHECKS]
    assert code == 0, text
    for name in CPU_CHECKS:
        assert results[name]["status"] == "pass", results[name]
    for name in GPU_ONLY:
        assert results[name]["status"] == "skip" and "CUDA" in results[name]["figure"], results[name]
    flash = results["packed = alone (flash_attention_2)"]
    assert flash["status"] == "skip" and "CUDA" in flash["figure"]
    assert report["summary"] == {"pass": len(CPU_CHECKS), "fail": 0, "skip": len(GPU_ONLY) + 1}


def test_the_table_names_each_check_and_the_json_the_machine(cpu_run):
    _, text, report = cpu_run
    table = text[text.index("\ncheck ") :]
    for name, _, _ in doctor.CHECKS:
        assert name in table
    assert text.strip().splitlines()[-1] == f"{len(CPU_CHECKS)} passed, 0 failed, {len(GPU_ONLY) + 1} skipped"
    machine = report["machine"]
    for key in ("torch", "transformers", "accelerate", "device_name", "cuda_capability", "flash-attn"):
        assert key in machine
    assert machine["device"] == "cpu" and machine["torch"] and machine["transformers"] and machine["accelerate"]


def test_a_check_that_raises_fails_alone_and_the_run_exits_1(monkeypatch, tmp_path, capsys):
    def broken(env):
        raise RuntimeError("kernel exploded\nsecond line of the message")

    ran = []
    monkeypatch.setattr(doctor, "CHECKS", [
        ("broken", False, broken),
        ("after it", False, lambda env: ran.append(1) or doctor.verdict(True, "fine")),
        ("on the GPU", True, lambda env: doctor.verdict(True, "never run here")),
    ])
    code = doctor.main(["--device", "cpu", "--json", str(tmp_path / "d.json")])
    assert code == 1 and ran == [1]
    results = {c["name"]: c for c in json.loads((tmp_path / "d.json").read_text())["checks"]}
    assert results["broken"]["status"] == "fail"
    assert results["broken"]["figure"] == "RuntimeError: kernel exploded"
    assert results["broken"]["detail"] == "second line of the message"
    assert results["after it"]["status"] == "pass" and results["on the GPU"]["status"] == "skip"
    out = capsys.readouterr().out
    assert "Traceback" not in out and out.strip().splitlines()[-1] == "1 passed, 1 failed, 1 skipped"


def test_device_cuda_without_a_gpu_is_refused_with_the_fix(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert doctor.main(["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err
