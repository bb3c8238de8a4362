"""The rooms and what each may import (README "Layout"), read from every module's imports.

- storage/: bytes, no torch; never miner/ or flows/.
- miner/: tensors and arrays; no files, no Prefect or Dask; from storage/ only the shared
  vocabulary (storage/vocab/).
- flows/engine/: torch meets files; no Prefect or Dask.
- flows/: orchestration; the only room that knows Prefect and Dask.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("prefect", "prefect_dask", "dask", "distributed")
FILE_CALLS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "rename", "replace"}


def modules(room: str) -> list[Path]:
    return sorted(p for p in (REPO / room).rglob("*.py") if "__pycache__" not in p.parts)


def imported(path: Path) -> set[str]:
    """Every module name a file imports, at any depth (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported(path) if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("path", modules("storage"), ids=lambda p: p.relative_to(REPO).as_posix())
def test_storage_has_no_torch_and_imports_no_other_room(path):
    assert offending(path, ("torch", "torchvision", *ORCHESTRATION, "cxr_miner.miner", "cxr_miner.flows")) == []


@pytest.mark.parametrize("path", modules("miner"), ids=lambda p: p.relative_to(REPO).as_posix())
def test_miner_knows_no_orchestration_no_files_and_only_the_shared_vocabulary(path):
    assert offending(path, (*ORCHESTRATION, "cxr_miner.flows")) == []
    storage = [n for n in imported(path) if n.startswith("cxr_miner.storage")]
    assert all(n.startswith("cxr_miner.storage.vocab") for n in storage), storage
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
    }
    assert calls & FILE_CALLS == set()


@pytest.mark.parametrize("path", modules("flows/engine"), ids=lambda p: p.relative_to(REPO).as_posix())
def test_the_engine_knows_no_prefect_or_dask(path):
    assert offending(path, ORCHESTRATION) == []


def test_preprocess_loads_no_torch():
    """Each Dask worker imports the preprocess flow's module to run its tasks: torch (about 3 s of
    import here) is not among what it loads."""
    code = "import sys, cxr_miner.flows.preprocess; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_what_the_command_line_checks_before_it_starts_loads_no_torch_prefect_or_dask():
    """The settings, the methods' catalogue, the option checks and the folder locks: the command
    line refuses a bad value or a busy folder with these alone, within a second."""
    modules = "cxr_miner.miner.settings, cxr_miner.miner.method_names, cxr_miner.flows.options, cxr_miner.flows.folders"
    code = (
        f"import sys, {modules}, cxr_miner.flows.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'prefect', 'distributed'}))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_flows_do_not_import_each_other_for_helpers():
    """A flow module imports another flow module only to call that flow (pipeline, release)."""
    allowed = {
        "cxr_miner.flows.api",
        "cxr_miner.flows.dask",
        "cxr_miner.flows.faults",
        "cxr_miner.flows.folders",
        "cxr_miner.flows.logs",
        "cxr_miner.flows.options",
        "cxr_miner.flows.progress",
        "cxr_miner.flows.stopping",
        "cxr_miner.flows.tasks",
        "cxr_miner.flows.workers",
    }
    calls_a_flow = {
        "pipeline.py": {"ingest", "preprocess", "train", "evaluate", "harvest", "release", "detector_check"},
        "release.py": {"evaluate"},
        "cli.py": {
            "ingest",
            "preprocess",
            "train",
            "evaluate",
            "harvest",
            "release",
            "pipeline",
            "detector_check",
            "review",
        },  # review: no flow, the review server's orchestration
    }
    for path in sorted((REPO / "flows").glob("*.py")):
        flows = {
            n.removeprefix("cxr_miner.flows.")
            for n in imported(path)
            if n.startswith("cxr_miner.flows.") and not n.startswith("cxr_miner.flows.engine") and n not in allowed
        }
        assert flows <= calls_a_flow.get(path.name, set()), (path.name, flows)


# What the registry declares (miner/methods): flows/ asks it, never names a method or network.
DECLARED = {"cam", "am", "mil", "patch", "classifier", "attention"}


@pytest.mark.parametrize("path", modules("flows"), ids=lambda p: p.relative_to(REPO).as_posix())
def test_flows_compare_no_value_with_a_method_or_network_name(path):
    """No ``method == "mil"``, ``network == "patch"``, ``trainer == "classifier"`` or ``x in ("am",
    "cam")``: what a method needs and how it is harvested come from miner.methods' registry."""
    named = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                named += [v.value for v in values if isinstance(v, ast.Constant) and v.value in DECLARED]
    assert named == [], f"{path.name} compares with {named}"


@pytest.mark.parametrize(
    "path",
    [p for p in modules("flows") if p.name != "faults.py"],  # faults: the tests' plan file
    ids=lambda p: p.relative_to(REPO).as_posix(),
)
def test_flows_read_and_write_through_storage(path):
    """A flow's files are read and written by storage/'s readers and writers, its tables and
    arrays built by storage/ or miner/: no pyarrow, json or numpy in flows/ (the engine included)."""
    assert offending(path, ("pyarrow", "json", "numpy")) == []


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring left out."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0  # type: ignore[operator]


@pytest.mark.parametrize("path", modules("flows") + modules("storage"), ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_function_in_flows_or_storage_is_over_45_lines(path):
    """Orchestration and file code read as steps: a longer function is split into named parts."""
    functions = [
        n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    assert [f"{f.name}: {_body_lines(f)} lines" for f in functions if _body_lines(f) > 45] == []
