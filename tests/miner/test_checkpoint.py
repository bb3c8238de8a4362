"""Checkpoints: safetensors round trip, and a resumed run takes exactly the step an unbroken one takes."""

from __future__ import annotations

import pytest
import torch

from cxr_miner.miner.checkpoint import load_model_arrays, model_arrays, restore_training_state, training_state
from cxr_miner.miner.models import ModelConfig, create_model
from cxr_miner.storage.stages.checkpoints import CheckpointError, read_checkpoint, read_weights_file, write_checkpoint
from cxr_miner.storage.vocab.errors import InputError


def step(model, optimizer, scheduler):
    images = torch.randn(4, 1, 64, 64)  # drawn from the global generator, which the checkpoint restores
    loss = model(images).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def fresh(seed=0):
    torch.manual_seed(seed)
    model = create_model(ModelConfig(name="msa", trunk="resnet18"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return model, optimizer, scheduler


def test_resume_reproduces_the_next_step(tmp_path):
    model, optimizer, scheduler = fresh()
    step(model, optimizer, scheduler)
    arrays, record = training_state(optimizer, scheduler)
    write_checkpoint(tmp_path / "last.safetensors", {**model_arrays(model), **arrays}, {"state": record, "epoch": 1})
    step(model, optimizer, scheduler)  # the unbroken run
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    resumed, optimizer2, scheduler2 = fresh(seed=99)  # different init: everything must come from the file
    arrays, record = read_checkpoint(tmp_path / "last.safetensors")
    load_model_arrays(resumed, arrays)
    restore_training_state(optimizer2, scheduler2, arrays, record["state"])
    assert record["epoch"] == 1
    step(resumed, optimizer2, scheduler2)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        read_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match=r"broken.safetensors: not a safetensors weights file"):
        read_weights_file(bad)  # a user's pretrained weights (--weights); was a TypeError, found by mypy
    other = create_model(ModelConfig(name="baseline", trunk="resnet18"))
    write_checkpoint(tmp_path / "msa.safetensors", model_arrays(fresh()[0]), {})
    with pytest.raises(ValueError, match="does not fit the model"):
        load_model_arrays(other, read_checkpoint(tmp_path / "msa.safetensors")[0])


def test_record_alone_is_read_from_the_header(tmp_path):
    from cxr_miner.storage.stages.checkpoints import read_checkpoint_record

    write_checkpoint(tmp_path / "c.safetensors", model_arrays(fresh()[0]), {"state": {"epoch": 4}})
    assert read_checkpoint_record(tmp_path / "c.safetensors") == {"state": {"epoch": 4}}
