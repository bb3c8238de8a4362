"""The registry of localisation methods (the pattern of timm's model registry).

A method has a ``name`` (``cam``, ``am``, ``mil``), knows which of a run's checkpoints it needs
(and which its releases use), its own box rule (``paper_rule``), and maps a batch of shard
images, with the (image, finding) pairs wanted, to ranked boxes in source pixels. Evaluate,
harvest, release and the report iterate the registry; a new method is a new module that
registers its class here.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import numpy as np
import torch

from cxr_miner.miner.boxes import DEFAULT_THRESHOLDS
from cxr_miner.miner.localize import Localization, localize
from cxr_miner.miner.method_names import check_method_name
from cxr_miner.miner.rules import PAPER_RULE, BoxRule
from cxr_miner.miner.training import TrainConfig, autocast, prepare_images
from cxr_miner.storage.vocab.letterbox import Letterbox

# Given the step-1 logits (N, C), the (image, finding) pairs (N, C) bool to box.
Select = Callable[[torch.Tensor], torch.Tensor]

# The network a method's checkpoints hold (miner.models.CamClassifier, miner.mil.PatchModel).
Net = TypeVar("Net", bound=torch.nn.Module)

_REGISTRY: dict[str, type[LocalizationMethod[Any]]] = {}


class TrainingStep(NamedTuple):
    """One checkpoint ``train`` makes for a method, by one of its trainers: ``classifier`` (step 1,
    the CAM classifier), ``attention`` (AM step ``step`` >= 2: fine-tuning step t-1 on erased
    images, with KP) or ``patch`` (a MIL patch model, from image labels and boxes)."""

    trainer: str
    checkpoint: str
    step: int = 1


TRAINERS = ("classifier", "attention", "patch")


class BatchLocalization(NamedTuple):
    """What a method finds in a batch of N images.

    probability (N, C): the classifier's sigmoid per finding on the whole image;
    wanted (N, C) bool: the pairs that were boxed;
    found: per image, {finding index: Localization (boxes xyxy in source pixels, rank 1 first)};
    maps (N, C, h, w) in [0, 1], on the models' device: the heatmaps the boxes came from, covering
    the network input (None for a method without heatmaps); only the wanted pairs' are meaningful.
    """

    probability: np.ndarray
    wanted: np.ndarray
    found: list[dict[int, Localization]]
    maps: torch.Tensor | None = None


class LocalizationMethod(ABC, Generic[Net]):
    """One way to box findings with the models of a trained run (configured by ``config``).

    Subclasses set ``name`` and implement ``checkpoints`` and ``heatmaps``; a method with its
    own box rule (a patch grid, say) overrides ``localize_batch`` instead of ``heatmaps``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    paper_rule: ClassVar[BoxRule] = PAPER_RULE  # the box rule of the method's paper (evaluate's own-rule figures)
    network: ClassVar[str] = "classifier"  # what its checkpoints hold (miner.training.create_network)
    # Learns from ground-truth boxes as well as labels: the model evaluate scores learnt from
    # box-val's (so box-test must stay the same images), --box-fraction and --folds apply to it.
    learns_from_boxes: ClassVar[bool] = False
    # heatmaps() differentiates (Grad-CAM and its kin): it runs with autograd on (``inference``).
    needs_gradients: ClassVar[bool] = False
    # Which registered method `harvest --method auto` boxes an untuned finding with: the first, in
    # this order, whose release checkpoints the run has (``harvest_fallback``).
    fallback_order: ClassVar[int] = 100

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @property
    def variant(self) -> str:
        """The variant's name (``cam``, ``am-t2``, ``mil``): its column in evaluation tables
        (``evaluation.json`` results) and its candidates in ``tuning.json``."""
        return self.name

    @property
    def label(self) -> str:
        """How reports name it."""
        return self.name

    def inference(self) -> contextlib.AbstractContextManager[Any]:
        """The autograd mode ``heatmaps`` runs in: off, unless the method ``needs_gradients``; then
        on, with the models in eval mode as ever and their parameters' gradients never kept
        (a method asks ``torch.autograd.grad`` for what it needs)."""
        return torch.enable_grad() if self.needs_gradients else torch.no_grad()

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Heatmap thresholds of the box rule (recorded in the harvest key)."""
        return DEFAULT_THRESHOLDS

    @abstractmethod
    def checkpoints(self) -> tuple[str, ...]:
        """Names of the run's checkpoints the method needs, in the order ``models`` come in."""

    def training_plan(self, for_release: bool = True) -> tuple[TrainingStep, ...]:
        """The checkpoints ``train --method <name>`` makes, in order (``for_release``: also those
        only harvest uses)."""
        return (TrainingStep("classifier", "step1"),)

    def harvest_fallback(self, present: Callable[[tuple[str, ...]], bool]) -> bool:
        """Whether ``harvest --method auto`` may box an untuned finding with this method, given
        which checkpoints the run has (``present(names)``)."""
        return present(self.release_checkpoints())

    def release_checkpoints(self) -> tuple[str, ...]:
        """The checkpoints harvest uses, in the same roles (default: ``checkpoints``; the MIL model
        evaluate scores learnt from box-val's boxes, the one released from all of them)."""
        return self.checkpoints()

    def variants(self) -> list[LocalizationMethod[Net]]:
        """The methods that ``evaluate`` scores for this entry (default: itself)."""
        return [self]

    def provides(self) -> tuple[str, ...]:
        """Names of the variants whose heatmaps one pass of this method gives (``variant_maps``)."""
        return (self.variant,)

    def variant_maps(
        self, models: Sequence[Net], images: torch.Tensor, select: Select | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``heatmaps`` of every variant in ``provides()`` from one pass: ({variant: (N, C, h, w)}, logits (N, C))."""
        maps, logits = self.heatmaps(models, images, select)
        return {self.variant: maps}, logits

    def batch_variant_maps(
        self, models: Sequence[Net], images: torch.Tensor, select: Select | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``variant_maps`` of shard images uint8 (N, S, S): resized to the input size on the
        models' device, under the run's precision; maps (N, C, h, w) in [0, 1], logits (N, C)."""
        device = next(models[0].parameters()).device
        x = prepare_images(images, self.config.input_size, device)
        with self.inference(), autocast(device, self.config.precision):
            return self.variant_maps(models, x, select)

    @abstractmethod
    def heatmaps(
        self, models: Sequence[Net], images: torch.Tensor, select: Select | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 1, S, S) normalised -> heatmaps (N, C, h, w) in [0, 1] and the logits (N, C).

        Only the maps of the pairs ``select`` names need be right."""

    def localize_batch(
        self, models: Sequence[Net], images: torch.Tensor, letterboxes: Sequence[Letterbox], select: Select
    ) -> BatchLocalization:
        """Shard images uint8 (N, S, S) -> ranked boxes per wanted (image, finding), in source pixels.

        ``models`` are those of ``checkpoints()``, in order, on one device; ``letterboxes`` map
        each shard image back to its source.
        """
        device = next(models[0].parameters()).device
        x = prepare_images(images, self.config.input_size, device)
        with self.inference(), autocast(device, self.config.precision):
            maps, logits = self.heatmaps(models, x, select)
        wanted = select(logits).cpu().numpy()
        found = localize(maps, wanted, self.config.input_size, letterboxes, self.thresholds)
        return BatchLocalization(torch.sigmoid(logits.float()).cpu().numpy(), wanted, found, maps)


Method = TypeVar("Method", bound=type[LocalizationMethod[Any]])


def register_method(cls: Method) -> Method:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered methods, in registration order (the CAM baseline first)."""
    return tuple(_REGISTRY)


def check_method(name: str) -> None:
    """SettingError for a name that is not registered (here, or from outside the package), listing
    the catalogue's (miner.method_names)."""
    if name not in _REGISTRY:
        check_method_name(name)


def create_method(name: str, config: TrainConfig, **options: Any) -> LocalizationMethod[Any]:
    """The registered method ``name`` for a run trained with ``config``."""
    check_method(name)
    return _REGISTRY[name](config, **options)


def method_class(name: str) -> type[LocalizationMethod[Any]]:
    """The registered class ``name`` (its declarations: description, network, learns_from_boxes)."""
    check_method(name)
    return _REGISTRY[name]


def box_learners() -> tuple[str, ...]:
    """The names of the registered methods that learn from ground-truth boxes."""
    return tuple(name for name, cls in _REGISTRY.items() if cls.learns_from_boxes)


def method_of_variant(variant: str, config: TrainConfig) -> LocalizationMethod[Any]:
    """The method behind a variant name of ``config``'s run (``am-t2``: AM over 2 steps)."""
    for cls in _REGISTRY.values():
        method = cls(config)
        for candidate in (*method.variants(), method):
            if candidate.variant == variant:
                return candidate
    raise ValueError(f"no registered method has a variant {variant!r}")


def harvest_fallback(config: TrainConfig, present: Callable[[tuple[str, ...]], bool]) -> LocalizationMethod[Any]:
    """The method ``harvest --method auto`` boxes a finding without a tuned choice with: the first
    registered method, by ``fallback_order``, that the run has the checkpoints of (none: the first
    registered, whose missing checkpoints harvest then names)."""
    for cls in sorted(_REGISTRY.values(), key=lambda cls: cls.fallback_order):
        method = cls(config)
        if method.harvest_fallback(present):
            return method
    return next(iter(_REGISTRY.values()))(config)
