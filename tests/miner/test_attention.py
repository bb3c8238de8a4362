"""AM steps, KP-Vanilla's split and the KP loss (Eq. 4-6) on cases worked by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cxr_miner.miner.attention import attention_mining_loss, erased_count, kp_distance, kp_loss, mine
from cxr_miner.miner.cam import final_heatmap
from cxr_miner.miner.models import Features, ModelConfig, create_model


@pytest.mark.parametrize(
    "batch,mode,expected",
    [(64, "vanilla", 8), (64, "kp", 8), (64, "none", 64), (32, "kp", 4), (4, "vanilla", 1), (1, "kp", 1)],
)
def test_kp_vanilla_erases_the_first_eighth(batch, mode, expected):
    assert erased_count(batch, mode) == expected


def test_unknown_kp_mode_is_refused():
    with pytest.raises(ValueError, match="unknown KP mode 'soft'"):
        erased_count(8, "soft")


def test_kp_distance_by_hand():
    # logits of N - n = 2 images: difference [[0, 0], [0, 2]], l2 norm 2, divided by 2
    frozen = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert kp_distance(frozen, torch.tensor([[1.0, 2.0], [3.0, 2.0]])).item() == pytest.approx(1.0)
    # feature maps: GAP first. Image 0 means 1 vs 2 (diff 1), image 1 means 0 vs 0: norm 1 / 2
    a = torch.zeros(2, 1, 2, 2)
    a[0] = 1.0
    b = torch.zeros(2, 1, 2, 2)
    b[0, 0, 0, 0] = 8.0
    assert kp_distance(a, b).item() == pytest.approx(0.5)


def test_kp_loss_is_the_mean_over_the_chosen_layers():
    z = torch.zeros(2, 3, 2, 2)
    frozen = Features(z, z, z, torch.zeros(2, 2))
    layer4 = torch.ones(2, 3, 2, 2)  # GAP rows of norm sqrt(3); two rows: sqrt(6) / 2
    msa_like = Features(z, layer4, z, torch.tensor([[0.0, 0.0], [0.0, 4.0]]))  # 4 / 2 = 2
    assert kp_loss(frozen, msa_like).item() == pytest.approx((0 + 6**0.5 / 2 + 0 + 2) / 4)
    assert kp_loss(frozen, msa_like, ("layer4", "logits")).item() == pytest.approx((6**0.5 / 2 + 2) / 2)
    assert create_model(ModelConfig(name="baseline", trunk="resnet18")).kp_layers == ("layer3", "layer4", "logits")


def small_model(name="msa", seed=0):
    torch.manual_seed(seed)
    return create_model(ModelConfig(name=name, trunk="resnet18")).eval()


def test_mining_steps_erase_more_each_step_and_heatmaps_respect_masks():
    models = [small_model(seed=0), small_model(seed=1), small_model(seed=2)]
    images = torch.randn(3, 1, 128, 128)
    result = mine(models, images)
    assert len(result.heatmaps) == len(result.masks) == 3
    assert result.heatmaps[0].shape == (3, 14, 8, 8)
    for t in range(1, 3):
        assert torch.all(result.masks[t] <= result.masks[t - 1])  # erasure accumulates
        assert torch.all(result.heatmaps[t][result.masks[t - 1] == 0] == 0)  # H_t sees X * M_{t-1}
        assert (result.masks[t].sum() < result.masks[t - 1].sum()).item()
    final = final_heatmap(result.heatmaps, result.masks)
    assert final.shape == (3, 14, 8, 8) and float(final.min()) >= 0 and float(final.max()) <= 1 + 1e-6


def test_selected_pairs_get_the_same_final_heatmaps_as_a_full_mining():
    """Erasure is class-wise, so mining only some (image, class) pairs changes none of their maps."""
    models = [small_model(seed=0), small_model(seed=1), small_model(seed=2)]
    images = torch.randn(3, 1, 128, 128)
    wanted = torch.zeros(3, 14, dtype=torch.bool)
    wanted[0, 1] = wanted[2, 5] = wanted[2, 13] = True
    full = mine(models, images)
    some = mine(models, images, select=lambda logits: wanted)
    assert torch.equal(
        final_heatmap(some.heatmaps, some.masks)[wanted], final_heatmap(full.heatmaps, full.masks)[wanted]
    )
    assert torch.all(some.masks[-1][~wanted] == 1)  # the others were never erased


def test_mining_without_the_last_mask_gives_the_same_heatmaps_and_the_masks_before_it():
    """Eq. 8 reads M_1..M_{T-1}: inference leaves M_T out and its maps do not change."""
    models = [small_model(seed=0), small_model(seed=1), small_model(seed=2)]
    images = torch.randn(2, 1, 128, 128)
    full, inference = mine(models, images), mine(models, images, last_mask=False)
    assert len(inference.masks) == 2 and all(torch.equal(a, b) for a, b in zip(inference.masks, full.masks))
    assert all(torch.equal(a, b) for a, b in zip(inference.heatmaps, full.heatmaps))
    assert torch.equal(final_heatmap(inference.heatmaps, inference.masks), final_heatmap(full.heatmaps, full.masks))
    assert len(mine(models[:1], images, last_mask=False).masks) == 0  # the CAM baseline erases nothing


def test_am_loss_vanilla_is_bce_over_erased_head_and_untouched_tail():
    model = small_model("baseline", seed=3)
    chain = [copy.deepcopy(model)]
    images = torch.randn(16, 1, 64, 64)
    labels = (torch.rand(16, 14) > 0.7).float()
    loss = attention_mining_loss(model, chain, images, labels, kp="vanilla")
    assert loss.erased == 2 and loss.kp.item() == 0
    with torch.no_grad():
        masks = mine(chain, images[:2]).masks[-1]
        features = model.forward_features(images)
        logits = torch.cat([model.erased_logits(features.features[:2], masks), features.logits[2:]])
    assert loss.total.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, labels).item(), rel=1e-5)


def test_am_loss_takes_the_classification_loss_it_is_given():
    """With W-CEL as L_cls (a run whose step 1 learnt by it), the erased head and untouched tail are
    scored by W-CEL over the whole batch's labels."""
    from cxr_miner.miner.attention import weighted_classification_loss
    from cxr_miner.miner.training import am_classification_loss, preset

    model = small_model("baseline", seed=3)
    chain = [copy.deepcopy(model)]
    images, labels = torch.randn(16, 1, 64, 64), (torch.rand(16, 14) > 0.7).float()
    loss = attention_mining_loss(model, chain, images, labels, kp="vanilla", cls_loss=weighted_classification_loss)
    with torch.no_grad():
        masks = mine(chain, images[:2]).masks[-1]
        features = model.forward_features(images)
        logits = torch.cat([model.erased_logits(features.features[:2], masks), features.logits[2:]])
    assert loss.total.item() == pytest.approx(weighted_classification_loss(logits, labels).item(), rel=1e-5)
    demo = preset("cpu-demo")
    assert am_classification_loss(demo.updated({"am_cls_loss": "step1"})) is weighted_classification_loss
    assert am_classification_loss(demo.updated({"am_cls_loss": "bce"})) is not weighted_classification_loss
    assert am_classification_loss(preset("paper").updated({"am_cls_loss": "step1"})) is not weighted_classification_loss


