"""Phantom chest X-rays in the exact NIH ChestX-ray14 layout, with findings at known places.

Every image is a smooth anatomical phantom (body, two lungs, mediastinum, heart, ribs,
diaphragm) with each of its findings drawn as a distinct pattern. The box of every drawn
finding is known: ``demo_truth.csv`` lists all of them (the oracle for scoring
localisation), ``BBox_List_2017.csv`` lists those of about ``box_fraction`` of the images
for NIH's eight boxed findings, exactly as NIH does. Reproducible from the seed: image i
depends only on (seed, i).

Coordinates: continuous source pixels, xyxy, pixel (i, j) covering [i, i + 1).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_miner.storage.inputs.nih import BBOX_LIST, DATA_ENTRY, TEST_LIST, TRAIN_VAL_LIST
from cxr_miner.storage.stages.atomic import atomic_path, write_json
from cxr_miner.storage.vocab.errors import SettingError
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS, FINDINGS, NO_FINDING
from cxr_miner.storage.vocab.lifetime import die_with_parent

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
IMAGES_PER_FOLDER = 10_000
CORRUPTIONS = ("truncated", "zero-bytes", "text")


@dataclass(frozen=True)
class DemoImage:
    """The plan of one phantom: who, what, where (boxes filled in when drawn)."""

    index: int
    image_id: str
    patient_id: int
    follow_up: int
    findings: tuple[str, ...]
    width: int
    height: int


def plan_images(n_images: int, size: int, seed: int, non_square: float) -> list[DemoImage]:
    """Patients with 1-6 follow-ups each; 40% "No Finding", else 1-3 findings, uniformly."""
    rng = np.random.default_rng([seed, 0])
    plans: list[DemoImage] = []
    patient = 0
    while len(plans) < n_images:
        patient += 1
        for follow_up in range(min(1 + rng.poisson(1.6), 6, n_images - len(plans))):
            if rng.random() < 0.4:
                findings: tuple[str, ...] = ()
            else:
                k = rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])
                chosen = set(rng.choice(len(FINDINGS), size=k, replace=False).tolist())
                findings = tuple(f for i, f in enumerate(FINDINGS) if i in chosen)
            width = height = size
            if rng.random() < non_square:
                short = round(size * rng.uniform(0.75, 0.95))
                width, height = (size, short) if rng.random() < 0.5 else (short, size)
            plans.append(
                DemoImage(len(plans), f"{patient:08d}_{follow_up:03d}.png", patient, follow_up, findings, width, height)
            )
    return plans


class Canvas:
    """A float32 image in [0, 255] with drawing helpers in normalised coordinates.

    u = x / width, v = y / height; radii are in units of the shorter side.
    """

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = np.zeros((height, width), dtype=np.float32)
        self.unit = float(min(width, height))
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        self.x, self.y = xs + 0.5, ys + 0.5  # pixel centres

    def ellipse(self, cu: float, cv: float, ru: float, rv: float, soft: float = 0.0) -> np.ndarray:
        """Membership in [0, 1] of an ellipse (soft edge of ``soft`` shorter-side units)."""
        dx = (self.x - cu * self.width) / (ru * self.unit)
        dy = (self.y - cv * self.height) / (rv * self.unit)
        r = np.sqrt(dx * dx + dy * dy)
        if soft <= 0:
            return (r <= 1).astype(np.float32)
        return np.clip((1 - r) * min(ru, rv) / soft + 0.5, 0, 1).astype(np.float32)

    def gaussian(self, cu: float, cv: float, sigma: float) -> np.ndarray:
        dx = (self.x - cu * self.width) / (sigma * self.unit)
        dy = (self.y - cv * self.height) / (sigma * self.unit)
        return np.exp(-0.5 * (dx * dx + dy * dy)).astype(np.float32)

    def box(self, cu: float, cv: float, ru: float, rv: float) -> tuple[float, float, float, float]:
        """The xyxy pixel box of an ellipse drawn with the same arguments, clipped to the image."""
        return (
            max(0.0, cu * self.width - ru * self.unit),
            max(0.0, cv * self.height - rv * self.unit),
            min(float(self.width), cu * self.width + ru * self.unit),
            min(float(self.height), cv * self.height + rv * self.unit),
        )


@dataclass
class Anatomy:
    """Random anatomy of one phantom, in normalised coordinates."""

    lungs: list[tuple[float, float, float, float]]  # (cu, cv, ru, rv) image-left, image-right
    heart: tuple[float, float, float, float]

    @classmethod
    def draw(cls, canvas: Canvas, rng: np.random.Generator, cardiomegaly: bool, emphysema: bool) -> Anatomy:
        shift_u, shift_v = rng.uniform(-0.02, 0.02, size=2)
        spread = rng.uniform(0.95, 1.05)
        lungs = [
            (0.5 + side * 0.17 * spread + shift_u, 0.45 + shift_v, 0.125 * spread, 0.27 * spread) for side in (-1, 1)
        ]
        if emphysema:
            lungs = [(cu, cv, ru * 1.08, rv * 1.06) for cu, cv, ru, rv in lungs]
        heart_scale = 1.45 if cardiomegaly else rng.uniform(0.9, 1.05)
        heart = (0.55 + shift_u, 0.6 + shift_v, 0.1 * heart_scale, 0.085 * heart_scale)
        c = canvas
        body = c.ellipse(0.5 + shift_u, 0.58 + shift_v, 0.46, 0.55, soft=0.03)
        c.pixels += 15 + 100 * body
        lung_mask = np.maximum(*(c.ellipse(*lung, soft=0.012) for lung in lungs))
        c.pixels -= (78 if emphysema else 62) * lung_mask
        # ribs: faint bright arcs across the lungs
        for k in range(9):
            v0 = 0.22 + k * 0.065 + shift_v
            arc = np.abs(c.y / c.height - v0 - 0.06 * ((c.x / c.width - 0.5) ** 2) * 8) < 0.009
            c.pixels += 14 * arc * lung_mask
        c.pixels += 55 * c.ellipse(0.5 + shift_u, 0.5 + shift_v, 0.045, 0.5, soft=0.015)  # spine / mediastinum
        c.pixels += 45 * c.ellipse(*heart, soft=0.01)
        c.pixels += 40 * c.ellipse(0.5 + shift_u, 0.86 + shift_v, 0.4, 0.12, soft=0.03) * body  # diaphragm / abdomen
        return cls(lungs, heart)


Drawer = Callable[[Canvas, np.random.Generator, Anatomy], tuple[float, float, float, float]]


def _in_lung(
    rng: np.random.Generator, anatomy: Anatomy, v_range: tuple[float, float] = (-0.6, 0.6)
) -> tuple[int, float, float]:
    side = int(rng.integers(2))
    cu, cv, ru, rv = anatomy.lungs[side]
    return side, cu + rng.uniform(-0.5, 0.5) * ru, cv + rng.uniform(*v_range) * rv


def _nodule(c: Canvas, rng, a: Anatomy):
    _, u, v = _in_lung(rng, a)
    r = rng.uniform(0.012, 0.02)
    c.pixels += 70 * c.ellipse(u, v, r, r, soft=0.003)
    return c.box(u, v, r, r)


def _mass(c: Canvas, rng, a: Anatomy):
    _, u, v = _in_lung(rng, a, (-0.4, 0.4))
    r = rng.uniform(0.04, 0.06)
    c.pixels += 60 * c.ellipse(u, v, r, r * 0.9, soft=0.01)
    return c.box(u, v, r, r * 0.9)


def _atelectasis(c: Canvas, rng, a: Anatomy):
    _, u, v = _in_lung(rng, a, (0.2, 0.6))
    ru, rv = 0.075, 0.02
    c.pixels += 55 * c.ellipse(u, v, ru, rv, soft=0.005)
    return c.box(u, v, ru, rv)


def _effusion(c: Canvas, rng, a: Anatomy):
    side = int(rng.integers(2))
    cu, cv, ru, rv = a.lungs[side]
    depth = rng.uniform(0.25, 0.4)  # fraction of the lung height filled from below
    top = cv + rv * (1 - 2 * depth)
    lung = c.ellipse(cu, cv, ru, rv)
    fluid = lung * (c.y / c.height > top)
    c.pixels += 70 * fluid
    return (c.box(cu, cv, ru, rv)[0], top * c.height, c.box(cu, cv, ru, rv)[2], (cv + rv) * c.height)


def _infiltration(c: Canvas, rng, a: Anatomy):
    _, u, v = _in_lung(rng, a, (-0.3, 0.4))
    half = 0.05
    for _ in range(7):
        du, dv = rng.uniform(-half * 0.7, half * 0.7, size=2)
        c.pixels += 30 * c.gaussian(u + du * c.unit / c.width, v + dv * c.unit / c.height, 0.012)
    return c.box(u, v, half, half)


def _pneumonia(c: Canvas, rng, a: Anatomy):
    _, u, v = _in_lung(rng, a, (-0.2, 0.5))
    sigma = rng.uniform(0.03, 0.04)
    c.pixels += 50 * c.gaussian(u, v, sigma)
    return c.box(u, v, 2 * sigma, 2 * sigma)


def _pneumothorax(c: Canvas, rng, a: Anatomy):
    side = int(rng.integers(2))
    cu, cv, ru, rv = a.lungs[side]
    apex_v = cv - rv * rng.uniform(0.45, 0.6)
    region = c.ellipse(cu, cv, ru, rv) * (c.y / c.height < apex_v)
    c.pixels -= 30 * region
    line = np.abs(c.y / c.height - apex_v) < 0.004
    c.pixels += 45 * line * c.ellipse(cu, cv, ru, rv)
    box = c.box(cu, cv, ru, rv)
    return (box[0], box[1], box[2], apex_v * c.height)


def _consolidation(c: Canvas, rng, a: Anatomy):
    _, u, v = _in_lung(rng, a, (0.0, 0.5))
    ru, rv = 0.065, 0.045
    c.pixels += 65 * c.ellipse(u, v, ru, rv)
    return c.box(u, v, ru, rv)


def _edema(c: Canvas, rng, a: Anatomy):
    boxes = []
    for cu, cv, _ru, _rv in a.lungs:
        hilum_u = cu + (0.5 - cu) * 0.45
        c.pixels += 35 * c.gaussian(hilum_u, cv + 0.05, 0.05)
        boxes.append(c.box(hilum_u, cv + 0.05, 0.1, 0.1))
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _emphysema(c: Canvas, rng, a: Anatomy):
    boxes = [c.box(*lung) for lung in a.lungs]  # drawn as hyperlucent, larger lungs by Anatomy.draw
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _fibrosis(c: Canvas, rng, a: Anatomy):
    _, u, v = _in_lung(rng, a, (-0.4, 0.4))
    half = 0.055
    region = c.ellipse(u, v, half, half)
    period = 0.018 * c.unit
    grid = (np.abs(np.sin(np.pi * c.x / period)) < 0.25) | (np.abs(np.sin(np.pi * c.y / period)) < 0.25)
    c.pixels += 40 * grid * region
    return c.box(u, v, half, half)


def _pleural_thickening(c: Canvas, rng, a: Anatomy):
    side = int(rng.integers(2))
    cu, cv, ru, rv = a.lungs[side]
    outer = c.ellipse(cu, cv, ru, rv) - c.ellipse(cu, cv, ru * 0.85, rv * 0.93)
    v0 = cv + rng.uniform(-0.5, 0.2) * rv
    band = outer * (np.abs(c.y / c.height - v0) < 0.08)
    lateral = (c.x / c.width < cu) if side == 0 else (c.x / c.width > cu)
    band = band * lateral
    c.pixels += 60 * band
    ys, xs = np.nonzero(band)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _hernia(c: Canvas, rng, a: Anatomy):
    cu, cv, _ru, rv = a.heart
    u, v, r = cu - 0.02, cv + rv * 0.9, 0.045
    c.pixels += 50 * c.ellipse(u, v, r, r) * (c.y / c.height > v)
    c.pixels -= 40 * c.ellipse(u, v, r, r) * (c.y / c.height <= v)  # air-fluid level
    return c.box(u, v, r, r)


def _cardiomegaly(c: Canvas, rng, a: Anatomy):
    return c.box(*a.heart)  # drawn by Anatomy.draw as an enlarged heart


DRAWERS: dict[str, Drawer] = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Effusion": _effusion,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}


RENDER_SIDE = 320  # phantoms are smooth: drawn at this longer side, then upsampled


def _rounded(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (round(float(v), 3) for v in box)
    return x0, y0, x1, y1


def render(plan: DemoImage, seed: int) -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
    """One phantom: uint8 (height, width) and the xyxy box (source pixels) of each drawn finding."""
    rng = np.random.default_rng([seed, 1, plan.index])
    factor = min(1.0, RENDER_SIDE / max(plan.width, plan.height))
    canvas = Canvas(max(1, round(plan.width * factor)), max(1, round(plan.height * factor)))
    anatomy = Anatomy.draw(canvas, rng, "Cardiomegaly" in plan.findings, "Emphysema" in plan.findings)
    boxes = {finding: DRAWERS[finding](canvas, rng, anatomy) for finding in plan.findings}
    sx, sy = plan.width / canvas.width, plan.height / canvas.height
    smooth = Image.fromarray(canvas.pixels, mode="F").resize((plan.width, plan.height), Image.Resampling.BILINEAR)
    noise = np.random.default_rng([seed, 3, plan.index]).normal(0.0, 3.0, size=(plan.height, plan.width))
    pixels = np.asarray(smooth, dtype=np.float32) + noise.astype(np.float32)
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    scaled = {k: (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for k, b in boxes.items()}
    return pixels, {k: _rounded(b) for k, b in scaled.items()}


def image_path(out: Path, plan: DemoImage) -> Path:
    folder = plan.index // IMAGES_PER_FOLDER + 1
    return out / f"images_{folder:03d}" / "images" / plan.image_id


def _write_one(args: tuple[DemoImage, int, str]) -> dict[str, tuple[float, float, float, float]]:
    plan, seed, out = args
    pixels, boxes = render(plan, seed)
    target = image_path(Path(out), plan)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=3)
    return boxes


def _corrupt(path: Path, kind: str) -> None:
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "zero-bytes":
        path.write_bytes(b"")
    else:
        path.write_text("this is not an image, only text with a .png name\n")


def generate(
    out: Path,
    *,
    n_images: int,
    size: int = 1024,
    seed: int = 0,
    corrupt: int = 0,
    box_fraction: float = 0.01,
    non_square: float = 0.0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write the phantom collection to ``out``; returns the summary also saved as demo_manifest.json."""
    if n_images < 1 or size < 64:
        raise SettingError(f"need at least 1 image of at least 64 px, got {n_images} of {size}")
    if not 0 <= corrupt <= n_images:
        raise SettingError(f"--corrupt {corrupt} must be between 0 and the number of images {n_images}")
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_images(n_images, size, seed, non_square)
    truth = _write_images([(plan, seed, str(out)) for plan in plans], workers, progress)
    rng = np.random.default_rng([seed, 2])
    boxable = [p for p in plans if any(f in BOXED_FINDINGS for f in p.findings)]
    n_boxed = min(len(boxable), max(1, math.ceil(box_fraction * n_images))) if box_fraction > 0 else 0
    boxed = {boxable[i].index for i in rng.choice(len(boxable), size=n_boxed, replace=False)} if n_boxed else set()
    candidates = [p for p in plans if p.index not in boxed]
    corrupted = [
        candidates[i] for i in sorted(rng.choice(len(candidates), size=min(corrupt, len(candidates)), replace=False))
    ]
    for k, plan in enumerate(corrupted):
        _corrupt(image_path(out, plan), CORRUPTIONS[k % len(CORRUPTIONS)])

    _write_data_entry(out / DATA_ENTRY, plans, rng)
    _write_bbox_list(out / BBOX_LIST, [p for p in plans if p.index in boxed], truth)
    _write_truth(out / "demo_truth.csv", plans, truth)
    patients = _write_split_lists(out, plans, rng)
    summary = {
        "images": n_images,
        "size": size,
        "seed": seed,
        "patients": len(patients),
        "boxed_images": sorted(plans[i].image_id for i in boxed),
        "corrupt": {plan.image_id: CORRUPTIONS[k % len(CORRUPTIONS)] for k, plan in enumerate(corrupted)},
        "findings": {f: sum(f in p.findings for p in plans) for f in FINDINGS},
        "no_finding": sum(not p.findings for p in plans),
    }
    write_json(out / "demo_manifest.json", summary)
    return summary


