"""House rules read from the source: dependencies point one way (commands -> flows -> tasks -> qtuning), the
library has no import circle, no private names of Prefect, MLflow or any other library are used (wherever the object
came from), the public API we call exists, and mlflow/ is not a package.

These read every module's syntax tree instead of importing it, so an import hidden inside a function (which a
`sys.modules` check after import would miss) is found too. Imports under `if TYPE_CHECKING:` are annotations
only and do not count.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("commands", "flows", "tasks", "qtuning")  # each may import only the layers after it
PIPELINE_LIBRARIES = ("prefect", "mlflow")


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement, at any depth, but those under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, node.lineno
            for alias in node.names:  # `from qtuning import data` imports the module qtuning.data
                yield f"{name}.{alias.name}", node.lineno
        stack.extend(ast.iter_child_nodes(node))


def _graph(package: str) -> dict[str, list[tuple[str, int]]]:
    mods = _modules(package)
    return {
        m: list(_imports(ast.parse(p.read_text(), str(p)), m, p.name == "__init__.py"))
        for m, p in mods.items()
    }


def test_dependencies_point_one_way():
    bad = []
    for i, layer in enumerate(LAYERS):
        upper = set(LAYERS[:i])
        forbidden = upper | (set(PIPELINE_LIBRARIES) if layer == "qtuning" else set())
        for module, imports in _graph(layer).items():
            for name, line in imports:
                if name.split(".")[0] in forbidden:
                    bad.append(f"{_modules(layer)[module].relative_to(REPO)}:{line} imports {name}")
    assert not bad, "imports against the layering (commands -> flows -> tasks -> qtuning):\n" + "\n".join(sorted(set(bad)))


def test_qtuning_has_no_import_circle():
    graph = _graph("qtuning")
    edges = {m: sorted({n for n, _ in imps if n in graph and n != m}) for m, imps in graph.items()}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in edges[m]:
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ importing nothing is not an edge; a submodule importing its own package is fine
    cycles = [c for c in cycles if c.count(" -> ") > 0 and not c.startswith("qtuning -> ")]
    assert not cycles, "import circles among qtuning modules:\n" + "\n".join(cycles)


def test_qtuning_sets_no_pipeline_environment():
    """The library names no PREFECT_* or MLFLOW_* variable (to read or set it): that is the pipeline's business."""
    hits = []
    for path in _modules("qtuning").values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"(PREFECT|MLFLOW)_[A-Z0-9_]+", node.value):
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value}")
    assert not hits, "\n".join(hits)


def test_no_private_names_of_prefect_or_mlflow():
    """Attribute access with a leading underscore on anything reached from prefect or mlflow breaks on their next
    release; so does importing a private module of theirs."""
    hits = []
    for layer in ("commands", "flows", "tasks"):
        for path in _modules(layer).values():
            tree = ast.parse(path.read_text())
            from_libs = set()  # names bound to prefect/mlflow objects by an import
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = node.module if isinstance(node, ast.ImportFrom) else None
                    for alias in node.names:
                        full = f"{mod}.{alias.name}" if mod else alias.name
                        if full.split(".")[0] in PIPELINE_LIBRARIES:
                            if any(p.startswith("_") for p in full.split(".")):
                                hits.append(f"{path.relative_to(REPO)}:{node.lineno}: imports {full}")
                            from_libs.add((alias.asname or alias.name).split(".")[0])
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    root = node.value
                    while isinstance(root, (ast.Attribute, ast.Call)):
                        root = root.value if isinstance(root, ast.Attribute) else root.func
                    if isinstance(root, ast.Name) and root.id in from_libs:
                        hits.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr} on {root.id}")
    assert not hits, "private names of prefect/mlflow in use:\n" + "\n".join(hits)


# Private names of other libraries that have no public equivalent, each with the reason it is still used.
PRIVATE_ALLOWED = {
    ("qtuning/data.py", "_fingerprint"): "datasets exposes no public fingerprint of a hub data set (its cache key)",
    ("qtuning/lm.py", "_attn_implementation"): "transformers keeps a model's attention implementation on its config "
    "only (its own layers and docs read `config._attn_implementation`); packed rows are isolated per implementation",
}


# Standard-library functions whose documented name starts with an underscore.
DOCUMENTED_UNDERSCORE = {("os", "_exit")}


