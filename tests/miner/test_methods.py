"""The localisation-method registry: every registered method on one batch, the registry's
errors, and a method added from outside (a known heatmap) whose boxes are worked out by hand."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from cxr_miner.miner.methods import (
    LocalizationMethod,
    check_method,
    create_method,
    method_names,
    register_method,
    registry,
)
from cxr_miner.miner.models import create_model, normalize_input
from cxr_miner.miner.training import create_network, preset
from cxr_miner.storage.vocab.letterbox import Letterbox

CONFIG = preset("cpu-small").updated({"input_size": 64, "am_steps": 3})


def test_the_registry_lists_the_baseline_first_and_refuses_unknown_names():
    assert method_names()[:2] == ("cam", "am")
    with pytest.raises(ValueError, match="unknown method 'grad'; known: cam, am"):
        check_method("grad")
    assert create_method("mil", CONFIG).checkpoints() == ("mil",)
    assert create_method("mil", CONFIG.updated({"box_folds": 3})).checkpoints() == ("mil-fold1", "mil-fold2", "mil-fold3")
    assert create_method("mil", CONFIG).release_checkpoints() == ("mil-all",)
    with pytest.raises(ValueError, match="registered twice"):
        register_method(type(create_method("cam", CONFIG)))


def test_methods_name_their_checkpoints_evaluation_keys_and_variants():
    cam, am = create_method("cam", CONFIG), create_method("am", CONFIG)
    assert (cam.checkpoints(), cam.key, cam.label) == (("step1",), "cam", "CAM baseline")
    assert (am.checkpoints(), am.key, am.label) == (("step1", "step2", "step3"), "am-t3", "AM (t = 3)")
    assert [v.key for v in am.variants()] == ["am-t2", "am-t3"] and [v.checkpoints()[-1] for v in am.variants()] == ["step2", "step3"]
    with pytest.raises(ValueError, match="am_steps = 3"):
        create_method("am", CONFIG, steps=4)


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_boxes_exactly_the_wanted_pairs_inside_the_source(name):
    method = create_method(name, CONFIG)
    torch.manual_seed(0)
    models = [create_network(CONFIG, method.network).eval() for _ in method.checkpoints()]
    images = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8)
    if method.network == "patch":  # centre each finding's patch logits on 0: some patches above 0.5, so the region has parts
        with torch.no_grad():
            models[0].head.classify.bias -= models[0].patches(normalize_input(images)).mean(dim=(0, 2, 3))
    letterboxes = [Letterbox.fit(100, 80, 64), Letterbox.fit(64, 64, 64)]
    wanted = torch.zeros(2, 14, dtype=torch.bool)
    wanted[0, 1] = wanted[1, 4] = wanted[1, 9] = True
    result = method.localize_batch(models, images, letterboxes, lambda logits: wanted)
    # Eq. 2 over 64 patches near 0.5 is 1 - 0.5^64: 1.0 in float32
    assert result.probability.shape == (2, 14) and np.all((result.probability > 0) & (result.probability <= 1))
    assert np.array_equal(result.wanted, wanted.numpy())
    assert [sorted(found) for found in result.found] == [[1], [4, 9]]
    for found, letterbox in zip(result.found, letterboxes):
        for loc in found.values():
            assert 1 <= len(loc.boxes) <= len(method.thresholds) and list(loc.scores) == sorted(loc.scores, reverse=True)
            assert np.all(loc.boxes[:, :2] >= 0) and np.all(loc.boxes[:, 2] <= letterbox.source_width)
            assert np.all(loc.boxes[:, 3] <= letterbox.source_height) and np.all(loc.boxes[:, 2:] > loc.boxes[:, :2])


class KnownBlob(LocalizationMethod):
    """A method from outside the package: every map is 1 on feature cells rows 2..4, columns 1..3
    of an 8 x 8 grid, 0 elsewhere."""

    name = "known-blob"
    description = "a test method"

    def checkpoints(self) -> tuple[str, ...]:
        return ("blob",)

    def heatmaps(self, models: Sequence[torch.nn.Module], images: torch.Tensor, select) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.zeros(len(images), 14, 8, 8)
        maps[:, :, 2:5, 1:4] = 1.0
        return maps, torch.zeros(len(images), 14)


@pytest.fixture
def known_blob():
    register_method(KnownBlob)
    yield create_method("known-blob", CONFIG)
    registry._REGISTRY.pop("known-blob")


def test_a_method_registered_from_outside_boxes_its_blob_in_source_pixels(known_blob):
    """Input 64 px: stride 8, cell j centred on input pixel 8j, so the bilinear map is 0.5 halfway
    between cells 0 and 1 (pixel 4) and between cells 3 and 4 (pixel 28), both kept by ``>=``:
    x 4..29, y 12..37 on the input grid. A 128 x 64 source letterboxed to 64 px has scale 0.5
    and offset_y 16, so that box is (8, 0, 58, 42) in source pixels."""
    assert "known-blob" in method_names()
    letterbox = Letterbox.fit(128, 64, 64)
    assert (letterbox.scale_x, letterbox.offset_x, letterbox.offset_y) == (0.5, 0, 16)
    wanted = torch.zeros(1, 14, dtype=torch.bool)
    wanted[0, 2] = True
    result = known_blob.localize_batch([torch.nn.Linear(1, 1)], torch.zeros(1, 64, 64, dtype=torch.uint8), [letterbox],
                                       lambda logits: wanted)
    (loc,) = result.found[0].values()
    assert [8.0, 0.0, 58.0, 42.0] in loc.boxes.tolist()
    outer = np.array([8.0, 0.0, 58.0, 42.0])
    assert np.all(loc.boxes[:, :2] >= outer[:2]) and np.all(loc.boxes[:, 2:] <= outer[2:])  # the others nest inside
    assert result.probability[0, 2] == 0.5


def test_one_am_pass_gives_every_variants_heatmaps():
    """AM over 3 steps provides the CAM baseline's and AM t = 2's maps: equal to their own passes."""
    torch.manual_seed(1)
    models = [create_model(CONFIG.model).eval() for _ in range(3)]
    x = torch.randn(2, 1, 64, 64)
    select = lambda logits: torch.ones_like(logits, dtype=torch.bool)  # noqa: E731
    am = create_method("am", CONFIG)
    assert am.provides() == ("cam", "am-t2", "am-t3") and create_method("cam", CONFIG).provides() == ("cam",)
    with torch.no_grad():
        maps, _ = am.variant_maps(models, x, select)
        separate = {"cam": create_method("cam", CONFIG).heatmaps(models[:1], x, select)[0]}
        separate.update({v.key: v.heatmaps(models[: v.steps], x, select)[0] for v in am.variants()})
    assert set(maps) == set(separate)
    for key in maps:
        torch.testing.assert_close(maps[key], separate[key])


def test_the_tuned_localiser_boxes_each_finding_by_its_choice():
    """Mass by the CAM baseline with the every-component rule and a calibration, Nodule by AM t = 2
    with the paper's rule; the other findings by the default. One AM t = 2 pass serves all three."""
    from cxr_miner.miner.calibration import Calibration, box_signals
    from cxr_miner.miner.localize import boxes_in_source, upsample
    from cxr_miner.miner.methods import FindingChoice, TunedLocalizer
    from cxr_miner.miner.rules import PAPER_RULE, rule_by_name
    from cxr_miner.storage.vocab.findings import FINDINGS

    calibration = Calibration("platt", -0.5, coef=(2.0, 0.0, 0.0, -0.5, 1.0))
    choices = {"Mass": FindingChoice("cam", rule_by_name("every-peak"), calibration, 0.4), "Nodule": FindingChoice("am-t2")}
    tuned = TunedLocalizer(CONFIG, choices, FindingChoice("cam"))
    assert [p.key for p in tuned.providers] == ["am-t2"] and tuned.checkpoints() == ("step1", "step2")
    assert TunedLocalizer.from_key(CONFIG, tuned.key()).key() == tuned.key()
    torch.manual_seed(2)
    models = [create_model(CONFIG.model).eval() for _ in range(2)]
    images = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8)
    letterboxes = [Letterbox.fit(100, 80, 64), Letterbox.fit(64, 64, 64)]
    wanted = torch.zeros(2, 14, dtype=torch.bool)
    wanted[0, FINDINGS.index("Mass")] = wanted[1, FINDINGS.index("Nodule")] = wanted[1, FINDINGS.index("Edema")] = True
    result = tuned.localize_batch(models, images, letterboxes, lambda logits: wanted)
    from cxr_miner.miner.training import prepare_images

    with torch.no_grad():
        maps, _ = create_method("am", CONFIG, steps=2).variant_maps(models, prepare_images(images, 64, torch.device("cpu")), None)
    mass = result.found[0][FINDINGS.index("Mass")]
    expected = rule_by_name("every-peak").boxes(upsample(maps["cam"][0, FINDINGS.index("Mass")], 64).numpy())
    signals = box_signals(expected.mean, expected.peak, expected.area, result.probability[0, FINDINGS.index("Mass")])
    order = np.argsort(-calibration.predict(signals), kind="stable")  # ranked by confidence
    np.testing.assert_allclose(mass.confidence, calibration.predict(signals)[order])
    np.testing.assert_allclose(mass.boxes, boxes_in_source(expected.boxes, 64, letterboxes[0])[order])
    assert mass.rule_rank.tolist() == (order + 1).tolist()
    assert mass.variant == "cam" and list(mass.at_operating_point) == list(mass.confidence >= 0.4)
    nodule = result.found[1][FINDINGS.index("Nodule")]
    paper = PAPER_RULE.boxes(upsample(maps["am-t2"][1, FINDINGS.index("Nodule")], 64).numpy())
    np.testing.assert_allclose(nodule.boxes, boxes_in_source(paper.boxes, 64, letterboxes[1]))
    assert nodule.variant == "am-t2" and np.isnan(nodule.confidence).all() and not nodule.at_operating_point.any()
    assert result.found[1][FINDINGS.index("Edema")].variant == "cam"


