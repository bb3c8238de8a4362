"""The detector check's Faster R-CNN: grayscale stem, trunk weights, padded targets, a training step."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models import mobilenet_v3_large, resnet18

from cxr_miner.miner.detector import (
    NUM_CLASSES,
    DetectorConfig,
    create_detector,
    detect,
    detection_loss,
    pad_targets,
    unpad_targets,
)

SMALL = DetectorConfig(size=64, rois_per_image=16, proposals=50)


def test_padded_targets_round_trip_and_background_images_stay_empty():
    boxes, labels = pad_targets([[(3, [1.0, 2.0, 3.0, 4.0]), (14, [5.0, 6.0, 7.0, 8.0])], []])
    assert boxes.shape == (2, 2, 4) and labels.tolist() == [[3, 14], [0, 0]]
    targets = unpad_targets(boxes, labels)
    assert targets[0]["boxes"].tolist() == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]] and targets[0][
        "labels"
    ].tolist() == [3, 14]
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["labels"].shape == (0,)


def test_a_grayscale_detector_trains_a_step_and_detects_in_input_pixels():
    torch.manual_seed(0)
    model = create_detector(SMALL)
    assert model.backbone.body["0"][0].in_channels == 1
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES == 15
    images = torch.randn(2, 1, 64, 64)
    boxes, labels = pad_targets([[(6, [10.0, 10.0, 30.0, 34.0])], []])
    model.train()
    loss, parts = detection_loss(model, images, torch.zeros(2, 14), boxes, labels)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"classifier", "box_reg", "objectness", "rpn_box_reg"}
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    found = detect(model, images)
    assert len(found) == 2 and found[0]["boxes"].shape[1] == 4
    assert (found[0]["boxes"] >= 0).all() and (found[0]["boxes"] <= 64).all()
    assert not model.training


@pytest.mark.parametrize(
    "name, classifier", [("fasterrcnn-mobilenet", mobilenet_v3_large), ("fasterrcnn-resnet50", None)]
)
def test_trunk_weights_load_into_the_body_and_the_stem_is_their_rgb_sum(name, classifier):
    from torchvision.models import resnet50

    state = (classifier or resnet50)().state_dict()
    model = create_detector(DetectorConfig(name=name, size=64, weights="a-file"), state)
    if name == "fasterrcnn-resnet50":
        stem, rgb = model.backbone.body.conv1.weight, state["conv1.weight"]
        assert torch.equal(model.backbone.body.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    else:
        stem, rgb = model.backbone.body["0"][0].weight, state["features.0.0.weight"]
    assert torch.allclose(stem, rgb.sum(dim=1, keepdim=True))


def test_weights_of_another_network_are_refused_with_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit a torchvision mobilenet_v3_large: .* missing"):
        create_detector(DetectorConfig(size=64, weights="a-file"), resnet18().state_dict())
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        DetectorConfig(name="yolo")


def test_the_warm_up_rises_linearly_to_the_cosine_schedule():
    from cxr_miner.miner.training import TrainConfig, make_optimizer

    model = torch.nn.Linear(2, 1)
    optimizer, scheduler = make_optimizer(
        model, TrainConfig(optimizer="sgd"), lr=0.1, epochs=2, steps_per_epoch=10, warmup_steps=4
    )
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * step / 20)) for step in range(20)]
    warm = [0.001 + 0.999 * min(1.0, step / 4) for step in range(20)]
    assert rates == pytest.approx([c * w for c, w in zip(cosine, warm)])
    assert rates[0] == pytest.approx(1e-4) and rates[4] == pytest.approx(cosine[4])
