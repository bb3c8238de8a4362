"""Method ``am``: iterative attention mining (Cai et al. 2018), the final heatmap of Eq. 8 over steps 1..t."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cxr_miner.miner.attention import mine
from cxr_miner.miner.cam import final_heatmap, normalize_maps
from cxr_miner.miner.methods.registry import LocalizationMethod, Select, TrainingStep, register_method
from cxr_miner.miner.models import CamClassifier
from cxr_miner.miner.training import TrainConfig


@register_method
class AttentionMining(LocalizationMethod[CamClassifier]):
    name = "am"
    description = "attention mining, Eq. 8 over all T steps"
    fallback_order = 0

    def __init__(self, config: TrainConfig, steps: int | None = None) -> None:
        super().__init__(config)
        self.steps = config.am_steps if steps is None else steps
        if not 1 <= self.steps <= config.am_steps:
            raise ValueError(f"attention mining over {self.steps} steps: the run has am_steps = {config.am_steps}")

    @property
    def variant(self) -> str:
        return f"am-t{self.steps}"

    @property
    def label(self) -> str:
        return f"AM (t = {self.steps})"

    def checkpoints(self) -> tuple[str, ...]:
        return tuple(f"step{t}" for t in range(1, self.steps + 1))

    def training_plan(self, for_release: bool = True) -> tuple[TrainingStep, ...]:
        """Step 1 (the classifier), then AM steps 2..t."""
        steps = [TrainingStep("attention", f"step{t}", t) for t in range(2, self.steps + 1)]
        return (TrainingStep("classifier", "step1"), *steps)

    def harvest_fallback(self, present: Callable[[tuple[str, ...]], bool]) -> bool:
        """AM only where it is more than the CAM baseline: a run of T >= 2 steps."""
        return self.steps > 1 and present(self.checkpoints())

    def variants(self) -> list[LocalizationMethod[CamClassifier]]:
        """AM at every t = 2..T (t = 1 is the CAM baseline)."""
        return [AttentionMining(self.config, t) for t in range(2, self.config.am_steps + 1)]

    def heatmaps(
        self, models: Sequence[CamClassifier], images: torch.Tensor, select: Select | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 8 over H_1..H_t and M_1..M_{t-1}, normalised to [0, 1]: (N, C, h, w); step-1 logits (N, C).

        With ``select``, only the selected pairs' masks are updated: erasure is class-wise
        (Eq. 1-2), so the selected maps are exactly those of a full run."""
        mining = mine(models[: self.steps], images, select, last_mask=False)
        return normalize_maps(final_heatmap(mining.heatmaps, mining.masks)), mining.logits

    def provides(self) -> tuple[str, ...]:
        """The CAM baseline (H_1 alone: t = 1) and AM at every t = 2..steps."""
        return ("cam", *(f"am-t{t}" for t in range(2, self.steps + 1)))

    def variant_maps(
        self, models: Sequence[CamClassifier], images: torch.Tensor, select: Select | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One mining pass over ``steps`` models gives every shorter one's heatmaps too: H_1
        (the CAM baseline's) and Eq. 8 over H_1..H_t for each t."""
        mining = mine(models[: self.steps], images, select, last_mask=False)
        maps = {"cam": normalize_maps(mining.heatmaps[0])}
        for t in range(2, self.steps + 1):
            maps[f"am-t{t}"] = normalize_maps(final_heatmap(mining.heatmaps[:t], mining.masks[: t - 1]))
        return maps, mining.logits