def test_the_tuned_localiser_sizes_a_prior_rules_boxes():
    """A prior rule's choice boxes each component by its box size at the centroid, in source pixels."""
    from cxr_miner.miner.localize import upsample
    from cxr_miner.miner.methods import FindingChoice, TunedLocalizer
    from cxr_miner.miner.rules import rule_by_name
    from cxr_miner.storage.vocab.findings import FINDINGS

    rule = rule_by_name("every-peak-prior")
    tuned = TunedLocalizer(CONFIG, {"Mass": FindingChoice("cam", rule, box_size=(0.1, 0.05))}, FindingChoice("cam"))
    torch.manual_seed(4)
    models = [create_model(CONFIG.model).eval()]
    images = torch.randint(0, 256, (1, 64, 64), dtype=torch.uint8)
    letterbox = Letterbox.fit(200, 160, 64)
    wanted = torch.zeros(1, 14, dtype=torch.bool)
    wanted[0, FINDINGS.index("Mass")] = True
    mass = tuned.localize_batch(models, images, [letterbox], lambda logits: wanted).found[0][FINDINGS.index("Mass")]
    from cxr_miner.miner.training import prepare_images

    with torch.no_grad():
        maps, _ = create_method("cam", CONFIG).heatmaps(models, prepare_images(images, 64, torch.device("cpu")), None)
    _, expected = rule.in_source(rule.boxes(upsample(maps[0, FINDINGS.index("Mass")], 64).numpy()), 64, letterbox, (0.1, 0.05))
    np.testing.assert_allclose(mass.boxes, expected)
    inside = (mass.boxes[:, 0] > 0) & (mass.boxes[:, 2] < 200) & (mass.boxes[:, 1] > 0) & (mass.boxes[:, 3] < 160)
    np.testing.assert_allclose((mass.boxes[inside, 2:] - mass.boxes[inside, :2]), np.tile([20.0, 8.0], (inside.sum(), 1)))
    assert 1 <= len(mass.boxes) <= 3 and inside.any()
