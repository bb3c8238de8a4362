"""Model registry: every model's feature shapes, the grayscale stem, weights loading."""

import pytest
import torch
from torchvision import models as tv

from cxr_miner.miner.models import MODELS, ModelConfig, adapt_stem, create_model, normalize_input


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("trunk", ["resnet18", "resnet50"])
def test_every_model_exposes_its_maps(name, trunk):
    model = create_model(ModelConfig(name=name, trunk=trunk)).eval()
    with torch.no_grad():
        out = model.forward_features(normalize_input(torch.randint(0, 256, (2, 128, 128), dtype=torch.uint8)))
    side = 128 // model.stride
    channels = {"baseline": 512 if trunk == "resnet18" else 2048}.get(name, 768)
    assert out.features.shape == (2, channels, side, side)
    assert out.layer4.shape[-1] == 4 and out.layer3.shape[-1] == 8
    assert out.logits.shape == (2, 14)
    # the logits are GAP then the branches: CAM averaged over positions plus the bias
    cams = model.cams(out.features)
    assert torch.allclose(cams.mean(dim=(2, 3)) + model.branches.bias, out.logits, atol=1e-4)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: \\['baseline', 'msa', 'msa-deconv'\\]"):
        create_model(ModelConfig(name="vgg"))
    with pytest.raises(ValueError, match="unknown trunk 'resnet101'"):
        create_model(ModelConfig(trunk="resnet101"))


def test_grayscale_stem_equals_rgb_stem_on_replicated_channels():
    conv = tv.resnet18(weights=None).conv1
    gray = adapt_stem(conv)
    image = torch.randn(2, 1, 32, 32)
    assert torch.allclose(gray(image), conv(image.expand(-1, 3, -1, -1)), atol=1e-5)


def test_trunk_weights_load_from_a_torchvision_state_dict():
    torch.manual_seed(0)
    source = tv.resnet18(weights=None)
    model = create_model(ModelConfig(name="baseline", trunk="resnet18"), trunk_weights=source.state_dict())
    assert torch.equal(model.trunk.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.allclose(model.trunk.stem[0].weight, source.conv1.weight.sum(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="do not fit a torchvision resnet50"):
        create_model(ModelConfig(name="baseline", trunk="resnet50"), trunk_weights=source.state_dict())


def test_normalize_input_refuses_colour_images():
    with pytest.raises(ValueError, match="\\(N, S, S\\) or \\(N, 1, S, S\\)"):
        normalize_input(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    assert normalize_input(torch.full((1, 4, 4), 255, dtype=torch.uint8)).shape == (1, 1, 4, 4)


@pytest.mark.parametrize(
    "trunk, channels", [("resnet10", (128, 256)), ("resnet18", (128, 256)), ("resnet50", (512, 1024))]
)
def test_three_stages_halve_the_stride(trunk, channels):
    """stages = 3 drops ResNet's last stage: MSA joins layer2 and layer3, X at stride 8."""
    model = create_model(ModelConfig(name="msa", trunk=trunk, stages=3)).eval()
    assert model.trunk.layer4 is None and model.trunk.channels == channels and model.stride == 8
    with torch.no_grad():
        out = model.forward_features(normalize_input(torch.randint(0, 256, (1, 64, 64), dtype=torch.uint8)))
    assert out.layer3.shape[1:] == (channels[0], 8, 8) and out.layer4.shape[1:] == (channels[1], 4, 4)
    assert out.features.shape == (1, 768, 8, 8)
    assert create_model(ModelConfig(name="baseline", trunk=trunk, stages=3)).stride == 16
    with pytest.raises(ValueError, match="stages must be 3 or 4"):
        ModelConfig(stages=2)


def test_resnet10_has_one_block_per_stage_and_no_imagenet_weights():
    from cxr_miner.miner.models import imagenet_weights

    trunk = create_model(ModelConfig(trunk="resnet10")).trunk
    assert [len(layer) for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="no ImageNet weights"):
        imagenet_weights("resnet10")


@pytest.mark.parametrize("name, stages, size", [("msa", 3, 128), ("msa-deconv", 3, 128), ("baseline", 4, 256)])
def test_a_feature_cell_is_centred_on_the_input_pixel_registration_says(name, stages, size):
    """What the heatmap upsampling assumes (miner.registration: cell j of a stride-s map on input
    pixel s j), checked against the network itself: the centroid of |d X[:, j, j] / d input| of a
    random network. The centre-aligned convention, s (j + 1/2), is (s - 1) / 2 px off."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, trunk="resnet10", stages=stages)).eval()
    images = torch.randn(8, 1, size, size, requires_grad=True)
    features = model.forward_features(images).features
    s, j = model.stride, features.shape[-1] // 2
    features[:, :, j, j].sum().backward()
    weight = images.grad.abs().sum(dim=(0, 1))
    centre = torch.arange(size) + 0.5
    centroid = ((weight.sum(0) * centre).sum() / weight.sum(), (weight.sum(1) * centre).sum() / weight.sum())
    assert all(abs(float(c) - (s * j + 0.5)) < s / 4 for c in centroid), (s, j, centroid)