Truth = list[dict[str, tuple[float, float, float, float]]]  # per image index: finding -> its drawn box


def _write_images(
    jobs: list[tuple[DemoImage, int, str]], workers: int, progress: Callable[[int], None] | None
) -> Truth:
    """Every phantom's PNG, in ``workers`` processes; each image's drawn boxes, in plan order."""
    truth: Truth = []
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            for boxes in pool.map(_write_one, jobs, chunksize=8):
                truth.append(boxes)
                if progress:
                    progress(1)
    else:
        for job in jobs:
            truth.append(_write_one(job))
            if progress:
                progress(1)
    return truth


def _write_bbox_list(path: Path, boxed: list[DemoImage], truth: Truth) -> None:
    """BBox_List_2017.csv of the ``boxed`` images' boxed findings, in NIH's x, y, w, h and names."""
    with open(path, "w", newline="") as handle:
        handle.write(BBOX_HEADER + "\n")
        writer = csv.writer(handle, lineterminator="\n")
        for plan in boxed:
            for finding, (x0, y0, x1, y1) in truth[plan.index].items():
                if finding in BOXED_FINDINGS:
                    label = "Infiltrate" if finding == "Infiltration" else finding
                    writer.writerow([plan.image_id, label, x0, y0, x1 - x0, y1 - y0])


