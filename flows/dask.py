"""The Dask task runner: a LocalCluster sized to the machine, or an existing scheduler."""

from __future__ import annotations

import os

from prefect_dask import DaskTaskRunner


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def dask_task_runner(workers: int | None = None, address: str | None = None) -> DaskTaskRunner:
    """A DaskTaskRunner on ``address`` (e.g. tcp://scheduler:8786), else a local process cluster.

    The local cluster has ``workers`` single-threaded worker processes (default: one per
    core), so CPU-bound image work runs in parallel without contending for the GIL.
    """
    if address and workers:
        raise ValueError("give either --workers (local cluster) or --dask-address (existing cluster), not both")
    if address:
        return DaskTaskRunner(address=address)
    n = workers or default_workers()
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None},
    )
