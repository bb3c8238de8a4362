"""Helpers the flow tests share (conftest.py holds only fixtures)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# The shared trained run: 10 epochs of step 1 and one per AM step, about 3 minutes on 2 cores.
SETTINGS = {"epochs": 10, "am_steps": 3, "am_epochs": 1, "loader_workers": 1}


def copy_workdir(source: Path, target: Path) -> Path:
    """Index, shards and models of a workdir, without its harvest (hard links where possible)."""

    def copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("harvest", "releases"), copy_function=copy)
    return target
