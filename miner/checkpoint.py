"""Training state <-> flat named numpy arrays and a JSON record (no files: storage writes them).

Keys: ``model.<param>``, ``optim.<index>.<name>`` for per-parameter optimiser state,
``rng.torch`` and ``rng.cuda.<device>``. Everything that is not a tensor (optimiser
param groups, scheduler, epoch counters) goes in the JSON record. Data order does not need
saving: the loaders shuffle with a generator seeded by (seed, epoch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_model_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Strict load of ``model.*`` arrays; ValueError naming the mismatch."""
    state = {
        k.removeprefix("model."): torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("model.")
    }
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"checkpoint does not fit the model: {str(error).splitlines()[0]} ...") from error


def training_state(optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Optimiser, scheduler and random state -> (arrays, record)."""
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, float]] = {}
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                arrays[f"optim.{index}.{name}"] = value.detach().cpu().numpy()
            else:
                scalars.setdefault(str(index), {})[name] = value
    arrays["rng.torch"] = torch.get_rng_state().numpy()
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            arrays[f"rng.cuda.{device}"] = state.numpy()
    record = {
        "param_groups": optim["param_groups"],
        "optim_scalars": scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    return arrays, record


def restore_training_state(
    optimizer: torch.optim.Optimizer, scheduler: Any, arrays: dict[str, np.ndarray], record: dict[str, Any]
) -> None:
    """Inverse of training_state (tensors go to the device of the optimiser's parameters)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in arrays.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(value))
    for index, values in record["optim_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    if scheduler is not None and record.get("scheduler") is not None:
        scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(torch.from_numpy(np.array(arrays["rng.torch"])))
    cuda = sorted(k for k in arrays if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.from_numpy(np.array(arrays[k])) for k in cuda])