def test_kp_holds_the_model_to_the_reference_it_is_given():
    """Step 3 with KP against step 1's model (kp_reference step1) rather than step 2's: L_KP is Eq. 5
    between the updated model and that reference on the untouched rows."""
    from cxr_miner.miner.attention import batch_statistics, kp_loss, select_rows

    first, second = small_model("msa", seed=5), small_model("msa", seed=6)
    model = copy.deepcopy(second).train()  # N_B, training
    images, labels = torch.randn(16, 1, 64, 64), (torch.rand(16, 14) > 0.7).float()
    previous = attention_mining_loss(model, [first, second], images, labels, kp="kp")
    anchored = attention_mining_loss(model, [first, second], images, labels, kp="kp", reference=first)
    assert previous.kp.item() == pytest.approx(0.0, abs=1e-6)  # the model is still step 2's
    with torch.no_grad(), batch_statistics(first):
        expected = kp_loss(
            select_rows(first.forward_features(images), slice(2, None)),
            select_rows(model.forward_features(images), slice(2, None)),
            model.kp_layers,
        )
    assert anchored.kp.item() == pytest.approx(expected.item(), rel=1e-5) and anchored.kp.item() > 1e-3


def test_kp_term_is_zero_before_any_update_and_positive_after_one():
    model = small_model("msa", seed=4)
    chain = [copy.deepcopy(model)]
    model.train()  # N_B, training; N_A frozen as loaded
    images, labels = torch.randn(16, 1, 64, 64), (torch.rand(16, 14) > 0.7).float()
    before = attention_mining_loss(model, chain, images, labels, kp="kp")
    assert before.kp.item() == pytest.approx(0.0, abs=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before.total.backward()
    optimizer.step()
    after = attention_mining_loss(model, chain, images, labels, kp="kp")
    assert after.kp.item() > 1e-4
    assert after.total.item() == pytest.approx(after.cls.item() + 0.5 * after.kp.item(), rel=1e-5)


@pytest.mark.parametrize("norm", ["batch", "running"])
def test_n_a_and_n_b_start_identical_when_n_a_normalises_by_the_batch(norm):
    """Section 2.2: "initially, N_A and N_B are identical". N_A is a loaded checkpoint (eval mode),
    N_B the same weights in training mode, whose BatchNorm normalises by the batch's statistics.
    N_A on the batch's statistics (kp_norm batch): L_KP is 0 before any update, and N_A's running
    statistics are untouched; on its running ones, L_KP starts at the gap between the two modes."""
    model = small_model("msa", seed=5)
    with torch.no_grad():  # running statistics of other data than the batch's, as after step 1
        model.train()(torch.randn(32, 1, 64, 64))
    reference = copy.deepcopy(model).eval()
    running = [b.clone() for name, b in reference.named_buffers() if "running" in name]
    images, labels = torch.randn(16, 1, 64, 64) * 3 + 1, (torch.rand(16, 14) > 0.7).float()
    start = attention_mining_loss(model.train(), [reference], images, labels, kp="kp", reference_norm=norm)
    if norm == "batch":
        assert start.kp.item() == pytest.approx(0.0, abs=1e-6)
    else:
        assert start.kp.item() > 1e-2
    after = [b for name, b in reference.named_buffers() if "running" in name]
    assert all(torch.equal(a, b) for a, b in zip(running, after))
    assert not any(m.training for m in reference.modules())  # its mode restored


def test_weighted_cross_entropy_by_hand():
    """W-CEL (Wang et al. 2017, Eq. 1): one positive and three negatives in the batch, so
    beta_P = 4 / 1 and beta_N = 4 / 3; the mean over the four terms."""
    import math

    from cxr_miner.miner.attention import weighted_classification_loss

    logits, labels = torch.tensor([[0.0, 2.0], [1.0, -1.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    by_hand = (4 * -math.log(sigmoid(0)) + 4 / 3 * sum(-math.log(1 - sigmoid(v)) for v in (2.0, 1.0, -1.0))) / 4
    assert float(weighted_classification_loss(logits, labels)) == pytest.approx(by_hand, rel=1e-6)
    no_positive = torch.zeros(2, 2)
    assert float(weighted_classification_loss(logits, no_positive)) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(logits, no_positive)), rel=1e-6
    )


def test_am_steps_train_by_the_optimiser_asked_for():
    """am_optimizer step1 keeps step 1's optimiser (cpu-demo: AdamW); sgd gives SGD with the run's
    momentum at am_lr; an unknown name is refused, naming it."""
    from cxr_miner.flows.train import am_schedule
    from cxr_miner.miner.training import make_optimizer, preset
    from cxr_miner.storage.vocab.errors import SettingError

    model = small_model("baseline", seed=1)
    demo = preset("cpu-demo")
    for config, kind in (
        (demo, torch.optim.AdamW),
        (demo.updated({"am_optimizer": "sgd", "am_lr": 0.01}), torch.optim.SGD),
    ):
        schedule = am_schedule(config, step=2)
        optimizer, _ = make_optimizer(model, config, schedule.lr, schedule.epochs, 4, schedule.optimizer)
        assert type(optimizer) is kind
        assert optimizer.param_groups[0]["lr"] == pytest.approx(config.am_lr)
    assert optimizer.param_groups[0]["momentum"] == demo.momentum
    with pytest.raises(SettingError, match="am_optimizer.*'rmsprop'"):
        demo.updated({"am_optimizer": "rmsprop"})
