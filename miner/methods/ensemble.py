"""Method ``ensemble``: the mean of the heatmaps of the CAM baseline, attention mining at every
t = 2..T and Grad-CAM++, each normalised to [0, 1] first (issue 39).

No paper defines it: it is a candidate like the others, boxed by every rule and kept for a finding
only where box-val prefers it beyond its noise (miner.tuning). Its members are the run's own
methods on the same features X, so every map is on one grid: H_1 (Eq. 7), Eq. 8 over H_1..H_t for
each t (miner.methods.attention), Grad-CAM++'s map (miner.methods.gradcam_pp); their mean is
normalised again, as each member's is. It trains nothing of its own: the AM run's checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cxr_miner.miner.cam import normalize_maps
from cxr_miner.miner.methods.attention import AttentionMining
from cxr_miner.miner.methods.gradcam_pp import GradCamPlusPlus
from cxr_miner.miner.methods.registry import LocalizationMethod, Select, TrainingStep, register_method
from cxr_miner.miner.models import CamClassifier


@register_method
class HeatmapEnsemble(LocalizationMethod[CamClassifier]):
    name = "ensemble"
    description = "mean of the normalised CAM, AM (t = 2..T) and Grad-CAM++ heatmaps"
    needs_gradients = True  # Grad-CAM++'s member

    @property
    def label(self) -> str:
        return "ensemble (CAM, AM, Grad-CAM++)"

    def checkpoints(self) -> tuple[str, ...]:
        return AttentionMining(self.config).checkpoints()

    def training_plan(self, for_release: bool = True) -> tuple[TrainingStep, ...]:
        """Attention mining's: step 1, then AM steps 2..T."""
        return AttentionMining(self.config).training_plan(for_release)

    def harvest_fallback(self, present: Callable[[tuple[str, ...]], bool]) -> bool:
        """Never the untuned findings' method: nothing on box-val chose it for them."""
        return False

    def members(
        self, models: Sequence[CamClassifier], images: torch.Tensor, select: Select | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each member's normalised maps {variant: (N, C, h, w)} and the step-1 logits (N, C)."""
        with torch.no_grad():  # attention mining needs no gradient; only Grad-CAM++ does
            maps, logits = AttentionMining(self.config).variant_maps(models, images, select)
        maps["gradcam-pp"], _ = GradCamPlusPlus(self.config).heatmaps(models[:1], images, select)
        return maps, logits

    def heatmaps(
        self, models: Sequence[CamClassifier], images: torch.Tensor, select: Select | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' mean, normalised to [0, 1]: (N, C, h, w); step-1 logits (N, C)."""
        maps, logits = self.variant_maps(models, images, select)
        return maps[self.variant], logits

    def provides(self) -> tuple[str, ...]:
        """Its members' variants and its own: one pass gives them all (the harvest makes one pass
        where a finding chose the ensemble and another a member)."""
        return (*AttentionMining(self.config).provides(), "gradcam-pp", self.variant)

    def variant_maps(
        self, models: Sequence[CamClassifier], images: torch.Tensor, select: Select | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every member's maps and their normalised mean, from one pass."""
        maps, logits = self.members(models, images, select)
        maps[self.variant] = normalize_maps(torch.stack([m.float() for m in maps.values()]).mean(dim=0))
        return maps, logits
