"""House rules that can break silently: the core runs without Prefect or MLflow; mlflow/ is not a package."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import qtuning

REPO = Path(__file__).resolve().parents[1]


def test_qtuning_imports_neither_prefect_nor_mlflow():
    modules = [f"qtuning.{m.name}" for m in pkgutil.iter_modules(qtuning.__path__)]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_mlflow_folder_does_not_shadow_the_package():
    assert not (REPO / "mlflow" / "__init__.py").exists()
    import mlflow

    assert "site-packages" in mlflow.__file__