def _write_truth(path: Path, plans: list[DemoImage], truth: Truth) -> None:
    """demo_truth.csv: every drawn box of every image, xyxy in source pixels."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_id", "finding", "x_min", "y_min", "x_max", "y_max"])
        for plan in plans:
            for finding, box in truth[plan.index].items():
                writer.writerow([plan.image_id, finding, *box])


def _write_split_lists(out: Path, plans: list[DemoImage], rng: np.random.Generator) -> list[int]:
    """train_val_list.txt and test_list.txt (about a fifth of the patients in test); the patients."""
    patients = sorted({p.patient_id for p in plans})
    test_patients = {pid for pid in patients if rng.random() < 0.2}
    (out / TRAIN_VAL_LIST).write_text("".join(f"{p.image_id}\n" for p in plans if p.patient_id not in test_patients))
    (out / TEST_LIST).write_text("".join(f"{p.image_id}\n" for p in plans if p.patient_id in test_patients))
    return patients


def _write_data_entry(path: Path, plans: list[DemoImage], rng: np.random.Generator) -> None:
    with open(path, "w", newline="") as handle:
        handle.write(DATA_ENTRY_HEADER + "\n")
        writer = csv.writer(handle, lineterminator="\n")
        people: dict[int, tuple[int, str]] = {}
        for plan in plans:
            age0, sex = people.setdefault(plan.patient_id, (int(rng.integers(18, 86)), str(rng.choice(["M", "F"]))))
            original = [(2500, 2048), (2992, 2991), (3056, 2544), (2021, 2021)][int(rng.integers(4))]
            spacing = [0.143, 0.139, 0.168][int(rng.integers(3))]
            labels = "|".join(plan.findings) or NO_FINDING
            view = "AP" if rng.random() < 0.4 else "PA"
            writer.writerow(
                [
                    plan.image_id,
                    labels,
                    plan.follow_up,
                    plan.patient_id,
                    age0 + plan.follow_up // 3,
                    sex,
                    view,
                    *original,
                    spacing,
                    spacing,
                ]
            )
