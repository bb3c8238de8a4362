"""Helpers the flow tests share (conftest.py holds only fixtures)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cxr_miner.storage.stages.lock import LOCK_FILE

# The shared trained run: 10 epochs of step 1 and one per AM step. Its trunk is a ResNet-10 (one
# block per stage, ResNet-18's strides: an 8 x 8 MSA map at 128 px), which trains 2x faster than
# cpu-small's ResNet-18 on a CPU. The 3-stage ResNet-10 of cpu-demo (3.4x faster, X at stride 8) did
# not learn Cardiomegaly's global pattern at 128 px (validation AUC 0.68). Shards are read in the
# training process: on 2 cores a spawned loader worker costs its start-up (a torch import) per loader
# and contends with torch's threads (149 s against 98 s for the same weights). The tests of stopping
# and of MIL's patch labels keep loader workers.
SETTINGS = {
    "epochs": 10,
    "am_steps": 3,
    "am_epochs": 1,
    "loader_workers": 0,
    "model": {"trunk": "resnet10"},
}


def copy_workdir(source: Path, target: Path) -> Path:
    """Index, shards and models of a workdir, without its harvest (hard links where possible)."""

    def copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    # not the lock file: a hard link to it is the same lock (flock holds an inode), which a flow in
    # the source, or in another copy, may hold
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("harvest", "releases", LOCK_FILE), copy_function=copy)
    return target
