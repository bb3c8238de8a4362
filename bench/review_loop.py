"""The review loop on the demo (issue 25): reviews simulated from demo_truth.csv for the first
``--boxes`` boxes of each of NIH's six unboxed findings in the review page's own order (the
stratified sampler), accept where IoU >= 0.5 with the drawn box, else reject; then the same
`cxr-miner run` as `make demo` on a copy of the demo's work folder (its trained models kept), once
before the reviews (the release reviewed, by this code) and once after. Prints, per finding, the
boxes in coco/ before and after, the images whose reviewed boxes were all rejected (negatives), and
the box-test pairs, precision at the operating point and ECE after, each with its 95% CI.

    python bench/review_loop.py --demo bench/out/demo-seed0   # a `make demo` output (nih/, work/, releases/)
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torchvision.ops import box_iou

from cxr_miner.flows.review import review_app
from cxr_miner.storage.releases.review_summary import release_figures
from cxr_miner.storage.releases.reviews import REVIEWS_FILE, ReviewStore
from cxr_miner.storage.vocab.findings import FINDINGS, UNBOXED_FINDINGS
from cxr_miner.storage.vocab.text import ci_text

CORNERS = ("x_min", "y_min", "x_max", "y_max")


def iou(a: list[float], b: list[float]) -> float:
    return float(box_iou(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))[0, 0])


def copy_demo(demo: Path, out: Path) -> tuple[Path, Path]:
    """The demo's work folder (hard links, without its harvest) and releases, copied under ``out``."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    def link(src: str, dst: str) -> None:
        try:
            Path(dst).hardlink_to(src)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(demo / "work", out / "work", ignore=shutil.ignore_patterns("harvest", "*.lock"), copy_function=link)
    shutil.copytree(demo / "releases", out / "releases", symlinks=True)
    return out / "work", out / "releases"


def simulate_reviews(release: Path, work: Path, root: Path, boxes: int) -> dict[str, dict[str, int]]:
    """Verdicts from demo_truth.csv on the first ``boxes`` boxes of each unboxed finding's queue."""
    drawn = {
        (r["image_id"], r["finding"]): [float(r[k]) for k in CORNERS]
        for r in csv.DictReader((root / "demo_truth.csv").open())
    }
    rows = {r["box_id"]: r for r in pq.read_table(release / "boxes.parquet").to_pylist()}
    app = review_app(release, work, reviewer="simulated")
    counts: dict[str, dict[str, int]] = {}
    with ReviewStore(work / REVIEWS_FILE) as store:
        for finding in UNBOXED_FINDINGS:
            for box_id in app.queues.get(finding, [])[:boxes]:
                box = rows[box_id]
                truth = drawn.get((box["image_id"], finding))
                right = truth is not None and iou([box[k] for k in CORNERS], truth) >= 0.5
                verdict = "accept" if right else "reject"
                store.record(release.name, app.boxes, box_id, verdict, "simulated")
                counts.setdefault(finding, {"accept": 0, "reject": 0})[verdict] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("bench/out/demo-seed0"))
    parser.add_argument("--boxes", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("bench/out/review-loop"))
    args = parser.parse_args()
    work, releases = copy_demo(args.demo, args.out)
    root = (args.demo / "nih").resolve()
    command = ["cxr-miner", "run", str(root), "--workdir", str(work), "--out", str(releases), "--preset", "cpu-demo"]
    cli = [str(Path(sys.executable).parent / command[0]), *command[1:]]
    subprocess.run(cli, check=True)  # the release before review, by this code (with box ids)
    release = (releases / "latest").resolve()
    counts = simulate_reviews(release, work, root, args.boxes)
    before = release_figures(json.loads((release / "manifest.json").read_text()))
    subprocess.run(cli, check=True)  # the next run, with the reviews
    latest = (releases / "latest").resolve()
    manifest = json.loads((latest / "manifest.json").read_text())
    after = release_figures(manifest)
    evaluation = json.loads((work / "models" / manifest["model"]["run"] / "evaluation.json").read_text())
    negatives = {f: n.get("rejected", 0) for f, n in evaluation.get("ground_truth", {}).items()}
    print(
        f"\nreviews: {args.boxes} boxes per unboxed finding, simulated from demo_truth.csv; {release.name} -> {latest.name}"
    )
    print(
        "| finding | reviewed: accepted / rejected | rejected-only images | coco/ boxes before -> after "
        "| box-test pairs | box-test precision at op. [95% CI] | box-test ECE [95% CI] |"
    )
    print("|---|---|---|---|---|---|---|")
    for finding in [f for f in FINDINGS if f in counts]:
        a, b, n = after[finding], before[finding], counts[finding]
        precision = "-" if a["precision"] is None else f"{a['precision']:.2f}{ci_text(a['precision_ci'])}"
        ece = "-" if a["ece"] is None else f"{a['ece']:.3f}{ci_text(a['ece_ci'], 3)}"
        print(
            f"| {finding} | {n['accept']} / {n['reject']} | {negatives.get(finding, 0)} "
            f"| {b['coco_boxes']} -> {a['coco_boxes']} | {a['pairs']} | {precision} | {ece} |"
        )


if __name__ == "__main__":
    main()
