"""The localisation-method registry: every registered method on one batch, the registry's
errors, and a method added from outside (a known heatmap) whose boxes are worked out by hand."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from cxr_miner.miner.methods import (
    TRAINERS,
    LocalizationMethod,
    TrainingStep,
    check_method,
    create_method,
    harvest_fallback,
    method_class,
    method_names,
    method_of_variant,
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
    assert create_method("mil", CONFIG.updated({"box_folds": 3})).checkpoints() == (
        "mil-fold1",
        "mil-fold2",
        "mil-fold3",
    )
    assert create_method("mil", CONFIG).release_checkpoints() == ("mil-all",)
    with pytest.raises(ValueError, match="registered twice"):
        register_method(type(create_method("cam", CONFIG)))


def test_each_method_declares_what_train_makes_for_it():
    plans = {name: create_method(name, CONFIG).training_plan() for name in ("cam", "am", "mil")}
    assert plans["cam"] == (TrainingStep("classifier", "step1", 1),)
    assert plans["am"] == (
        TrainingStep("classifier", "step1", 1),
        TrainingStep("attention", "step2", 2),
        TrainingStep("attention", "step3", 3),
    )
    assert plans["mil"] == (TrainingStep("patch", "mil"), TrainingStep("patch", "mil-all"))
    assert create_method("mil", CONFIG).training_plan(for_release=False) == (TrainingStep("patch", "mil"),)
    folds = create_method("mil", CONFIG.updated({"box_folds": 2})).training_plan()
    assert [s.checkpoint for s in folds] == ["mil-fold1", "mil-fold2", "mil-all"]
    assert {s.trainer for plan in plans.values() for s in plan} <= set(TRAINERS)
    assert [name for name in method_names() if method_class(name).learns_from_boxes] == ["mil"]


@pytest.mark.parametrize(
    ("present", "am_steps", "fallback"),
    [
        ({"step1", "step2", "step3"}, 3, "am-t3"),
        ({"step1", "step2"}, 3, "cam"),  # AM over 3 steps not trained to the end
        ({"step1"}, 1, "cam"),
        ({"mil", "mil-all"}, 3, "mil"),
        ({"step1", "mil-all"}, 3, "cam"),
        (set(), 3, "cam"),  # nothing: the baseline, whose missing step1 harvest names
    ],
)
def test_harvest_auto_boxes_an_untuned_finding_with_the_first_method_the_run_has(present, am_steps, fallback):
    config = CONFIG.updated({"am_steps": am_steps})
    assert harvest_fallback(config, lambda names: set(names) <= present).variant == fallback


def test_a_variant_name_finds_its_method():
    assert method_of_variant("am-t2", CONFIG).checkpoints() == ("step1", "step2")
    assert method_of_variant("cam", CONFIG).checkpoints() == ("step1",)
    assert method_of_variant("mil", CONFIG).release_checkpoints() == ("mil-all",)
    with pytest.raises(ValueError, match="no registered method has a variant 'am-t9'"):
        method_of_variant("am-t9", CONFIG)


def test_methods_name_their_checkpoints_evaluation_keys_and_variants():
    cam, am = create_method("cam", CONFIG), create_method("am", CONFIG)
    assert (cam.checkpoints(), cam.variant, cam.label) == (("step1",), "cam", "CAM baseline")
    assert (am.checkpoints(), am.variant, am.label) == (("step1", "step2", "step3"), "am-t3", "AM (t = 3)")
    assert [v.variant for v in am.variants()] == ["am-t2", "am-t3"] and [
        v.checkpoints()[-1] for v in am.variants()
    ] == [
        "step2",
        "step3",
    ]
    with pytest.raises(ValueError, match="am_steps = 3"):
        create_method("am", CONFIG, steps=4)


@pytest.mark.parametrize("name", method_names())
def test_every_registered_method_boxes_exactly_the_wanted_pairs_inside_the_source(name):
    method = create_method(name, CONFIG)
    torch.manual_seed(0)
    models = [create_network(CONFIG, method.network).eval() for _ in method.checkpoints()]
    images = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8)
    if (
        method.network == "patch"
    ):  # centre each finding's patch logits on 0: some patches above 0.5, so the region has parts
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
            assert 1 <= len(loc.boxes) <= len(method.thresholds) and list(loc.scores) == sorted(
                loc.scores, reverse=True
            )
            assert np.all(loc.boxes[:, :2] >= 0) and np.all(loc.boxes[:, 2] <= letterbox.source_width)
            assert np.all(loc.boxes[:, 3] <= letterbox.source_height) and np.all(loc.boxes[:, 2:] > loc.boxes[:, :2])


class KnownBlob(LocalizationMethod):
    """A method from outside the package: every map is 1 on feature cells rows 2..4, columns 1..3
    of an 8 x 8 grid, 0 elsewhere."""

    name = "known-blob"
    description = "a test method"

    def checkpoints(self) -> tuple[str, ...]:
        return ("blob",)

    def heatmaps(
        self, models: Sequence[torch.nn.Module], images: torch.Tensor, select
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
    result = known_blob.localize_batch(
        [torch.nn.Linear(1, 1)], torch.zeros(1, 64, 64, dtype=torch.uint8), [letterbox], lambda logits: wanted
    )
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
        separate.update({v.variant: v.heatmaps(models[: v.steps], x, select)[0] for v in am.variants()})
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
    choices = {
        "Mass": FindingChoice("cam", rule_by_name("every-peak"), calibration, 0.4),
        "Nodule": FindingChoice("am-t2"),
    }
    tuned = TunedLocalizer(CONFIG, choices, FindingChoice("cam"))
    assert [p.variant for p in tuned.providers] == ["am-t2"] and tuned.checkpoints() == ("step1", "step2")
    assert TunedLocalizer.from_choices(CONFIG, tuned.choices_record()).choices_record() == tuned.choices_record()
    torch.manual_seed(2)
    models = [create_model(CONFIG.model).eval() for _ in range(2)]
    images = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8)
    letterboxes = [Letterbox.fit(100, 80, 64), Letterbox.fit(64, 64, 64)]
    wanted = torch.zeros(2, 14, dtype=torch.bool)
    wanted[0, FINDINGS.index("Mass")] = wanted[1, FINDINGS.index("Nodule")] = wanted[1, FINDINGS.index("Edema")] = True
    result = tuned.localize_batch(models, images, letterboxes, lambda logits: wanted)
    from cxr_miner.miner.training import prepare_images

    with torch.no_grad():
        maps, _ = create_method("am", CONFIG, steps=2).variant_maps(
            models, prepare_images(images, 64, torch.device("cpu")), None
        )
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
    _, expected = rule.in_source(
        rule.boxes(upsample(maps[0, FINDINGS.index("Mass")], 64).numpy()), 64, letterbox, (0.1, 0.05)
    )
    np.testing.assert_allclose(mass.boxes, expected)
    inside = (mass.boxes[:, 0] > 0) & (mass.boxes[:, 2] < 200) & (mass.boxes[:, 1] > 0) & (mass.boxes[:, 3] < 160)
    np.testing.assert_allclose(
        (mass.boxes[inside, 2:] - mass.boxes[inside, :2]), np.tile([20.0, 8.0], (inside.sum(), 1))
    )
    assert 1 <= len(mass.boxes) <= 3 and inside.any()


class InputGradient(LocalizationMethod):
    """A method that differentiates: the heatmap of finding c is |d logit_c / d input|, normalised.
    Under torch.no_grad() (every method's mode before ``needs_gradients``) it cannot run."""

    name = "input-gradient"
    description = "a test method with gradients"
    needs_gradients = True

    def checkpoints(self) -> tuple[str, ...]:
        return ("gradient",)

    def heatmaps(self, models, images, select) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.detach().requires_grad_(True)
        logits = models[0](x).flatten(1)
        maps = []
        for c in range(logits.shape[1]):
            (grad,) = torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)
            maps.append(grad.abs()[:, 0])
        maps_t = torch.stack(maps, dim=1)
        peak = maps_t.flatten(2).amax(dim=2).clamp_min(1e-12)[:, :, None, None]
        return (maps_t / peak).detach(), logits.detach()


