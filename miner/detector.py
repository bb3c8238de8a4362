"""Downstream detectors for the detector check: torchvision's Faster R-CNN on a release's boxes.

Two registered detectors (DETECTORS): ``fasterrcnn-mobilenet`` (MobileNetV3-Large FPN, CPU-sized)
and ``fasterrcnn-resnet50`` (ResNet-50 FPN, GPU). Input is grayscale, handled as the classifier
handles it (miner.models): the trunk's first convolution summed over RGB (adapt_stem), and images
normalised by :func:`miner.training.prepare_images` before the model sees them, so the detector's
own transform neither normalises nor resizes (images arrive at ``size``; anchors are torchvision's
scaled by ``size / 800``, the image size they were made for).

Coordinates: boxes xyxy in input pixels of the (S, S) network input, continuous (pixel (i, j)
covers [i, i + 1) x [j, j + 1)). Classes: the 14 findings as labels 1..14 in FINDINGS order
(the release's COCO category ids), 0 the background. Padded targets (B, M) use label 0 for "no box".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision import models as tv
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import misc as misc_ops

from cxr_miner.miner.models import adapt_stem
from cxr_miner.storage.vocab.errors import SettingError
from cxr_miner.storage.vocab.findings import FINDINGS

NUM_CLASSES = len(FINDINGS) + 1  # background + the findings, labels = COCO category ids
ANCHOR_IMAGE_SIZE = 800  # the image size torchvision's anchor sizes are made for (its min_size)


@dataclass(frozen=True)
class DetectorSpec:
    """How to build one registered detector: its FPN backbone (torchvision builder and the
    classifier it wraps), its anchors at 800 px, and where the stem convolution sits."""

    backbone: Callable[..., BackboneWithFPN]
    classifier: str  # torchvision classification model whose weights the trunk takes
    imagenet: tv.WeightsEnum  # its ImageNet weights
    anchor_sizes: tuple[tuple[int, ...], ...]
    stem: Callable[[nn.ModuleDict], tuple[nn.Module, str]]  # body -> (parent module, attribute) of the first conv
    stages: int  # trainable stages of the whole trunk (torchvision's maximum trainable_layers)


DETECTORS: dict[str, DetectorSpec] = {
    "fasterrcnn-mobilenet": DetectorSpec(
        backbone=lambda weights, norm, trainable: mobilenet_backbone(
            backbone_name="mobilenet_v3_large", weights=weights, fpn=True, norm_layer=norm, trainable_layers=trainable
        ),
        classifier="mobilenet_v3_large",
        imagenet=tv.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        anchor_sizes=((32, 64, 128, 256, 512),) * 3,  # torchvision's fasterrcnn_mobilenet_v3_large_fpn
        stem=lambda body: (body["0"], "0"),
        stages=6,
    ),
    "fasterrcnn-resnet50": DetectorSpec(
        backbone=lambda weights, norm, trainable: resnet_fpn_backbone(
            backbone_name="resnet50", weights=weights, norm_layer=norm, trainable_layers=trainable
        ),
        classifier="resnet50",
        imagenet=tv.ResNet50_Weights.IMAGENET1K_V2,
        anchor_sizes=((32,), (64,), (128,), (256,), (512,)),  # torchvision's fasterrcnn_resnet50_fpn
        stem=lambda body: (body, "conv1"),
        stages=5,
    ),
}


@dataclass(frozen=True)
class DetectorConfig:
    """A detector and how it is trained and run; written into every detector checkpoint."""

    name: str = "fasterrcnn-mobilenet"
    weights: str = "random"  # random | imagenet | path to the trunk classifier's torchvision weights
    size: int = 256  # network input side, pixels (the 512 px shard letterbox resized to it)
    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.01  # SGD, momentum 0.9 (torchvision's detection reference: 0.02 at 16 images a batch)
    weight_decay: float = 1e-4
    score_threshold: float = 0.001  # detections kept for scoring (COCO-style evaluation wants the tail)
    detections_per_image: int = 100
    # A chest film has one to three lesions, not COCO's dozens: fewer proposals and sampled RoIs
    # than torchvision's 2000 / 512 (the RoI head is most of the CPU time at small sizes).
    proposals: int = 300  # RPN proposals kept after NMS per image, training and inference
    rois_per_image: int = 64  # RoIs sampled per image for the box head's loss
    box_head: int = 1024  # width of the box head's two layers (torchvision's TwoMLPHead: 1024)

    def __post_init__(self) -> None:
        if self.name not in DETECTORS:
            raise SettingError(f"unknown detector {self.name!r}; known: {sorted(DETECTORS)}")
        if self.size < 32 or self.epochs < 1 or self.batch_size < 1:
            raise SettingError(f"need size >= 32, epochs >= 1 and batch size >= 1: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def create_detector(config: DetectorConfig, trunk_weights: dict[str, torch.Tensor] | None = None) -> FasterRCNN:
    """A Faster R-CNN with NUM_CLASSES classes for grayscale (N, 1, S, S) input normalised as the
    classifier's. ``trunk_weights``: the state dict of the torchvision classifier the trunk is
    (``DetectorSpec.classifier``), or None: random weights, or (``config.weights`` not random) the
    layout of a trunk from weights, for a checkpoint to be loaded into. As torchvision does, a trunk
    from weights keeps batch norm frozen and trains its last 3 stages; a random one trains all."""
    spec = DETECTORS[config.name]
    pretrained = config.weights != "random"
    if trunk_weights is not None and not pretrained:
        raise SettingError("trunk weights given for a detector configured with weights random")
    norm = misc_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    backbone = spec.backbone(None, norm, 3 if pretrained else spec.stages)
    if trunk_weights is not None:
        load_body_weights(backbone.body, trunk_weights, spec.classifier)
    parent, attribute = spec.stem(backbone.body)
    setattr(parent, attribute, adapt_stem(getattr(parent, attribute)))
    scale = config.size / ANCHOR_IMAGE_SIZE
    anchors = AnchorGenerator(
        tuple(tuple(max(4, round(s * scale)) for s in level) for level in spec.anchor_sizes),
        ((0.5, 1.0, 2.0),) * len(spec.anchor_sizes),
    )
    resolution = 7  # torchvision's RoI pooling output, 7 x 7
    head = TwoMLPHead(backbone.out_channels * resolution**2, config.box_head)
    return FasterRCNN(
        backbone,
        None,
        box_head=head,
        box_predictor=FastRCNNPredictor(config.box_head, NUM_CLASSES),
        min_size=config.size,
        max_size=config.size,
        image_mean=[0.0],
        image_std=[1.0],
        rpn_anchor_generator=anchors,
        box_score_thresh=config.score_threshold,
        box_detections_per_img=config.detections_per_image,
        rpn_pre_nms_top_n_train=2 * config.proposals,
        rpn_post_nms_top_n_train=config.proposals,
        rpn_pre_nms_top_n_test=2 * config.proposals,
        rpn_post_nms_top_n_test=config.proposals,
        box_batch_size_per_image=config.rois_per_image,
    )


def load_body_weights(body: nn.Module, state_dict: dict[str, torch.Tensor], classifier: str) -> None:
    """Load a torchvision ``classifier`` state dict (RGB stem; its head ignored) into an FPN
    backbone's body, whose names are the classifier's without ``features.`` (MobileNet); ValueError
    naming what does not fit."""
    state = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").removeprefix("features.")
        if not key.startswith(("fc.", "classifier.")) and not key.endswith("num_batches_tracked"):
            state[key] = value
    expected = {k for k in body.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise SettingError(
            f"weights do not fit a torchvision {classifier}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        body.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise SettingError(
            f"weights do not fit a torchvision {classifier}: {str(error).splitlines()[1].strip()}"
        ) from error


def imagenet_state(config: DetectorConfig) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of the detector's trunk classifier (downloads)."""
    weights = DETECTORS[config.name].imagenet
    try:
        return weights.get_state_dict(progress=False)
    except OSError as error:  # URLError is an OSError
        raise SettingError(
            f"cannot download {weights} ({error}); download it elsewhere and pass the file as --weights PATH"
        ) from error


