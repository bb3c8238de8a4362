"""Grad-CAM++ (method ``gradcam-pp``): Eq. 7 and 19 against pytorch-grad-cam's GradCAMPlusPlus, on
arrays with gradients that vary over the map and on the classifier end to end, and the closed form
a GAP-linear head gives by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAMPlusPlus
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxr_miner.miner.methods import create_method
from cxr_miner.miner.methods.gradcam_pp import grad_cam_plus_plus
from cxr_miner.miner.models import ModelConfig, create_model
from cxr_miner.miner.training import preset

CONFIG = preset("cpu-small").updated({"input_size": 96})


def test_the_formula_is_pytorch_grad_cams_for_gradients_that_vary_over_the_map():
    """Activations and gradients drawn at random (some gradients 0, some negative): the same
    ReLU(sum_k w_k A^k) as the library's weights (its Eq. 19) times its activations."""
    generator = np.random.default_rng(3)
    activations = generator.uniform(0, 2, size=(2, 5, 4, 6)).astype(np.float32)
    gradients = generator.normal(size=(2, 5, 4, 6)).astype(np.float32)
    gradients[:, :, 0, :] = 0
    layer = torch.nn.Conv2d(1, 1, 1)
    with GradCAMPlusPlus(model=layer, target_layers=[layer]) as reference:
        expected = np.maximum(reference.get_cam_image(None, layer, None, activations, gradients), 0)
    ours = grad_cam_plus_plus(torch.from_numpy(activations), torch.from_numpy(gradients))
    assert ours.shape == (2, 4, 6)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_gap_linear_head_gives_a_cam_of_the_positively_weighted_channels():
    """Logit S = sum_k v_k mean(A^k): the gradient is v_k / (h w) everywhere, so Eq. 19's alpha is
    1 / (2 + v_k sum A^k / (h w)) and Eq. 7's w_k = relu(v_k) / (2 + v_k mean A^k): channel 1
    (v = -1) drops out and channel 0 (v = 2, mean A 0.5) weighs 2 / 3."""
    activations = torch.zeros(1, 2, 2, 2)
    activations[0, 0] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    activations[0, 1] = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    gradients = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2) / 4
    expected = torch.tensor([[[4.0 / 3, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(grad_cam_plus_plus(activations, gradients), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,layer", [("baseline", "trunk.layer4"), ("msa", "msa")])
def test_the_method_is_pytorch_grad_cams_gradcam_plus_plus_on_the_classifier(name, layer):
    """End to end through autograd (``inference``: on for this method): after pytorch-grad-cam's
    min-max, resize and final min-max, the maps of two findings of two images agree."""
    torch.manual_seed(2)
    model = create_model(ModelConfig(name=name, trunk="resnet18")).eval()
    images = torch.randn(2, 1, 96, 96)
    method = create_method("gradcam-pp", CONFIG)
    with method.inference():
        maps, logits = method.heatmaps([model], images, None)
    assert maps.shape[:2] == logits.shape == (2, 14) and not logits.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for finding in (0, 9):
        with GradCAMPlusPlus(model=model, target_layers=[model.get_submodule(layer)]) as reference:
            expected = reference(input_tensor=images, targets=[ClassifierOutputTarget(finding)] * 2)
        ours = scale_cam_image(scale_cam_image(maps[:, finding].numpy(), target_size=(96, 96)))
        np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_only_the_selected_findings_are_differentiated():
    """A finding no image selects keeps an all-zero map; a selected one does not."""
    torch.manual_seed(2)
    model = create_model(ModelConfig(name="baseline", trunk="resnet18")).eval()
    wanted = torch.zeros(1, 14, dtype=torch.bool)
    wanted[0, 4] = True
    method = create_method("gradcam-pp", CONFIG)
    with method.inference():
        maps, _ = method.heatmaps([model], torch.randn(1, 1, 96, 96), lambda logits: wanted)
    assert maps[0, 4].max() == 1.0
    assert maps[:, [c for c in range(14) if c != 4]].abs().sum() == 0
