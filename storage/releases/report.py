"""The per-disease harvest report: a self-contained static HTML folder (index + one page per
finding, figures as PNG files beside them), drawn with matplotlib, opened from disk.

Inputs are plain tables built by the release flow (ReportData); this module only lays them
out and draws them. Box coordinates are xyxy in source pixels, ``*_norm`` divided by the
image's width and height (x to the right, y downwards, as in the image).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw

from cxr_miner.storage.vocab.findings import FEW_PAIRS, FINDINGS
from cxr_miner.storage.vocab.text import MISSING, ci_text, format_number, rule_label

GALLERY_PER_GROUP = 2  # images each from the top, the median and the bottom scores
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; } .figures img { width: 360px; margin: 4px; }
.gallery figure { display: inline-block; margin: 4px; } .gallery img { width: 240px; } figcaption { font-size: 12px; }
.muted { color: #777; }
"""


@dataclass
class GalleryItem:
    """One mined box to draw: its image (gray uint8 (H, W), source pixels) or None if unreadable."""

    image_id: str
    box: Sequence[float]
    score: float
    group: str
    image: np.ndarray | None
    truth: Sequence[Sequence[float]] = ()


@dataclass
class FindingData:
    """What one finding's page shows. ``boxes``: rank-1 boxes as columns (score, probability,
    x_min_norm, y_min_norm, x_max_norm, y_max_norm -> arrays). ``acc``: method -> {T: {acc, afp}}
    at T(IoU) on the images with ground truth (empty when there are none)."""

    finding: str
    boxes_total: int
    images_covered: int
    boxes: Mapping[str, np.ndarray]
    acc: Mapping[str, Mapping[float, Mapping[str, Any]]]
    evaluated_images: int
    changes: Mapping[str, int]
    gallery: Sequence[GalleryItem] = field(default_factory=list)
    tuned: Mapping[str, Any] | None = None  # the run's tuning entry the harvest applied (miner.tuning), if calibrated
    at_operating_point: int = 0  # boxes at the operating point (those of coco/)


@dataclass
class ReportData:
    title: str
    version: str
    method: str
    model_id: str
    previous: str | None
    facts: Mapping[str, Any]
    findings: Sequence[FindingData]
    review: Sequence[Mapping[str, Any]] = ()  # storage.releases.review_summary.review_rows


def page_name(finding: str) -> str:
    return f"{finding.lower()}.html"


def figure_file(path: Path, draw: Callable[[plt.Axes], None], size: tuple[float, float] = (4.0, 3.0)) -> str:
    fig, ax = plt.subplots(figsize=size, dpi=90)
    try:
        draw(ax)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path.name


def _empty(ax: plt.Axes, text: str = "no boxes") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def score_figure(ax: plt.Axes, data: FindingData) -> None:
    scores = data.boxes["score"]
    if len(scores) == 0:
        return _empty(ax)
    bins = np.linspace(0, 1, 21).tolist()
    ax.hist(scores, bins=bins, alpha=0.7, label="box score (mean heatmap)")
    ax.hist(data.boxes["probability"], bins=bins, alpha=0.5, label="classifier probability")
    ax.set_xlabel("value")
    ax.set_ylabel("rank-1 boxes")
    ax.legend(fontsize=7)