def unpad_targets(boxes: torch.Tensor, labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Padded targets -> torchvision's: boxes (B, M, 4) float xyxy and labels (B, M) long, 0 for
    padding -> B dicts {"boxes": (m, 4), "labels": (m,)} (m may be 0: a background image)."""
    keep = labels > 0
    return [{"boxes": boxes[i][keep[i]].float(), "labels": labels[i][keep[i]].long()} for i in range(len(labels))]


def pad_targets(per_image: list[list[tuple[int, list[float]]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """B lists of (label, xyxy box) -> padded boxes (B, M, 4) float32 and labels (B, M) int64,
    M the most boxes any image has (at least 1), label 0 where an image has fewer."""
    width = max([1, *(len(boxes) for boxes in per_image)])
    boxes = torch.zeros(len(per_image), width, 4)
    labels = torch.zeros(len(per_image), width, dtype=torch.int64)
    for i, entries in enumerate(per_image):
        for j, (label, box) in enumerate(entries):
            labels[i, j] = label
            boxes[i, j] = torch.tensor(box, dtype=torch.float32)
    return boxes, labels


def detection_loss(
    model: FasterRCNN, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, box_labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Faster R-CNN's training loss (the sum of its RPN and box-head losses) on normalised images
    (B, 1, S, S) and padded targets; ``labels`` (the image-level ones) are not used. A loss_fn of
    miner.training.train_epoch."""
    losses = model(list(images), unpad_targets(boxes, box_labels))
    total = sum(losses.values())
    return total, {name.removeprefix("loss_"): float(value.detach()) for name, value in losses.items()}


@torch.no_grad()
def detect(model: FasterRCNN, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Normalised images (B, 1, S, S) -> per image {"boxes" (n, 4) xyxy input pixels, "labels" (n,),
    "scores" (n,)}, float32 on the CPU, highest score first."""
    model.eval()
    outputs = model(list(images))
    return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()} for out in outputs]