def test_a_method_that_needs_gradients_gets_them_and_boxes_where_its_gradient_is():
    """A linear model, logit c = <w_c, x>: the gradient for finding 2 is w_2, 1 on input rows
    16..31 and columns 8..23 of 64 px and 0 elsewhere. The source is 64 px square (letterbox
    identity), so the box is exactly (8, 16, 24, 32); no parameter keeps a gradient."""
    register_method(InputGradient)
    try:
        method = create_method("input-gradient", CONFIG)
        model = torch.nn.Conv2d(1, 14, kernel_size=64, bias=False).eval()
        with torch.no_grad():
            model.weight.zero_()
            model.weight[2, 0, 16:32, 8:24] = 1.0
        wanted = torch.zeros(1, 14, dtype=torch.bool)
        wanted[0, 2] = True
        images = torch.full((1, 64, 64), 128, dtype=torch.uint8)
        result = method.localize_batch([model], images, [Letterbox.fit(64, 64, 64)], lambda logits: wanted)
        (loc,) = result.found[0].values()
        assert loc.boxes[0].tolist() == [8.0, 16.0, 24.0, 32.0]
        assert model.weight.grad is None
        with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
            method.heatmaps([model], images[:, None].float(), None)
    finally:
        registry._REGISTRY.pop("input-gradient")
