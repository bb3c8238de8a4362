"""CAM, class-wise erasure, Eq. 8: hand-made maps with known answers, and CAM against GradCAM."""

import numpy as np
import pytest
import torch

from cxr_miner.miner.boxes import peak_component
from cxr_miner.miner.cam import (
    class_activation_maps,
    erased_logits,
    final_heatmap,
    normalize_maps,
    update_masks,
)
from cxr_miner.miner.models import ModelConfig, create_model


def two_peaks() -> torch.Tensor:
    """Features (1, 1, 6, 8): a strong 2x2 peak (1.0) top left, a weaker 2x3 one (0.8) bottom right."""
    x = torch.zeros(1, 1, 6, 8)
    x[0, 0, 0:2, 0:2] = 1.0
    x[0, 0, 4:6, 5:8] = 0.8
    return x


def test_two_peaks_erased_strongest_first_then_the_other():
    features, weights = two_peaks(), torch.ones(1, 1)
    masks = torch.ones(1, 1, 6, 8)
    h1 = normalize_maps(class_activation_maps(features, weights, masks), masks)
    m1 = update_masks(h1, masks)
    expected_m1 = torch.ones(6, 8)
    expected_m1[0:2, 0:2] = 0
    assert torch.equal(m1[0, 0], expected_m1)  # the 0.8 peak is also >= 0.5 but not connected to the max

    h2 = normalize_maps(class_activation_maps(features, weights, m1), m1)
    assert h2[0, 0, 4, 5] == 1.0 and h2[0, 0, 0:2, 0:2].sum() == 0  # erased region holds no evidence
    m2 = update_masks(h2, m1)
    expected_m2 = expected_m1.clone()
    expected_m2[4:6, 5:8] = 0
    assert torch.equal(m2[0, 0], expected_m2)


def test_peak_component_is_eight_connected_and_empty_for_blank_maps():
    heatmap = np.zeros((4, 4))
    heatmap[0, 0], heatmap[1, 1], heatmap[3, 3] = 1.0, 0.6, 0.9
    assert peak_component(heatmap, 0.5).sum() == 2  # (0,0) and its diagonal neighbour (1,1)
    assert peak_component(heatmap, 0.95).sum() == 1  # the peak alone
    assert not peak_component(np.zeros((3, 3)), 0.5).any()
    assert not peak_component(np.zeros((3, 3)), 0.0).any()  # an all-zero map has no peak at any threshold
    assert not peak_component(heatmap * 0.4, 0.5).any()  # maximum below the threshold


def test_normalize_maps_uses_kept_positions_only():
    cams = torch.tensor([[[[2.0, 4.0], [-10.0, 3.0]]]])
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
    expected = torch.tensor([[[[0.0, 1.0], [0.0, 0.5]]]])
    assert torch.allclose(normalize_maps(cams, masks), expected)
    assert torch.equal(normalize_maps(torch.full((1, 1, 2, 2), 3.0)), torch.zeros(1, 1, 2, 2))


def test_erased_logits_match_eq_1_and_2_written_out():
    torch.manual_seed(0)
    n, d, c, h, w = 3, 5, 4, 3, 2
    features, weights, bias = torch.rand(n, d, h, w), torch.randn(c, d), torch.randn(c)
    masks = (torch.rand(n, c, h, w) > 0.4).float()
    expected = torch.empty(n, c)
    for k in range(c):
        erased = features * masks[:, k : k + 1]  # Eq. 1: M^c replicated over D
        pooled = erased.mean(dim=(2, 3))  # g
        expected[:, k] = pooled @ weights[k] + bias[k]  # Eq. 2's (w^c)^T g(X-hat^c)
    assert torch.allclose(erased_logits(features, weights, bias, masks), expected, atol=1e-6)


def test_cam_and_mask_shapes_are_checked():
    with pytest.raises(ValueError, match="masks must be"):
        class_activation_maps(torch.rand(2, 3, 4, 4), torch.rand(5, 3), torch.ones(2, 5, 2, 2))
    with pytest.raises(ValueError, match="branch weights"):
        class_activation_maps(torch.rand(2, 3, 4, 4), torch.rand(5, 4))


def test_eq8_on_hand_made_arrays():
    h1 = torch.tensor([[1.0, 0.5], [0.0, 0.2]])
    m1 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    h2 = torch.tensor([[0.0, 1.0], [0.4, 0.0]])
    m2 = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    h3 = torch.tensor([[0.0, 0.0], [1.0, 0.6]])
    # T = 2: (H1 + (H2 + H1 * (1 - M1))) / 2
    assert torch.allclose(final_heatmap([h1, h2], [m1]), torch.tensor([[1.0, 0.75], [0.2, 0.1]]))
    # T = 3 adds H3 + H1 * (1 - M1) + H2 * (1 - M2) = [[1, 1], [1, .6]]
    expected = (torch.tensor([[2.0, 1.5], [0.4, 0.2]]) + torch.tensor([[1.0, 1.0], [1.0, 0.6]])) / 3
    assert torch.allclose(final_heatmap([h1, h2, h3], [m1, m2]), expected)
    assert torch.equal(final_heatmap([h1], []), h1)
    with pytest.raises(ValueError):
        final_heatmap([h1, h2, h3], [m1])


@pytest.mark.parametrize("name,layer", [("baseline", "trunk.layer4"), ("msa", "msa")])
def test_cam_equals_gradcam_up_to_scale(name, layer):
    """GradCAM's channel weights are the mean gradient of the logit, w_c / (h w) for a
    GAP-linear head, so its map is ReLU(CAM) / (h w); after pytorch-grad-cam's own min-max,
    resize and final min-max (its multi-layer aggregation) both must agree."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(1)
    model = create_model(ModelConfig(name=name, trunk="resnet18")).eval()
    images = torch.randn(2, 1, 96, 96)
    target_layer = model.get_submodule(layer)
    for finding in (0, 9):
        with GradCAM(model=model, target_layers=[target_layer]) as gradcam:
            reference = gradcam(input_tensor=images, targets=[ClassifierOutputTarget(finding)] * 2)
        with torch.no_grad():
            cams = model.cams(model.forward_features(images).features)[:, finding]
        ours = scale_cam_image(scale_cam_image(torch.relu(cams).numpy(), target_size=(96, 96)))
        assert reference.shape == ours.shape == (2, 96, 96)
        assert np.allclose(reference, ours, atol=1e-4)
