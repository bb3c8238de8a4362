"""Method ``mil``: the MIL patch model of Li et al. 2018 (miner.mil), boxed by its own rule.

Its heatmap is the patch probabilities p (N, K, P, P) drawn as blocks on the network input, each
patch covering its input pixels (miner.mil: patch (r, c) is [c S/P, (c + 1) S/P) x [r S/P, (r + 1)
S/P)), so that the region rule of section 3.3 (miner.rules.REGION_RULE: the parts of p >= 0.5,
ranked by their patches' mean) finds exactly the patch region's parts. The maps are absolute
probabilities, not normalised per image as CAMs are. The image score is Eq. 2.

Checkpoints: ``mil`` learns from box-val's boxes and is scored on box-test; with ``box_folds`` K,
``mil-fold<k>`` learns from the boxes outside fold k and is scored on fold k (evaluate reports
the mean over folds); ``mil-all`` learns from every box and is the one releases use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cxr_miner.miner.localize import Localization
from cxr_miner.miner.methods.registry import (
    BatchLocalization,
    LocalizationMethod,
    Select,
    TrainingStep,
    register_method,
)
from cxr_miner.miner.mil import PatchModel, image_logits
from cxr_miner.miner.rules import REGION_RULE
from cxr_miner.miner.training import TrainConfig, autocast, prepare_images
from cxr_miner.storage.vocab.letterbox import Letterbox

RELEASE_CHECKPOINT = "mil-all"
EVALUATED_CHECKPOINT = "mil"
FOLD_PREFIX = "mil-fold"


def fold_checkpoint(fold: int) -> str:
    """The checkpoint of the model that holds out fold ``fold`` (1-based)."""
    return f"{FOLD_PREFIX}{fold}"


def checkpoint_fold(name: str) -> int | None:
    """``mil-fold3`` -> 3; any other name -> None."""
    return (
        int(name.removeprefix(FOLD_PREFIX))
        if name.startswith(FOLD_PREFIX) and name[len(FOLD_PREFIX) :].isdigit()
        else None
    )


def patch_maps(probabilities: torch.Tensor, input_size: int) -> torch.Tensor:
    """(N, K, P, P) -> (N, K, S, S): each patch's probability on the input pixels it covers
    (nearest: input pixel x lies in patch floor(x P / S))."""
    return F.interpolate(probabilities, size=(input_size, input_size), mode="nearest")


@register_method
class PatchMil(LocalizationMethod[PatchModel]):
    name = "mil"
    description = "the MIL patch model (Li et al. 2018): Eq. 2's image score, the parts of the patch region >= 0.5"
    paper_rule = REGION_RULE
    network = "patch"
    learns_from_boxes = True
    fallback_order = 2

    def __init__(self, config: TrainConfig, fold: int | None = None) -> None:
        super().__init__(config)
        if fold is not None and not 1 <= fold <= config.box_folds:
            raise ValueError(f"MIL fold {fold}: the run has box_folds = {config.box_folds}")
        self.fold = fold

    @property
    def label(self) -> str:
        return "MIL" if self.fold is None else f"MIL (fold {self.fold})"

    def checkpoints(self) -> tuple[str, ...]:
        """The model evaluate scores: ``mil``, or this fold's; for a K-fold run as a whole, all K
        (what ``train`` trains)."""
        if self.fold is not None:
            return (fold_checkpoint(self.fold),)
        if self.config.box_folds:
            return tuple(fold_checkpoint(k) for k in range(1, self.config.box_folds + 1))
        return (EVALUATED_CHECKPOINT,)

    def release_checkpoints(self) -> tuple[str, ...]:
        return (RELEASE_CHECKPOINT,)

    def training_plan(self, for_release: bool = True) -> tuple[TrainingStep, ...]:
        """The model evaluate scores (``mil``, or one per fold) and, ``for_release``, ``mil-all``."""
        names = (*self.checkpoints(), *((RELEASE_CHECKPOINT,) if for_release else ()))
        return tuple(TrainingStep("patch", name) for name in names)

    def variants(self) -> list[LocalizationMethod[PatchModel]]:
        """Itself; none for a K-fold run, whose folds evaluate scores one by one (``fold``)."""
        return [] if self.config.box_folds and self.fold is None else [self]

    def heatmaps(
        self, models: Sequence[PatchModel], images: torch.Tensor, select: Select | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch probabilities drawn on the input (patch_maps): (N, K, S, S) in [0, 1]; Eq. 2's logits (N, K)."""
        patch_logits = models[0].patches(images).float()
        return patch_maps(torch.sigmoid(patch_logits), images.shape[-1]), image_logits(patch_logits)

    def localize_batch(
        self, models: Sequence[PatchModel], images: torch.Tensor, letterboxes: Sequence[Letterbox], select: Select
    ) -> BatchLocalization:
        """Shard images uint8 (N, S, S) -> the region rule's boxes per wanted pair, in source pixels."""
        device = next(models[0].parameters()).device
        x = prepare_images(images, self.config.input_size, device)
        with self.inference(), autocast(device, self.config.precision):
            maps, logits = self.heatmaps(models, x, select)
        wanted = select(logits).cpu().numpy()
        found: list[dict[int, Localization]] = [{} for _ in range(len(wanted))]
        for i, c in zip(*wanted.nonzero()):
            candidates, source = REGION_RULE.in_source(
                REGION_RULE.boxes(maps[i, c].cpu().numpy()), self.config.input_size, letterboxes[i]
            )
            found[i][int(c)] = Localization(source, candidates.score)
        return BatchLocalization(torch.sigmoid(logits.float()).cpu().numpy(), wanted, found, maps)
