"""The detector check's output: ``detector-check.json`` and the report page ``report/detector-check.html``
(a table per finding and AP bars), added to a copy of the checked release as a new release version.

Releases are immutable, so the check never writes into the release it checks: the new version holds
the checked release's files unchanged (hard links where the file system allows), the two added files
(with a figure beside the page), and a manifest that lists them with their sha256 and says which
release was checked (``detector_check``). boxes.parquet and the COCO files are byte for byte the
checked release's, so their provenance still names it.
"""

from __future__ import annotations

import html
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cxr_miner.storage.releases.detector_sets import TRAINING_SETS, CheckPlan
from cxr_miner.storage.releases.release import (
    MANIFEST_FILE,
    discard_staging,
    file_digests,
    fresh_version,
    is_private,
    publish,
    read_manifest,
    staging_dir,
)
from cxr_miner.storage.releases.report import figure_file, html_page, html_table
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.provenance import file_sha256
from cxr_miner.storage.vocab.text import format_number, markdown_table

CHECK_FILE = "detector-check.json"
CHECK_PAGE = "report/detector-check.html"
CHECK_FIGURE = "report/detector-check-ap30.png"
COLUMNS = {
    "ap30": "AP@0.3",
    "ap50": "AP@0.5",
    "ap": "AP@[.5:.95]",
    "recall1_30": "R@1 (0.3)",
    "recall3_30": "R@3 (0.3)",
}


MARGIN = 0.01  # AP@0.3 by which the mined boxes must beat the prior (the figures are shown to 2 decimals)


def verdicts(figures: Mapping[str, Mapping[str, Mapping[str, float]]], findings: Sequence[str]) -> dict[str, str]:
    """Per finding (and overall): whether the detector trained on mined boxes at the operating point
    beats the prior's by more than MARGIN at AP@0.3 (the mined boxes are worth releasing where they do)."""
    said = {}
    for finding in [*findings, "overall"]:
        mined, prior = figures["mined"][finding]["ap30"], figures["prior"][finding]["ap30"]
        if math.isnan(mined):
            said[finding] = "not scored (no mined box at the operating point to learn from)"
        elif math.isnan(prior):
            said[finding] = "not scored (no prior)"
        else:
            verdict = BEATS if mined > prior + MARGIN else "does not beat the prior"
            said[finding] = f"{verdict} (AP@0.3 {mined:.2f} against {prior:.2f})"
    return said


BEATS = "beats the prior"


def check_record(
    release: str,
    detector: dict[str, Any],
    background_ratio: float,
    seed: int,
    plan: CheckPlan,
    set_epochs: Mapping[str, int],
    speeds: Mapping[str, Mapping[str, Any]],
    figures: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> dict[str, Any]:
    """detector-check.json: what was checked and how, each training set's record (its epochs and
    speed, ``speeds``: images_per_second and train_seconds), the figures and the verdicts."""
    return {
        "checked_release": release,
        "detector": detector,
        "background_ratio": background_ratio,
        "seed": seed,
        "findings": list(plan.findings),
        "box_val_fraction": plan.box_val_fraction,
        "test_images": len(plan.test),
        "test_boxes": sum(len(b) for b in plan.test.values()),
        "prior_boxes": plan.prior,
        "sets": {
            name: {**s.record(), "epochs": set_epochs.get(name, 0), **speeds[name]} for name, s in plan.sets.items()
        },
        "figures": figures,
        "verdicts": verdicts(figures, plan.findings),
    }


def check_markdown(check: Mapping[str, Any]) -> str:
    """Per finding and overall: one row per training set, the COLUMNS figures on box-test."""
    parts = []
    for finding in [*check["findings"], "overall"]:
        rows = [[name, *(check["figures"][name][finding][m] for m in COLUMNS)] for name in check["sets"]]
        parts.append(
            f"**{finding}** (mined boxes: {check['verdicts'][finding]})\n\n"
            + markdown_table(["trained on", *COLUMNS.values()], rows)
        )
    return "\n\n".join(parts)


def ap_bars(ax: plt.Axes, check: Mapping[str, Any]) -> None:
    """Grouped bars: AP@0.3 per finding (and overall), one bar per training set."""
    groups = [*check["findings"], "overall"]
    names = list(check["sets"])
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [check["figures"][name][g]["ap30"] for g in groups]
        ax.bar(np.arange(len(groups)) + (k - (len(names) - 1) / 2) * width, np.nan_to_num(values), width, label=name)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("AP at IoU 0.3 on box-test")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncols=len(names))


