"""A local harvest cluster has a worker per core, with GPUs too, and the GPUs are dealt to the
workers round-robin (a GPU makes heatmaps faster than one core boxes them)."""

from types import SimpleNamespace

import pytest
import torch

from cxr_miner.flows import dask as flows_dask
from cxr_miner.flows import harvest
from cxr_miner.miner import training


@pytest.mark.parametrize(("workers", "layout"), [(None, (16, 1)), (4, (4, 4)), (32, (32, 1))])
def test_a_local_harvest_has_a_worker_per_core_unless_told(monkeypatch, workers, layout):
    monkeypatch.setattr(harvest, "default_workers", lambda: 16)
    assert harvest.local_layout(workers) == layout


def test_the_gpus_are_dealt_to_the_workers_round_robin(monkeypatch):
    import distributed

    monkeypatch.setattr(training, "pick_device", lambda setting: torch.device(setting))  # no CUDA here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices = []
    for name in ("0", "1", "2", "3", "4"):
        monkeypatch.setattr(distributed, "get_worker", lambda name=name: SimpleNamespace(name=name))
        devices.append(str(flows_dask.worker_device("cuda")))
    assert devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert flows_dask.worker_device("cuda:1") == torch.device("cuda", 1)  # an index given is kept
    monkeypatch.setattr(distributed, "get_worker", lambda: SimpleNamespace(name="gpu-host-3"))  # `dask worker --name`
    assert flows_dask.worker_device("cuda") == torch.device("cuda", 0)
