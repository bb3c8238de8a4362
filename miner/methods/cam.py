"""Method ``cam``: the CAM baseline (Wang et al. 2017), the step-1 classifier's class activation maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cxr_miner.miner.attention import mine
from cxr_miner.miner.cam import normalize_maps
from cxr_miner.miner.methods.registry import LocalizationMethod, Select, register_method
from cxr_miner.miner.models import CamClassifier


@register_method
class CamBaseline(LocalizationMethod[CamClassifier]):
    name = "cam"
    description = "the CAM baseline (step 1 alone)"
    fallback_order = 1

    @property
    def label(self) -> str:
        return "CAM baseline"

    def checkpoints(self) -> tuple[str, ...]:
        return ("step1",)

    def heatmaps(
        self, models: Sequence[CamClassifier], images: torch.Tensor, select: Select | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """H_1 (Eq. 7 with M_0 all ones), normalised to [0, 1]: (N, C, h, w); logits (N, C)."""
        mining = mine(models[:1], images, select)
        return normalize_maps(mining.heatmaps[0]), mining.logits
