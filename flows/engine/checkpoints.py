"""Models and training state to and from checkpoint files (storage.stages.checkpoints holds the
format, storage.stages.runs the run folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cxr_miner.miner.checkpoint import load_model_arrays, model_arrays, restore_training_state, training_state
from cxr_miner.miner.models import CamClassifier, imagenet_weights
from cxr_miner.miner.training import Network, TrainConfig, create_network
from cxr_miner.storage.stages.checkpoints import read_checkpoint, read_weights_file, write_checkpoint
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.errors import InputError, MissingInput


def trunk_weights(setting: str, trunk: str) -> dict[str, torch.Tensor] | None:
    """``random`` -> None; ``imagenet`` -> torchvision's (download); else a local file:
    ``.safetensors`` or a torchvision ``.pth`` (loaded with weights_only=True, no pickle code)."""
    if setting == "random":
        return None
    if setting == "imagenet":
        return imagenet_weights(trunk)
    path = Path(setting)
    if not path.exists():
        raise MissingInput(f"{path}: no such weights file (weights: random, imagenet or a file path)")
    if path.suffix == ".safetensors":
        return {k: torch.tensor(v) for k, v in read_weights_file(path).items()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad files
        raise InputError(path, f"cannot read weights ({type(error).__name__}: {error})") from error
    return state.get("state_dict", state) if isinstance(state, dict) else state


def save_checkpoint(path: Path, model: torch.nn.Module, record: dict[str, Any], optimizer=None, scheduler=None) -> None:
    """Model weights, and the optimiser/scheduler/random state when given (a resumable checkpoint)."""
    arrays = model_arrays(model)
    if optimizer is not None:
        state_arrays, state_record = training_state(optimizer, scheduler)
        arrays.update(state_arrays)
        record = {**record, "training_state": state_record}
    write_checkpoint(path, arrays, record)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[Network, dict[str, Any]]:
    """The model of a checkpoint (its record's ``network``: the classifier unless said), in eval
    mode on ``device``, and its record."""
    arrays, record = read_checkpoint(path)
    config = TrainConfig.from_dict(record["config"])
    model = create_network(config, record.get("network", "classifier"))
    try:
        load_model_arrays(model, arrays)
    except ValueError as error:  # the arrays do not fit the network its own record describes
        raise InputError(path, str(error)) from error
    return model.to(device).eval(), record


def load_classifier(path: Path, device: torch.device | str = "cpu") -> CamClassifier:
    """load_model of a classifier checkpoint (an AM step's); ValueError for any other network."""
    model, record = load_model(path, device)
    if not isinstance(model, CamClassifier):
        raise InputError(path, f"holds a {record.get('network')} network, not the CAM classifier")
    return model


def resume_into(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Load model and training state of a resumable checkpoint; returns its record."""
    arrays, record = read_checkpoint(path)
    load_model_arrays(model, arrays)
    restore_training_state(optimizer, scheduler, arrays, record["training_state"])
    return record


def read_config(run: RunFolder) -> TrainConfig:
    """The TrainConfig a run was started with."""
    return TrainConfig.from_dict(run.config())


def load_models(run: RunFolder, names: tuple[str, ...], device: torch.device | str = "cpu") -> list[Network]:
    """The run's checkpoints ``names`` as models in eval mode on ``device``; FileNotFoundError
    naming the missing ones."""
    missing = run.missing(names)
    if missing:
        raise MissingInput(f"{run.directory}: needs {', '.join(missing)} (train the run first)")
    return [load_model(run.checkpoint(name), device)[0] for name in names]