def check_page(check: Mapping[str, Any], figure: str) -> str:
    """The report page (HTML) of a detector check; ``figure``: the AP bars' file name beside it."""

    def table(finding: str) -> str:
        rows = [
            [html.escape(name), *(format_number(check["figures"][name][finding][m]) for m in COLUMNS)]
            for name in check["sets"]
        ]
        return (
            f"<h3>{html.escape(finding)}</h3><p>Mined boxes: <b>{html.escape(check['verdicts'][finding])}</b>.</p>"
            + html_table(["trained on", *COLUMNS.values()], rows)
        )

    sets = [
        [
            html.escape(name),
            html.escape(s["description"]),
            s["positive_images"],
            s["background_images"],
            s["boxes"],
            s["left_out_images"],
            s["epochs"],
        ]
        for name, s in check["sets"].items()
    ]
    detector = check["detector"]
    body = (
        "<p><a href='index.html'>&larr; the harvest report</a></p><h1>Detector check</h1>"
        f"<p>Release <b>{html.escape(check['checked_release'])}</b> checked: a {html.escape(detector['name'])} "
        f"at {detector['size']} px, trunk weights {html.escape(detector['weights'])}, trained on each set below for "
        "as many "
        f"steps as {detector['epochs']} epochs of the largest set, all scored by COCOeval on the radiologists' "
        "boxes of the "
        f"{check['test_images']} box-test images (no image of a box-test patient is trained on).</p>"
        + html_table(
            ["trained on", "what", "positive images", "background images", "boxes", "left out", "epochs"], sets
        )
        + "<p class='muted'>Left out: images labelled with a finding the set has no box for. AP@0.3 and AP@0.5: "
        "average precision at that IoU; R@k (0.3): recall with the k top detections of a finding per image at IoU "
        "0.3.</p>"
        f"<div class='figures'><img src='{figure}' alt='AP at IoU 0.3'></div>"
        + "".join(table(f) for f in [*check["findings"], "overall"])
    )
    return html_page("Detector check", body)


def write_check(folder: Path, check: Mapping[str, Any]) -> None:
    """detector-check.json, the report page and its figure into a release (staging) folder."""
    write_json(folder / CHECK_FILE, check)
    (folder / CHECK_PAGE).parent.mkdir(parents=True, exist_ok=True)
    figure = figure_file(
        folder / CHECK_FIGURE, lambda ax: ap_bars(ax, check), size=(max(5.0, 1.1 * (len(check["findings"]) + 1)), 3.2)
    )
    (folder / CHECK_PAGE).write_text(check_page(check, figure))


def copy_release(source: Path, target: Path) -> None:
    """Every file of the release ``source`` except its manifest into ``target`` (hard links where possible)."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or relative.as_posix() == MANIFEST_FILE:
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target / relative)
        except OSError:
            shutil.copy2(path, target / relative)


def publish_checked(
    out: Path, source: Path, check: Mapping[str, Any], write: Callable[[Path, Mapping[str, Any]], None] = write_check
) -> Path:
    """A new release version under ``out``: the release ``source`` plus the check (module doc); returns its folder."""
    manifest = read_manifest(source)
    version = fresh_version(out)
    staging = staging_dir(out, version)
    try:
        copy_release(source, staging)
        check = {**check, "release": version}
        write(staging, check)
        manifest.update(
            version=version,
            files=file_digests(staging),
            detector_check={
                "checked_release": source.name,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "file": CHECK_FILE,
                "sha256": file_sha256(staging / CHECK_FILE),
                "page": CHECK_PAGE,
                "overall_ap30": {name: check["figures"][name]["overall"]["ap30"] for name in TRAINING_SETS},
                "verdicts": check["verdicts"],
            },
        )
        write_json(staging / MANIFEST_FILE, manifest)
        return publish(staging, out, version, private=is_private(source))
    except BaseException:
        discard_staging(staging)
        raise
