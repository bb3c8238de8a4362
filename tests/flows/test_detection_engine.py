"""Boxes into and out of a detector through the shard letterbox, worked by hand, and trunk weights from a local file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import mobilenet_v3_large

from cxr_miner.flows.engine.detection import DetectionTargets, detections_of, detector_weights
from cxr_miner.miner.detector import DetectorConfig, create_detector
from cxr_miner.storage.vocab.letterbox import Letterbox

# a 1000 x 500 source image in a 512 px shard: scale 0.512, content 512 x 256, 128 px of padding above
WIDE = Letterbox.fit(1000, 500, 512)


def test_source_boxes_become_input_pixels_of_the_detector():
    targets = DetectionTargets({"a": [("Mass", [100.0, 50.0, 300.0, 250.0])], "b": []}, size=256)
    out = targets(["a", "b"], [WIDE, WIDE])
    # shard: [51.2, 25.6 + 128, 153.6, 128 + 128]; at 256 px: half of it
    assert out["boxes"][0, 0].tolist() == pytest.approx([25.6, 76.8, 76.8, 128.0])
    assert out["box_labels"].tolist() == [[5], [0]]  # Mass is the 5th finding; b is background


def test_detections_go_back_to_source_pixels_and_those_in_the_padding_are_dropped():
    output = {
        "boxes": torch.tensor([[25.6, 76.8, 76.8, 128.0], [0.0, 0.0, 10.0, 60.0]]),
        "labels": torch.tensor([5, 3]),
        "scores": torch.tensor([0.9, 0.4]),
    }
    found = detections_of("a", WIDE, output, size=256)
    assert found[0]["finding"] == "Mass" and found[0]["score"] == pytest.approx(0.9)
    assert found[0]["bbox"] == pytest.approx([100.0, 50.0, 200.0, 200.0])  # x, y, w, h of [100, 50, 300, 250]
    # the second lies in the padding above the image (shard y up to 120 < 128): nothing of it is left
    assert len(found) == 1


def test_trunk_weights_from_a_local_torchvision_file(tmp_path):
    state = mobilenet_v3_large().state_dict()
    torch.save(state, tmp_path / "mobilenet.pth")
    config = DetectorConfig(size=64, weights=str(tmp_path / "mobilenet.pth"))
    model = create_detector(config, detector_weights(config))
    assert torch.allclose(model.backbone.body["0"][0].weight, state["features.0.0.weight"].sum(dim=1, keepdim=True))
    assert np.allclose(model.backbone.body["16"][0].weight.detach().numpy(), state["features.16.0.weight"].numpy())
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        detector_weights(DetectorConfig(weights=str(tmp_path / "missing.pth")))
