"""A trained run on phantoms, shared by the training, harvest and release tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flows.helpers import SETTINGS, copy_workdir


def _train_phantoms(base: Path, dask_address: str) -> Path:
    """320 phantoms of 256 px (20% with boxes), shards of 128 px (preprocessed on the cluster at
    ``dask_address``), run ``t`` of preset cpu-small, under ``base``."""
    from cxr_miner.flows.ingest import ingest
    from cxr_miner.flows.preprocess import run_preprocess
    from cxr_miner.flows.train import train
    from cxr_miner.storage.phantoms.generator import generate

    root, work = base / "nih", base / "work"
    generate(root, n_images=320, size=256, seed=11, box_fraction=0.2, workers=2)
    ingest(root=str(root), workdir=str(work))
    run_preprocess(str(work), dask_address=dask_address, size=128, shard_size=64)
    config = work / "settings.json"
    config.write_text(json.dumps(SETTINGS))
    train(workdir=str(work), preset="cpu-small", config_file=str(config), run="t")
    return work


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, prefect_server, dask_cluster) -> Path:
    """The trained phantoms of _train_phantoms, made once per test session.

    Tests that write into a workdir copy it (copy_workdir) rather than change this one.
    """
    return _train_phantoms(tmp_path_factory.mktemp("trained"), dask_cluster)


@pytest.fixture(scope="session")
def dask_cluster(prefect_server) -> str:
    """One local Dask cluster (2 single-threaded worker processes) for the harvest and release
    tests, so that each flow run does not start its own; returns the scheduler address."""
    from distributed import LocalCluster

    from cxr_miner.flows.dask import local_worker_config

    with local_worker_config(), LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def released(trained_workdir, dask_cluster, tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """Two runs of the whole chain (flow ``run``) on the same inputs: the second finds every
    stage done (no retraining, no reharvest) and publishes a second release."""
    base = tmp_path_factory.mktemp("release")
    work = copy_workdir(trained_workdir, base / "work")
    root = json.loads((work / "ingest_report.json").read_text())["root"]
    options = {
        "preset": "cpu-small",
        "config_file": str(work / "settings.json"),
        "run": "t",
        "size": 128,
        "shard_size": 64,
        "dask_address": dask_cluster,
    }
    from cxr_miner.flows.pipeline import run

    first = run(root=root, workdir=str(work), out=str(base / "releases"), **options)
    second = run(root=root, workdir=str(work), out=str(base / "releases"), **options)
    return work, base / "releases", first, second
