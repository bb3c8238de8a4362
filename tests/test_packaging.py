"""One installed name: the wheel holds cxr_miner.{flows,miner,storage} and nothing top-level, a
fresh venv imports cxr_miner.storage but no bare ``storage``, the console script runs from any
folder, and an unrelated top-level ``storage``/``flows``/``miner`` on the path breaks nothing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("flows", "miner", "storage")
CONSOLE = Path(sys.executable).parent / "cxr-miner"


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built offline from a copy of its sources (the checkout stays clean)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for room in ROOMS:
        shutil.copytree(REPO / room, source / room, ignore=shutil.ignore_patterns("__pycache__"))
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        cwd=out,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("cxr_miner-*.whl")
    return path


def test_the_wheel_holds_every_package_under_cxr_miner_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cxr_miner", next(t for t in tops if t.endswith(".dist-info"))}
    expected = sorted(
        f"cxr_miner/{p.relative_to(REPO).as_posix()}"
        for room in ROOMS
        for p in (REPO / room).rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert sorted(n for n in names if n.endswith(".py")) == expected  # every module of every sub-package
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cxr-miner = cxr_miner.flows.cli:main" in entry_points


def test_a_fresh_venv_imports_cxr_miner_storage_and_no_bare_storage(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stderr
    probe = (
        "import importlib.util as u, cxr_miner.storage, cxr_miner.flows, cxr_miner.miner\n"
        "print(cxr_miner.storage.__file__)\n"
        "print([u.find_spec(n) is None for n in ('storage', 'flows', 'miner')])"
    )
    out = run([str(python), "-c", probe], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    location, missing = out.stdout.splitlines()
    assert location.startswith(str(venv)) and location.endswith("cxr_miner/storage/__init__.py")
    assert missing == "[True, True, True]"


def test_the_console_script_runs_from_any_folder(tmp_path):
    out = run([str(CONSOLE), "--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "demo-data" in out.stdout and "harvest" in out.stdout


def test_unrelated_top_level_storage_flows_and_miner_modules_break_nothing(tmp_path):
    impostors = tmp_path / "site"
    (impostors / "flows").mkdir(parents=True)
    (impostors / "storage.py").write_text("NAME = 'someone else'\n")
    (impostors / "miner.py").write_text("NAME = 'someone else'\n")
    (impostors / "flows" / "__init__.py").write_text("NAME = 'someone else'\n")
    probe = """
import importlib, pkgutil, sys
import storage, flows, miner
import cxr_miner.flows, cxr_miner.miner, cxr_miner.storage
for package in (cxr_miner.flows, cxr_miner.miner, cxr_miner.storage):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
from cxr_miner.storage.vocab.findings import parse_findings
assert parse_findings("Nodule|Mass") == ["Mass", "Nodule"], parse_findings("Nodule|Mass")
assert storage.NAME == flows.NAME == miner.NAME == "someone else"
assert not [n for n in sys.modules if n.split(".")[0] in ("storage", "flows", "miner") and "." in n]
print("ok")
"""
    out = run([sys.executable, "-c", probe], cwd=tmp_path, PYTHONPATH=str(impostors))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    cli = run([str(CONSOLE), "demo-data", "--help"], cwd=tmp_path, PYTHONPATH=str(impostors))
    assert cli.returncode == 0 and "--images" in cli.stdout, cli.stderr


def test_the_editable_install_is_a_link_tree_that_static_tools_read():
    """`make`'s install is setuptools' strict editable mode: cxr_miner/ as a tree of links under
    build/ (found through a plain path in a .pth file, as mypy, pyright and editors read it), with
    each package's py.typed; the default mode's import hook is invisible to them."""
    direct = json.loads(importlib.metadata.distribution("cxr-miner").read_text("direct_url.json") or "{}")
    if not direct.get("dir_info", {}).get("editable"):
        pytest.skip("cxr-miner is not installed editable here")
    spec = importlib.util.find_spec("cxr_miner.miner.boxes")
    assert spec is not None and spec.origin is not None
    origin = Path(spec.origin)
    assert origin.is_symlink() and origin.resolve() == REPO / "miner" / "boxes.py"
    assert REPO / "build" in origin.parents
    for room in ROOMS:
        assert (origin.parents[1] / room / "py.typed").exists(), room
