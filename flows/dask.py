"""The Dask task runner: a LocalCluster sized to the machine, or an existing scheduler."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import dask
from prefect.task_runners import TaskRunner
from prefect_dask import DaskTaskRunner

from cxr_miner.flows.options import check_cluster
from cxr_miner.flows.workers import quiet_dask_shutdown
from cxr_miner.storage.vocab.errors import InputError, SettingError

if TYPE_CHECKING:  # torch is imported where a device is asked for: preprocess's workers never load it
    import torch

# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's
# mmap threshold at 128 KiB: every decoded image buffer is then mmap'ed, zero-filled and
# unmapped again, about 20% more CPU per image here (BENCHMARKS.md). None unsets it, so
# local workers get glibc's defaults, like any other process. The statistical profiler
# (a thread sampling every 10 ms) is off: nobody reads it in batch runs.
LOCAL_WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.worker.preload": ["cxr_miner.flows.workers"],  # its dask_setup runs in each worker process
}


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def dask_task_runner(
    workers: int | None = None, address: str | None = None, resources: dict | None = None
) -> TaskRunner[Any]:  # a DaskTaskRunner; prefect's with_options takes TaskRunner[PrefectFuture[Any]]
    """A DaskTaskRunner on ``address`` (e.g. tcp://scheduler:8786), else a local process cluster.

    The local cluster has ``workers`` single-threaded worker processes (default: one per
    core), so CPU-bound image work runs in parallel without contending for the GIL; each
    worker offers ``resources`` (e.g. {"GPU": 1}). Create and use it inside :func:`local_worker_config`.
    """
    check_cluster(workers, address)
    if address:
        check_scheduler(address)
        return DaskTaskRunner(address=address)
    n = workers or default_workers()
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": n,
            "threads_per_worker": 1,
            "processes": True,
            **({"resources": resources} if resources else {}),
        },
    )


def check_scheduler(address: str, timeout_s: float = 5.0) -> None:
    """Raise ValueError unless something listens at a ``tcp://host:port`` scheduler address (a
    wrong address would otherwise surface as a traceback after Dask's 30 s connect timeout)."""
    scheme, _, location = address.rpartition("://")
    if scheme not in ("", "tcp") or ":" not in location:
        return  # tls://, inproc:// and the like: left to Dask
    host, _, port = location.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as error:
        raise SettingError(f"--dask-address {address}: no Dask scheduler answers there ({error})") from None


@contextmanager
def local_worker_config() -> Iterator[None]:
    """Dask settings in force while a flow starts its LocalCluster (see LOCAL_WORKER_CONFIG); the
    scheduler in this process logs a closed connection in one line, as its workers do."""
    quiet_dask_shutdown()
    with dask.config.set(LOCAL_WORKER_CONFIG):
        yield


def local_gpus(gpus: int | None, dask_address: str | None) -> int | None:
    """The GPUs a local cluster deals to its workers: ``gpus`` if this machine has that many (an
    InputError that says how many it has, if not), all of them when ``gpus`` is None (None on a
    machine without CUDA). On an existing scheduler (``dask_address``) ``gpus`` is the workers'
    business: it is passed on unchecked."""
    if dask_address:
        return gpus
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is None:
        return available or None
    if gpus > available:
        has = f"{available} CUDA GPU{'s' if available != 1 else ''}" if available else "no CUDA GPU torch can use"
        raise InputError("--gpus", f"{gpus} asked for, but this machine has {has}; leave --gpus out to use what it has")
    return gpus


def worker_device(setting: str) -> torch.device:
    """The configured device; on CUDA without an index, GPU (Dask worker number mod GPU count)."""
    import torch

    from cxr_miner.miner.training import pick_device

    device = pick_device(setting)
    if device.type != "cuda" or device.index is not None:
        return device
    try:
        from distributed import get_worker

        number = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        number = 0
    return torch.device("cuda", number % torch.cuda.device_count())


def worker_threads() -> int:
    """The Dask worker's thread count (a torch thread per worker thread), else torch's default."""
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        import torch

        return torch.get_num_threads()