def size_figure(ax: plt.Axes, data: FindingData) -> None:
    b = data.boxes
    if len(b["score"]) == 0:
        return _empty(ax)
    ax.scatter(b["x_max_norm"] - b["x_min_norm"], b["y_max_norm"] - b["y_min_norm"], s=6, alpha=0.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("box width / image width")
    ax.set_ylabel("box height / image height")


def position_figure(ax: plt.Axes, data: FindingData) -> None:
    b = data.boxes
    if len(b["score"]) == 0:
        return _empty(ax)
    cx, cy = (b["x_min_norm"] + b["x_max_norm"]) / 2, (b["y_min_norm"] + b["y_max_norm"]) / 2
    ax.hist2d(cx, cy, bins=12, range=[[0, 1], [0, 1]], cmap="magma")
    ax.set_ylim(1, 0)  # image orientation: top of the chest up
    ax.set_xlabel("box centre x (patient's right at 0 on a PA view)")
    ax.set_ylabel("box centre y")


def accuracy_figure(ax: plt.Axes, data: FindingData) -> None:
    if not data.acc or data.evaluated_images == 0:
        return _empty(ax, "no ground-truth boxes")
    for method, table in data.acc.items():
        thresholds = sorted(table)
        ax.plot(thresholds, [table[t]["acc"] for t in thresholds], marker="o", label=method)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("T(IoU)")
    ax.set_ylabel("Acc")
    ax.legend(fontsize=7)


def _unit_axes(ax: plt.Axes, xlabel: str, ylabel: str) -> None:
    """Both axes a share in [0, 1], labelled, with the legend."""
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def pr_figure(ax: plt.Axes, data: FindingData) -> None:
    """Precision against recall on box-test as the confidence threshold falls, the operating point marked."""
    tuned = data.tuned or {}
    test = tuned.get("box_test")
    if not test or not test["pr_curve"]:
        return _empty(ax, "no calibrated boxes on box-test")
    curve = test["pr_curve"]
    ax.plot([p["recall"] for p in curve], [p["precision"] for p in curve], marker=".", label="box-test")
    at = test["at_operating_point"]
    if tuned["operating_point"] is not None and at["boxes"]:
        ax.plot(
            [at["recall"]],
            [at["precision"]],
            "r*",
            markersize=12,
            label=f"operating point (conf >= {tuned['operating_point']:.2f})",
        )
    _unit_axes(ax, "recall (pairs with a hit, IoU >= 0.3)", "precision (boxes that hit)")


def reliability_figure(ax: plt.Axes, data: FindingData) -> None:
    """Reliability diagram on box-test: hit rate against mean confidence per bin, sized by boxes."""
    test = data.tuned["box_test"] if data.tuned else None
    if not test or not test["reliability"]["bins"]:
        return _empty(ax, "no calibrated boxes on box-test")
    bins = test["reliability"]["bins"]
    ax.plot([0, 1], [0, 1], color="#999", lw=1, label="calibrated")
    ax.scatter(
        [b["confidence"] for b in bins],
        [b["hit_rate"] for b in bins],
        s=[10 + 4 * b["boxes"] for b in bins],
        label=f"box-test, ECE {test['reliability']['ece']:.3f}",
    )
    _unit_axes(ax, "confidence (mean in bin)", "share of boxes that hit")


def confidence_section(data: FindingData) -> str:
    """What the boxes of this finding were chosen and calibrated by, and the operating point."""
    t = data.tuned
    if t is None:
        return (
            "<p class='muted'>No ground-truth box of this finding to calibrate on: its boxes carry no confidence and "
            "none is at an operating point (they are in coco-all/ only).</p>"
        )
    return (
        calibration_paragraph(t, data.at_operating_point)
        + halves_table(t)
        + baseline_paragraph(t)
        + "<p>The variants it was chosen from (each with its box rule chosen on box-val; "
        "Acc / rank-1 Acc at IoU 0.3):</p>" + alternatives_table(t)
    )


def calibration_paragraph(t: Mapping[str, Any], at_operating_point: int) -> str:
    """How the finding was boxed and calibrated (``t``: its tuned entry), and its operating point."""
    if t["operating_point"] is None:
        point = html.escape(
            t.get("operating_point_note")
            or "none: no confidence held the precision target on box-val's resamples, so no box of this "
            "finding is in coco/"
        )
    elif t.get("operating_point_kind") == "best achievable":
        point = (
            f"confidence &ge; {t['operating_point']:.3f}, <b>below the precision target</b>: "
            f"{html.escape(t['operating_point_note'])}. coco/'s category for this finding states it"
        )
    else:
        point = f"confidence &ge; {t['operating_point']:.3f}"
    return (
        f"<p>Boxed by <b>{html.escape(t['method'])}</b> with the box rule <b>{html.escape(rule_label(t))}</b>, both "
        "chosen on "
        f"box-val. Confidence: {html.escape(t['calibration']['kind'])} calibration on {t['calibration']['boxes']} "
        "box-val boxes "
        f"({t['calibration']['hits']} hits; fitted on {html.escape(t['fitted_on'])}). Each image's boxes are ranked by "
        f"this confidence: rank 1 is the box most likely right (the box rule's own order breaks ties and is kept as "
        f"<code>rule_rank</code>). Operating point: {point}; <b>{at_operating_point}</b> boxes of this release "
        "are at it.</p>"
    )


HALF_COLUMNS = [
    "half",
    "pairs",
    "Acc (IoU 0.3) [95% CI]",
    "rank-1 Acc [95% CI]",
    "rank-1 Acc, rule's order [95% CI]",
    "boxes at op.",
    "precision there [95% CI]",
    "recall there [95% CI]",
    "false positives / image there",
    "ECE [95% CI]",
]


def halves_table(t: Mapping[str, Any]) -> str:
    """The finding's figures on box-val (chosen on) and box-test (reported), at its operating point."""
    test = t["box_test"]
    rows = [
        half_row("box-val (chosen on)", t["box_val"], ""),
        half_row("box-test (reported)", test, with_ci(test["reliability"]["ece"], test["reliability"].get("ece_ci"))),
    ]
    return html_table(HALF_COLUMNS, rows)


def with_ci(value: float | None, bounds: Sequence[float | None] | None) -> str:
    """A figure and its 95% CI, as "0.84 [0.70, 0.95]" (the figure alone where the CI is undefined)."""
    return format_number(value) + ci_text(bounds)


def half_row(name: str, half: Mapping[str, Any], ece: str) -> list[Any]:
    at = half["at_operating_point"]
    few = f" (fewer than {FEW_PAIRS}: too few to trust)" if half["pairs"] < FEW_PAIRS else ""
    return [
        name,
        f"{half['pairs']}{few}",
        with_ci(half["acc"], half.get("acc_ci")),
        with_ci(half["acc_rank1"], half.get("acc_rank1_ci")),
        with_ci(half.get("acc_rank1_rule", math.nan), half.get("acc_rank1_rule_ci")),
        at["boxes"],
        with_ci(at["precision"], at.get("precision_interval")),
        with_ci(at["recall"], at.get("recall_ci")),
        format_number(at.get("afp", math.nan)),
        ece,
    ]


def alternatives_table(t: Mapping[str, Any]) -> str:
    """Each variant the finding's choice was made among, with its own box rule, on both halves."""
    rows = [
        [
            html.escape(v),
            html.escape(rule_label(a)),
            *(
                f"{with_ci(a[h]['acc'], a[h].get('acc_ci'))} / {with_ci(a[h]['acc_rank1'], a[h].get('acc_rank1_ci'))}"
                for h in ("box_val", "box_test")
            ),
        ]
        for v, a in t.get("alternatives", {}).items()
    ]
    return html_table(["variant", "box rule", "box-val", "box-test"], rows)


def interval_text(bounds: Sequence[float | None] | None, layout: str) -> str:
    """``layout`` filled with a bootstrap interval's two ends, or "" where it is undefined (NaN,
    or null as JSON keeps NaN)."""
    low, high = bounds or (None, None)
    return "" if low is None or math.isnan(low) else layout.format(format_number(low), format_number(high))


def baseline_paragraph(t: Mapping[str, Any]) -> str:
    """The CAM baseline with the paper's rule beside the released choice on box-test, and how
    stable the choice is over box-val's resamples (empty for a tuning made before either was kept)."""
    baseline, choice = t.get("baseline"), t.get("choice")
    if not baseline or not choice:
        return ""
    against, base = baseline["released_minus_baseline"], baseline["box_test"]
    spread = interval_text(against["interval"], " (90% interval {} to {})")
    return (
        f"<p>The baseline, {html.escape(baseline['method'])} with the paper's rule {html.escape(baseline['rule'])}, "
        "is kept "
        f"unless another variant or rule beats it on box-val beyond the noise of a bootstrap over box-val's "
        f"{choice['box_val_pairs']} images (one-sided, {choice['level']:.0%}); {format_number(choice['stability'])} of "
        f"{choice['resamples']} resamples of box-val make the same choice. On box-test the baseline's Acc is "
        f"{with_ci(base['acc'], base.get('acc_ci'))} (rank 1: {with_ci(base['acc_rank1'], base.get('acc_rank1_ci'))}); "
        f"released minus baseline: {format_number(against['difference'])}{spread}.</p>"
    )


GALLERY_SIDE = 270  # px, the longer side of a gallery image


def gallery_image(path: Path, item: GalleryItem, side: int = GALLERY_SIDE) -> str:
    """The image scaled to ``side`` px on its longer side, its ground-truth boxes in green and the
    mined box in red, as a PNG; drawn with PIL in under a third of a matplotlib figure's time (27
    against 93 ms for a 1024 px source here), for the report's six gallery images per finding."""
    if item.image is None:
        canvas = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(canvas).text((side // 2, side // 2), "image not readable", fill="#777777", anchor="mm")
        canvas.save(path)
        return path.name
    height, width = item.image.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = (
        Image.fromarray(np.ascontiguousarray(item.image, dtype=np.uint8))
        .resize(size, Image.Resampling.BILINEAR)
        .convert("RGB")
    )
    draw = ImageDraw.Draw(canvas)
    for box, colour in [*((b, "lime") for b in item.truth), (item.box, "red")]:
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=2)
    canvas.save(path)
    return path.name


def html_table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def acc_rows(data: FindingData) -> list[list[str]]:
    """T(IoU) x method cells "Acc [95% CI] / AFP"."""
    methods = list(data.acc)
    thresholds = sorted({t for table in data.acc.values() for t in table})

    def cell(c: Mapping[str, Any]) -> str:
        return f"{with_ci(c['acc'], c.get('acc_ci'))} / {format_number(c['afp'])}"

    return [[str(t)] + [cell(data.acc[m][t]) for m in methods] for t in thresholds]


def html_page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def finding_page(folder: Path, report: ReportData, data: FindingData) -> str:
    stem = data.finding.lower()
    figures = [
        figure_file(folder / f"{stem}-scores.png", lambda ax: score_figure(ax, data)),
        figure_file(folder / f"{stem}-size.png", lambda ax: size_figure(ax, data)),
        figure_file(folder / f"{stem}-position.png", lambda ax: position_figure(ax, data)),
        figure_file(folder / f"{stem}-accuracy.png", lambda ax: accuracy_figure(ax, data)),
    ]
    calibration_figures = [
        figure_file(folder / f"{stem}-precision-recall.png", lambda ax: pr_figure(ax, data)),
        figure_file(folder / f"{stem}-reliability.png", lambda ax: reliability_figure(ax, data)),
    ]
    gallery = gallery_figures(folder, stem, data)
    body = [
        f"<p><a href='index.html'>&larr; all findings</a></p><h1>{html.escape(data.finding)}</h1>",
        f"<p>{data.boxes_total} boxes on {data.images_covered} images; method <b>{html.escape(report.method)}</b>, "
        f"model {html.escape(report.model_id)}, release {html.escape(report.version)}.</p>",
        "<h2>Against the ground truth</h2>",
        (
            f"<p>Acc / AFP at T(IoU) on box-test: {data.evaluated_images} images with a ground-truth box of this "
            "finding that nothing was tuned on (the other half of the boxed images, box-val, is kept for choosing).</p>"
            + html_table(["T(IoU)", *data.acc], acc_rows(data))
        )
        if data.evaluated_images
        else "<p class='muted'>No image has a ground-truth box of this finding.</p>",
        "<h2>Confidence and operating point</h2>"
        + confidence_section(data)
        + "<div class='figures'>"
        + "".join(f"<img src='{f}' alt='{f}'>" for f in calibration_figures)
        + "</div>",
        "<h2>Distributions (rank-1 boxes)</h2><div class='figures'>"
        + "".join(f"<img src='{f}' alt='{f}'>" for f in figures)
        + "</div>",
        "<h2>Gallery</h2><p class='muted'>Red: the mined rank-1 box; green: ground truth where it exists.</p>"
        f"<div class='gallery'>{''.join(gallery) or '<p class=muted>no boxes</p>'}</div>",
        "<h2>Changes since the previous release</h2>",
        changes_section(report, data),
    ]
    name = page_name(data.finding)
    (folder / name).write_text(html_page(f"{data.finding}: {report.title}", "".join(body)))
    return name


def gallery_figures(folder: Path, stem: str, data: FindingData) -> list[str]:
    """The gallery's figures: each image drawn with its boxes (gallery_image), captioned."""
    gallery = []
    for k, item in enumerate(data.gallery):
        name = gallery_image(folder / f"{stem}-gallery-{k}.png", item)
        caption = f"{html.escape(item.group)}: {html.escape(item.image_id)}, score {item.score:.2f}"
        gallery.append(
            f"<figure><img src='{name}' alt='{html.escape(item.image_id)}'><figcaption>{caption}</figcaption></figure>"
        )
    return gallery


def changes_section(report: ReportData, data: FindingData) -> str:
    """The finding's boxes against the previous release's."""
    counts = [[data.changes.get(k, 0) for k in ("before", "after", "added", "removed")]]
    return html_table(["before", "after", "added", "removed"], counts) + (
        f"<p class='muted'>previous release: {html.escape(report.previous)}</p>"
        if report.previous
        else "<p class='muted'>first release: every box is new</p>"
    )


def headline_rows(report: ReportData, threshold: float = 0.3) -> list[dict[str, Any]]:
    """Per finding: boxes, images, boxes at the operating point and their precision and false
    positives per image (of the finding's images) on box-test, and Acc at ``threshold`` T(IoU)
    per method; the report's and the Prefect artifacts' headline table."""
    rows = []
    for data in report.findings:
        at = data.tuned["box_test"]["at_operating_point"] if data.tuned else {}
        row: dict[str, Any] = {
            "finding": data.finding,
            "boxes": data.boxes_total,
            "images": data.images_covered,
            "at operating point": data.at_operating_point,
            "operating point": operating_point_kind(data.tuned),
            "box-test pairs": box_test_pairs(data),
            "expected precision there": at.get("precision", math.nan),
            "its 95% CI": ci_text(at.get("precision_interval")).strip(),
            "false positives per image there": at.get("afp", math.nan),
            "added": data.changes.get("added", 0),
            "removed": data.changes.get("removed", 0),
        }
        for method, table in data.acc.items():
            cell = table.get(threshold, {}) if data.evaluated_images else {}
            row[f"acc@{threshold} {method}"] = cell.get("acc", math.nan)
            row[f"acc@{threshold} {method} 95% CI"] = ci_text(cell.get("acc_ci")).strip()
        rows.append(row)
    return rows


def operating_point_kind(tuned: Mapping[str, Any] | None) -> str:
    """How the finding's operating point was found: ``target`` (box-val's precision reaches it),
    ``best achievable`` (it does not: the precision there is stated), ``none``, or ``-`` untuned."""
    if tuned is None:
        return "-"
    if tuned["operating_point"] is None:
        return "none"
    return str(tuned.get("operating_point_kind") or "target")


def box_test_pairs(data: FindingData) -> str:
    """The finding's box-test pairs, flagged under FEW_PAIRS ("-" without ground truth)."""
    n = data.evaluated_images
    return MISSING if not n else f"{n} (fewer than {FEW_PAIRS})" if n < FEW_PAIRS else str(n)


REVIEW_COLUMNS = [
    "finding",
    "boxes reviewed",
    "accept / reject / redraw / skip",
    "images with ground truth: NIH / review",
    "coco/ boxes: before → now",
    "box-test pairs: before → now",
    "box-test Acc [95% CI]: before → now",
    "box-test precision at op. [95% CI]: before → now",
    "box-test ECE [95% CI]: before → now",
]


def review_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """The index's review table: per finding, the verdicts on its boxes (shares of the boxes
    reviewed), where its ground truth comes from, and its figures in the previous release and this one."""
    if not any(r["reviewed"] for r in rows):
        return (
            "<h2>Review</h2><p class='muted'>No box has been reviewed yet: <code>cxr-miner review RELEASE "
            "--workdir W</code> takes verdicts, and the next run uses them as ground truth.</p>"
        )

    def shares(row: Mapping[str, Any]) -> str:
        return " / ".join(f"{row['shares'].get(v, 0.0):.0%}" for v in ("accept", "reject", "redraw", "skip"))

    def change(row: Mapping[str, Any], name: str, digits: int = 2) -> str:
        def one(figures: Mapping[str, Any] | None) -> str:
            if figures is None:
                return MISSING
            if name in ("coco_boxes", "pairs"):
                return str(figures.get(name, 0))
            return format_number(figures.get(name), digits) + ci_text(figures.get(f"{name}_ci"), digits)

        return f"{one(row['before'])} &rarr; {one(row['after'])}"

    cells = [
        [
            html.escape(r["finding"]),
            r["reviewed"],
            shares(r) if r["reviewed"] else MISSING,
            f"{r['ground_truth']['nih']} / {r['ground_truth']['review']}",
            *(change(r, name) for name in ("coco_boxes", "pairs", "acc", "precision")),
            change(r, "ece", 3),
        ]
        for r in rows
    ]
    return (
        "<h2>Review</h2><p class='muted'>Reviewers' verdicts (<code>cxr-miner review</code>) over every release of "
        "this work folder, undone ones left out. Accepted and redrawn boxes are ground truth of their images "
        "(source <i>review</i>, kept apart from NIH's), split into box-val and box-test by patient like NIH's; "
        "before: the previous release, now: this one.</p>" + html_table(REVIEW_COLUMNS, cells)
    )


def write_report(folder: Path, report: ReportData) -> list[str]:
    """index.html and one page per finding into ``folder``; returns the page names."""
    folder.mkdir(parents=True, exist_ok=True)
    pages = [finding_page(folder, report, data) for data in report.findings]
    rows = headline_rows(report)
    header = list(rows[0]) if rows else ["finding"]
    cells = [
        [f"<a href='{page_name(r['finding'])}'>{html.escape(r['finding'])}</a>"]
        + [format_number(v) for k, v in r.items() if k != "finding"]
        for r in rows
    ]
    facts = html_table(None, [[html.escape(str(k)), html.escape(str(v))] for k, v in report.facts.items()])
    body = (
        f"<h1>{html.escape(report.title)}</h1><p>Release <b>{html.escape(report.version)}</b>, method "
        f"<b>{html.escape(report.method)}</b>, model {html.escape(report.model_id)}.</p>{facts}"
        "<h2>Per finding</h2><p class='muted'>At operating point: the boxes in coco/ (those whose calibrated "
        "confidence reaches the finding's operating point, chosen on box-val); expected precision there: the "
        "share of such boxes that hit a ground-truth box (IoU &ge; 0.3) on box-test, with its 95% bootstrap CI over "
        f"box-test's images (1,000 seeded resamples); a finding with fewer than {FEW_PAIRS} box-test pairs says so. "
        "Acc at T(IoU) = 0.3 on box-test "
        "(the half of the images with ground-truth boxes that nothing is tuned on); released: the variant and "
        "box rule each finding's boxes come from. Added / removed: boxes against the previous release.</p>"
        + html_table(header, cells)
        + review_section(report.review)
    )
    (folder / "index.html").write_text(html_page(report.title, body))
    missing = [f for f in FINDINGS if page_name(f) not in pages]
    if missing:
        raise ValueError(f"report without pages for {missing}")
    return ["index.html", *pages]