def _repo_private_names() -> set[str]:
    """Every underscore name this repository defines (functions, classes, attributes, module variables, aliases,
    argparse options):
    accessing one of these is this repository's business."""
    names = set()
    for layer in LAYERS:
        for path in _modules(layer).values():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        for t in ast.walk(target):
                            if isinstance(t, ast.Name):
                                names.add(t.id)
                            elif isinstance(t, ast.Attribute):
                                names.add(t.attr)
                elif isinstance(node, ast.alias) and node.asname:
                    names.add(node.asname)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"--_[\w-]+", node.value):
                    names.add(node.value[2:].replace("-", "_"))  # an argparse option of ours: args._name
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _private_name_hits(source: str, rel: str, ours: set[str]) -> list[str]:
    """The scan: every `x._name` of `source` (module `rel`) that is neither self/cls's, nor one of `ours`, nor
    documented or allowed, and every import of a private module of another library."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                full = f"{mod}.{alias.name}" if mod else alias.name
                if full.split(".")[0] not in (*LAYERS, "__future__") and any(
                        p.startswith("_") and not p.startswith("__") for p in full.split(".")):
                    hits.append(f"{rel}:{node.lineno}: imports {full}")
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        root = node.value
        while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
            root = root.func if isinstance(root, ast.Call) else root.value
        if (isinstance(root, ast.Name) and root.id in ("self", "cls")) or node.attr in ours:
            continue
        if isinstance(root, ast.Name) and (root.id, node.attr) in DOCUMENTED_UNDERSCORE:
            continue
        if (rel, node.attr) not in PRIVATE_ALLOWED:
            hits.append(f"{rel}:{node.lineno}: .{node.attr}")
    return hits


def test_no_private_names_of_any_library():
    """No `x._name` in commands/, flows/, tasks/ or qtuning/ unless x is self/cls or `_name` is defined in this
    repository: wherever the object came from (an import, a call's result, a parameter), a private name of
    prefect, mlflow, accelerate, transformers, lm_eval or any other library breaks on its next release. No
    import of a private module either."""
    ours = _repo_private_names()
    hits = []
    for layer in LAYERS:
        for path in _modules(layer).values():
            hits += _private_name_hits(path.read_text(), path.relative_to(REPO).as_posix(), ours)
    assert not hits, "private names of other libraries in use (use their public API):\n" + "\n".join(hits)


def test_the_scan_catches_what_it_is_for_and_lets_through_what_is_ours():
    """The scan itself, on code written the ways a private name slips in: on a call's result (the case the
    import-based check missed: `ds = mlflow.data.from_pandas(...); ds._to_mlflow_entity()`), on a chained
    attribute, through an import of a private module; and what it must let through (self's, ours, documented)."""
    ours = _repo_private_names()
    code = "\n".join([
        "import mlflow.data",
        "from transformers.utils import _internal",
        "ds = mlflow.data.from_pandas(df)",
        "entity = ds._to_mlflow_entity()",
        "n = mlflow.data.from_pandas(df).schema._columns",
        "self._mine = 1",
        "os._exit(0)",
        f"x.{sorted(ours)[0]}",
    ])
    assert sorted(_private_name_hits(code, "qtuning/x.py", ours)) == [
        "qtuning/x.py:2: imports transformers.utils._internal", "qtuning/x.py:4: ._to_mlflow_entity",
        "qtuning/x.py:5: ._columns"]
    assert "_to_mlflow_entity" not in ours and "_columns" not in ours


# The public API the pipeline and the library call, by module: each name must exist and be public (listed in the
# module's __all__ where it has one), so an upgrade that moves or hides one fails here, not in a flow run.
PUBLIC_API = {
    "mlflow": ["MlflowClient", "start_run", "end_run", "set_tracking_uri", "register_model"],
    "mlflow.data": ["from_pandas"],
    "mlflow.entities": ["Dataset", "DatasetInput", "InputTag", "Metric", "Param", "RunTag", "ViewType"],
    "mlflow.transformers": ["log_model"],
    "prefect": ["get_client", "tags"],
    "prefect.states": ["Crashed"],
    "prefect.client.schemas.filters": ["FlowRunFilter", "FlowRunFilterId", "FlowRunFilterState", "FlowRunFilterStateType",
                                       "FlowRunFilterTags", "TaskRunFilter", "TaskRunFilterState", "TaskRunFilterStateType"],
    "prefect.client.schemas.objects": ["StateType"],
    "prefect.artifacts": ["create_link_artifact", "create_markdown_artifact", "create_progress_artifact",
                          "create_table_artifact", "update_progress_artifact"],
    "accelerate": ["Accelerator"],
    "accelerate.utils": ["set_seed", "is_tensorboard_available", "is_wandb_available"],
}
PUBLIC_METHODS = {
    ("mlflow", "MlflowClient"): ["create_run", "set_terminated", "update_run", "log_batch", "log_artifact", "log_artifacts",
                                 "log_text", "log_dict", "log_table", "log_inputs", "get_run", "get_metric_history",
                                 "search_runs", "get_experiment_by_name", "create_experiment", "get_model_version"],
    ("accelerate", "Accelerator"): ["init_trackers", "log", "end_training", "autocast", "reduce", "wait_for_everyone"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC_API))
def test_the_public_api_we_call_exists(module):
    import importlib

    mod = importlib.import_module(module)
    public = getattr(mod, "__all__", None)
    for name in PUBLIC_API[module]:
        assert hasattr(mod, name), f"{module}.{name} is gone"
        assert public is None or name in public, f"{module}.{name} is not in {module}.__all__"
    for (m, cls), methods in PUBLIC_METHODS.items():
        if m == module:
            for meth in methods:
                assert callable(getattr(getattr(mod, cls), meth, None)), f"{module}.{cls}.{meth} is gone"


def test_library_commands_work_without_the_pipeline(tmp_path):
    """With prefect and mlflow unimportable, `qtuning train --help` works and `qtuning run` names the extra."""
    blocker = tmp_path / "block"
    for name in (*PIPELINE_LIBRARIES, "lm_eval"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    # find_spec still finds a blocking package; make the check see it as absent, like an uninstalled one
    code = (
        "import sys, importlib.util as u\n"
        "real = u.find_spec\n"
        f"u.find_spec = lambda n, *a: None if n.split('.')[0] in {(*PIPELINE_LIBRARIES, 'lm_eval')!r} else real(n, *a)\n"
        "from commands.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    train = subprocess.run([sys.executable, "-c", code, "train", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert train.returncode == 0, train.stderr
    assert "--config" in train.stdout
    run = subprocess.run([sys.executable, "-c", code, "run"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "pip install 'qtuning[pipeline]'" in run.stderr


@pytest.mark.parametrize("package", ["qtuning", "tasks", "flows", "commands"])
def test_every_module_says_what_it_is_about(package):
    missing = [str(p.relative_to(REPO)) for p in _modules(package).values() if p.stat().st_size and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_mlflow_folder_does_not_shadow_the_package():
    assert not (REPO / "mlflow" / "__init__.py").exists()
    import mlflow

    assert "site-packages" in mlflow.__file__
