"""Method ``ensemble``: the normalised mean of the CAM baseline's, each AM step's and Grad-CAM++'s
normalised maps, checked against each member computed on its own by its own method."""

from __future__ import annotations

import torch

from cxr_miner.miner.cam import normalize_maps
from cxr_miner.miner.methods import create_method
from cxr_miner.miner.methods.attention import AttentionMining
from cxr_miner.miner.models import ModelConfig, create_model
from cxr_miner.miner.training import preset

CONFIG = preset("cpu-small").updated({"input_size": 64, "am_steps": 3})


def test_the_ensemble_is_the_normalised_mean_of_its_members_each_computed_by_its_own_method():
    torch.manual_seed(4)
    models = [create_model(ModelConfig(name="msa", trunk="resnet10")).eval() for _ in range(3)]
    images = torch.randn(2, 1, 64, 64)
    members = []
    with torch.no_grad():
        members.append(create_method("cam", CONFIG).heatmaps(models, images, None)[0])
        for t in (2, 3):
            members.append(AttentionMining(CONFIG, t).heatmaps(models, images, None)[0])
    gradcam = create_method("gradcam-pp", CONFIG)
    with gradcam.inference():
        members.append(gradcam.heatmaps(models[:1], images, None)[0])
    expected = normalize_maps(torch.stack(members).mean(dim=0))

    ensemble = create_method("ensemble", CONFIG)
    assert ensemble.checkpoints() == ("step1", "step2", "step3")
    assert [s.checkpoint for s in ensemble.training_plan()] == ["step1", "step2", "step3"]
    with ensemble.inference():
        maps, logits = ensemble.heatmaps(models, images, None)
    assert maps.shape == members[0].shape == (2, 14, 4, 4) and not logits.requires_grad  # MSA: stride 16
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    assert float(maps.amax(dim=(2, 3)).min()) == 1.0  # each map spans [0, 1] again
    assert all(p.grad is None for m in models for p in m.parameters())
    assert not ensemble.harvest_fallback(lambda names: True)  # never an untuned finding's method


def test_one_ensemble_pass_gives_its_members_maps_too():
    torch.manual_seed(5)
    models = [create_model(ModelConfig(name="msa", trunk="resnet10")).eval() for _ in range(3)]
    images = torch.randn(1, 1, 64, 64)
    ensemble = create_method("ensemble", CONFIG)
    assert ensemble.provides() == ("cam", "am-t2", "am-t3", "gradcam-pp", "ensemble")
    with ensemble.inference():
        maps, _ = ensemble.variant_maps(models, images, None)
    with torch.no_grad():
        alone = AttentionMining(CONFIG, 3).heatmaps(models, images, None)[0]
    torch.testing.assert_close(maps["am-t3"], alone)
    torch.testing.assert_close(
        maps["ensemble"], normalize_maps(torch.stack([maps[v] for v in maps if v != "ensemble"]).mean(0))
    )
