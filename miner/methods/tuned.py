"""Harvest's localiser: per finding, what evaluate chose on box-val (miner.tuning).

Each finding has a :class:`FindingChoice`: the method variant whose heatmap it uses (``cam``,
``am-t2``, ...), the box rule (miner.rules), the confidence calibration and the operating point.
One pass of the cheapest registered variant that provides every chosen variant's heatmap
(``LocalizationMethod.provides``: AM over t steps gives the CAM baseline's and every shorter
AM's too), and one of the MIL model when a finding chose it, makes the maps; each wanted (image,
finding) is then boxed by its own choice, on the network-input grid, exactly as evaluate boxed
box-val and box-test. A finding without a choice (no ground-truth box anywhere: NIH's six
unboxed findings) gets ``default``: the harvested method with its paper's rule and no confidence
(NaN, never at an operating point).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from cxr_miner.miner.calibration import Calibration, box_signals, confidence_order
from cxr_miner.miner.localize import Localization, upsample
from cxr_miner.miner.methods.registry import BatchLocalization, LocalizationMethod, Select, create_method, method_names
from cxr_miner.miner.rules import PAPER_RULE, BoxRule, rule_by_name
from cxr_miner.miner.training import TrainConfig
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.vocab.letterbox import Letterbox


@dataclass(frozen=True)
class FindingChoice:
    """How one finding is boxed: heatmap of ``variant``, ``rule`` (with the finding's box size,
    fractions of the image, for a ``prior`` rule), and (when calibrated) the confidence and the
    operating point (None: none on box-val, miner.tuning.choose_operating_point); ``order``: how
    a pair's boxes are ranked, ``confidence`` or the ``rule``'s own order (miner.tuning.choose_order)."""

    variant: str
    rule: BoxRule = PAPER_RULE
    calibration: Calibration | None = None
    operating_point: float | None = None
    box_size: tuple[float, float] | None = None
    order: str = "confidence"

    def __post_init__(self) -> None:
        if self.rule.size == "prior" and self.box_size is None:
            raise ValueError(f"box rule {self.rule.name} needs a box size")
        if self.order not in ("confidence", "rule"):
            raise ValueError(f"a pair's boxes are ranked by confidence or by the rule, not {self.order!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "rule": self.rule.name,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "operating_point": self.operating_point,
            "box_size": list(self.box_size) if self.box_size else None,
            "order": self.order,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FindingChoice:
        calibration = Calibration.from_dict(data["calibration"]) if data.get("calibration") else None
        box_size = tuple(data["box_size"]) if data.get("box_size") else None
        order = data.get("order", "confidence")  # a harvest of before the choice of order ranked by confidence
        return cls(
            data["variant"], rule_by_name(data["rule"]), calibration, data.get("operating_point"), box_size, order
        )

    def score(self, heatmap: np.ndarray, probability: float, input_size: int, letterbox: Letterbox) -> Localization:
        """One heatmap (input grid, [0, 1]) -> its boxes in source pixels, scored, calibrated and
        ranked in ``order``: by confidence (miner.calibration.confidence_order) or the rule's own
        (``rule_rank`` keeps the rule's either way)."""
        found, source = self.rule.in_source(self.rule.boxes(heatmap), input_size, letterbox, self.box_size)
        k = len(found.boxes)
        if self.calibration is None:
            confidence, at_point = np.full(k, math.nan), np.zeros(k, dtype=bool)
        else:
            confidence = self.calibration.predict(box_signals(found.mean, found.peak, found.area, probability))
            at_point = (
                confidence >= self.operating_point if self.operating_point is not None else np.zeros(k, dtype=bool)
            )
        order = confidence_order(confidence) if self.order == "confidence" else np.arange(k)
        return Localization(
            source[order], found.score[order], self.variant, confidence[order], at_point[order], order + 1
        )


def choices_from_tuning(tuning: Mapping[str, Any] | None, variant: str | None) -> dict[str, FindingChoice]:
    """finding -> FindingChoice from a run's tuning.json: the variant chosen for each finding
    (``variant`` None), or the given variant's own tuned rule, calibration and operating point."""
    choices = {}
    for finding, entry in (tuning or {}).get("findings", {}).items():
        key = entry["method"] if variant is None else variant
        if key not in entry["candidates"]:
            raise ValueError(
                f"the tuning has no {key!r} for {finding}; it has {sorted(entry['candidates'])} (evaluate the run "
                "again)"
            )
        picked = entry["candidates"][key]
        box_size = tuple(picked["box_size"]) if picked.get("box_size") else None
        choices[finding] = FindingChoice(
            key,
            rule_by_name(picked["rule"]),
            Calibration.from_dict(picked["calibration"]),
            picked["operating_point"],
            box_size,
            picked.get("rank_order", "confidence"),
        )
    return choices


def provider_for(variants: set[str], config: TrainConfig) -> LocalizationMethod:
    """The registered variant with the fewest checkpoints whose one pass gives all ``variants``' maps."""
    providers = providers_for(variants, config)
    if len(providers) > 1:
        raise ValueError(
            f"no one method gives the heatmaps of {sorted(variants)}: it takes {[p.variant for p in providers]}"
        )
    return providers[0]


def providers_for(variants: set[str], config: TrainConfig) -> list[LocalizationMethod]:
    """Registered variants whose passes give all ``variants``' maps (AM's pass gives the CAM
    baseline's too; the MIL model's is a pass of its own): greedily the one that gives the most
    of those still missing, the fewest checkpoints breaking ties."""
    candidates = [v for name in method_names() for v in create_method(name, config).variants()]
    remaining, chosen = set(variants), []
    while remaining:
        best = max(candidates, key=lambda m: (len(remaining & set(m.provides())), -len(m.checkpoints())), default=None)
        if best is None or not remaining & set(best.provides()):
            raise ValueError(
                f"no method of this run gives the heatmaps of {sorted(remaining)}; "
                f"it has {[m.variant for m in candidates]}"
            )
        chosen.append(best)
        remaining -= set(best.provides())
    return chosen


class TunedLocalizer:
    """Boxes every wanted (image, finding) by its finding's choice (module doc)."""

    name = "tuned"

    def __init__(self, config: TrainConfig, choices: Mapping[str, FindingChoice], default: FindingChoice) -> None:
        unknown = sorted(set(choices) - set(FINDINGS))
        if unknown:
            raise ValueError(f"choices for unknown findings {unknown}")
        self.config, self.default = config, default
        self.choices = {FINDINGS.index(f): c for f, c in choices.items()}
        # the default's provider first: its classifier scores select the pairs in discovery mode
        providers = providers_for({c.variant for c in [default, *choices.values()]}, config)
        self.providers = sorted(providers, key=lambda p: default.variant not in p.provides())

    @classmethod
    def from_choices(cls, config: TrainConfig, record: Mapping[str, Any]) -> TunedLocalizer:
        """The localiser whose ``choices_record()`` is ``record`` (how harvest's workers rebuild it)."""
        default = FindingChoice.from_dict(record["default"])
        return cls(config, {f: FindingChoice.from_dict(c) for f, c in record.items() if f != "default"}, default)

    def checkpoints(self) -> tuple[str, ...]:
        """The providers' release checkpoints, in order (``models`` of localize_batch)."""
        return tuple(name for provider in self.providers for name in provider.release_checkpoints())

    def choices_record(self) -> dict[str, Any]:
        """Each finding's choice as JSON: what the boxes depend on besides the models (the
        harvest key's ``choices``)."""
        return {
            "default": self.default.to_dict(),
            **{FINDINGS[c]: choice.to_dict() for c, choice in sorted(self.choices.items())},
        }

    def localize_batch(
        self, models: Sequence[torch.nn.Module], images: torch.Tensor, letterboxes: Sequence[Letterbox], select: Select
    ) -> BatchLocalization:
        """Shard images uint8 (N, S, S) -> per wanted (image, finding) its Localization, in source pixels:
        :meth:`batch_maps`, then :meth:`box_maps`."""
        return self.box_maps(self.batch_maps(models, images, select), letterboxes)

    def batch_maps(self, models: Sequence[torch.nn.Module], images: torch.Tensor, select: Select) -> BatchMaps:
        """The forward half: every provider's pass over shard images uint8 (N, S, S), and each
        wanted pair's map of its choice's variant upsampled to the network input where the maps
        were made (on a GPU, there, as evaluate upsamples the pairs it scores), then brought to
        the CPU: all the device's work for the batch, so that the CPU half is boxing only."""
        maps: dict[str, torch.Tensor] = {}
        scores: dict[str, np.ndarray] = {}  # variant -> the image probabilities (N, C) of its provider
        used = {c.variant for c in [self.default, *self.choices.values()]}
        start = 0
        for provider in self.providers:
            count = len(provider.release_checkpoints())
            provided, logits = provider.batch_variant_maps(models[start : start + count], images, select)
            start += count
            probability = torch.sigmoid(logits.float()).cpu().numpy()
            for key, value in provided.items():
                if key in used and key not in maps:
                    maps[key] = value
                scores.setdefault(key, probability)
            if provider is self.providers[0]:
                wanted = select(logits).cpu().numpy()
        probability = np.stack(
            [scores[self.choices.get(c, self.default).variant][:, c] for c in range(len(FINDINGS))], axis=1
        )
        pairs = list(zip(*(index.tolist() for index in np.nonzero(wanted))))
        size = self.config.input_size
        heatmaps = [upsample(maps[self.choices.get(c, self.default).variant][i, c], size) for i, c in pairs]
        return BatchMaps(dict(zip(pairs, (h.cpu().numpy() for h in heatmaps))), probability, wanted)

    def box_maps(self, batch: BatchMaps, letterboxes: Sequence[Letterbox]) -> BatchLocalization:
        """The CPU half: each wanted (image, finding) boxed by its finding's choice, on the
        network-input grid, in source pixels (``letterboxes``: one per image)."""
        size = self.config.input_size
        found: list[dict[int, Localization]] = [{} for _ in range(len(batch.wanted))]
        for (i, c), heatmap in batch.heatmaps.items():
            found[i][c] = self.choices.get(c, self.default).score(
                heatmap, float(batch.probability[i, c]), size, letterboxes[i]
            )
        return BatchLocalization(batch.probability, batch.wanted, found, None)


class BatchMaps(NamedTuple):
    """A batch of N images between TunedLocalizer's halves: heatmaps {(image, finding) index:
    (S, S) float32 in [0, 1] on the network-input grid, S = input_size} for each wanted pair, of
    its finding's choice's variant, in row-major (image, finding) order; probability (N, C)
    (each finding's from its choice's provider) and wanted (N, C) bool."""

    heatmaps: dict[tuple[int, int], np.ndarray]
    probability: np.ndarray
    wanted: np.ndarray
