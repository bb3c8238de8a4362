"""`cxr-miner review` and `cxr-miner reviews export` on a release of the whole chain: every box has
an id of its own, in boxes.parquet and COCO alike; verdicts posted to the server come out of the
export as ground truth, read back with pycocotools."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
from pycocotools.coco import COCO

from cxr_miner.flows.review import review_app
from cxr_miner.miner.calibration import HIT_IOU
from cxr_miner.storage.releases.review_server import review_server
from cxr_miner.storage.vocab.findings import UNBOXED_FINDINGS
from tests.flows.helpers import copy_workdir
from tests.flows.test_cli import _run


def _post(base: str, body: dict, token: str) -> int:
    request = urllib.request.Request(
        base + "/api/verdict",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "X-Review-Token": token},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def test_a_release_reviewed_over_http_exports_its_verdicts_as_ground_truth(released, monkeypatch, tmp_path):
    work, _, first, _ = released
    own = copy_workdir(work, tmp_path / "work")
    status, told = _run(monkeypatch, "reviews", "export", "--workdir", str(own))
    assert status == 2 and "reviews.sqlite: no reviews yet" in told

    release = Path(first["path"])
    ids = pq.read_table(release / "boxes.parquet", columns=["box_id"]).column("box_id").to_pylist()
    app = review_app(release, own, reviewer="ann")
    assert sorted(app.boxes) == sorted(ids) and len(set(ids)) == len(ids) > 0
    files = [COCO(str(release / "coco-all" / f"{split}.json")) for split in ("train", "val", "test")]
    in_coco = [a["box_id"] for coco in files for a in coco.anns.values()]
    assert sorted(in_coco) == sorted(ids)

    server = review_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        finding = next(iter(app.queues))
        accepted, redrawn = app.queues[finding][:2]
        assert _post(base, {"box_id": accepted, "verdict": "accept"}, app.token) == 200  # reviewer: --reviewer's
        assert _post(base, {"box_id": redrawn, "verdict": "redraw", "box": [1, 2, 30, 40]}, app.token) == 200
    finally:
        server.shutdown()
        server.server_close()

    status, told = _run(monkeypatch, "reviews", "export", "--workdir", str(own))
    assert status == 0 and "2 reviewed boxes on" in told
    coco = COCO(str(own / "reviews" / "reviewed.json"))
    truth = {a["box_id"]: (a["bbox"], a["reviewer"], coco.cats[a["category_id"]]["name"]) for a in coco.anns.values()}
    released_box = app.details[accepted]
    x0, y0, x1, y1 = (released_box[k] for k in ("x_min", "y_min", "x_max", "y_max"))
    assert truth == {
        accepted: ([x0, y0, x1 - x0, y1 - y0], "ann", finding),
        redrawn: ([1.0, 2.0, 29.0, 38.0], "ann", finding),
    }
    verdicts = pq.read_table(own / "reviews" / "reviews.parquet").to_pylist()
    assert [(v["box_id"], v["verdict"], v["release"]) for v in verdicts] == [
        (accepted, "accept", release.name),
        (redrawn, "redraw", release.name),
    ]


UNBOXED = UNBOXED_FINDINGS


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_reviews_of_an_unboxed_finding_give_it_a_confidence_in_the_next_release(
    released, dask_cluster, monkeypatch, tmp_path
):
    """The loop: reviews simulated from demo_truth.csv (accept a box the project counts as right,
    IoU >= HIT_IOU with the drawn box, else reject) for up to 60 boxes of one unboxed finding; the next `run`
    evaluates that finding on its reviewed images, calibrates it and sets its operating point, so
    its boxes carry a confidence and those at the operating point enter coco/."""
    import csv

    from cxr_miner.flows.pipeline import run
    from cxr_miner.storage.releases.reviews import REVIEWS_FILE, ReviewStore

    work, _, first, _ = released
    own = copy_workdir(work, tmp_path / "work")
    root = Path(json.loads((own / "ingest_report.json").read_text())["root"])
    release = Path(first["path"])
    boxes = pq.read_table(release / "boxes.parquet").to_pylist()
    drawn = {(r["image_id"], r["finding"]): [float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
             for r in csv.DictReader((root / "demo_truth.csv").open())}  # fmt: skip

    def verdict(box: dict) -> str:
        truth = drawn.get((box["image_id"], box["finding"]))
        corners = [box[k] for k in ("x_min", "y_min", "x_max", "y_max")]
        return "accept" if truth and _iou(corners, truth) >= HIT_IOU else "reject"

    def first_60(finding: str) -> list[dict]:
        """60 boxes to review: of 6 images only their wrong boxes (so those pairs are negatives), then
        every box of the other images in order."""
        mined = [b for b in boxes if b["finding"] == finding]
        wrong = [b for b in mined if verdict(b) == "reject"]
        negative_images = list(dict.fromkeys(b["image_id"] for b in wrong))[:6]
        negatives = [b for b in wrong if b["image_id"] in negative_images]
        return (negatives + [b for b in mined if b["image_id"] not in negative_images])[:60]

    # The small test model finds some unboxed findings better than others; the reviewer takes the one
    # whose 60 boxes hold the most right ones, so that there is something to calibrate on.
    finding = max(UNBOXED, key=lambda f: sum(verdict(b) == "accept" for b in first_60(f)))
    assert all(b["confidence"] is None for b in boxes if b["finding"] == finding)  # before: no confidence
    app = review_app(release, own, reviewer="simulated")
    reviewed = first_60(finding)
    with ReviewStore(own / REVIEWS_FILE) as store:
        for box in reviewed:
            store.record(release.name, app.boxes, box["box_id"], verdict(box), "simulated")
        accepted = sum(r["verdict"] == "accept" for r in store.current())
    assert accepted >= 10, f"{finding}: only {accepted} of {len(reviewed)} boxes right; too few to calibrate on"

    releases = tmp_path / "releases"  # the shared releases copied: the new one's previous is their latest
    shutil.copytree(release.parent, releases, symlinks=True)
    previous = json.loads((releases / "latest" / "manifest.json").read_text())
    options = {"preset": "cpu-small", "config_file": str(own / "settings.json"), "run": "t", "size": 128}
    again = run(root=str(root), workdir=str(own), out=str(releases), shard_size=64,
                dask_address=dask_cluster, **options)  # fmt: skip
    evaluation = json.loads((own / "models" / "t" / "evaluation.json").read_text())
    assert evaluation["ground_truth"][finding]["review"] > 0 and evaluation["ground_truth"][finding]["nih"] == 0
    # an image whose reviewed boxes were all rejected is a pair of negatives, in neither half's Acc
    accepted_images = {b["image_id"] for b in reviewed if verdict(b) == "accept"}
    rejected_only = len({b["image_id"] for b in reviewed} - accepted_images)
    assert rejected_only > 0 and evaluation["ground_truth"][finding]["rejected"] == rejected_only
    tuning = json.loads((own / "models" / "t" / "tuning.json").read_text())["findings"][finding]
    chosen = tuning["candidates"][tuning["method"]]
    assert chosen["calibration"] and chosen["box_test"]["pairs"] > 0
    assert chosen["box_val"]["rejected_pairs"] + chosen["box_test"]["rejected_pairs"] == rejected_only
    assert chosen["box_val"]["pairs"] + chosen["box_test"]["pairs"] == len(accepted_images)
    assert chosen["box_test"]["reliability"]["ece"] is not None and chosen["operating_point"] is not None
    after = pq.read_table(Path(again["path"]) / "boxes.parquet").to_pylist()
    mined = [b for b in after if b["finding"] == finding]
    assert mined and all(b["confidence"] is not None for b in mined)
    found = json.loads((Path(again["path"]) / "manifest.json").read_text())["localisation"]
    assert finding in found["findings"] and finding not in found["mean_over"]  # its own row, not in the means
    coco = COCO(str(Path(again["path"]) / "coco" / "train.json"))
    category = next(c["id"] for c in coco.cats.values() if c["name"] == finding)
    in_coco = len(coco.getAnnIds(catIds=[category]))
    at_point = sum(b["at_operating_point"] and b["split"] == "train" for b in mined)
    assert in_coco == at_point

    # evaluation.md says where the truth comes from, and gives the finding's ECE and precision with 95% CIs
    markdown = (own / "models" / "t" / "evaluation.md").read_text()
    assert f"| {finding} | 0 | {evaluation['ground_truth'][finding]['review']} | {rejected_only} |" in markdown
    test = chosen["box_test"]
    point_row = next(line for line in markdown.splitlines() if line.startswith(f"| {finding} ("))
    assert f"{test['reliability']['ece']:.3f} [{test['reliability']['ece_ci'][0]:.3f}," in point_row
    if chosen["operating_point"] is not None and test["at_operating_point"]["boxes"]:
        low, high = test["at_operating_point"]["precision_interval"]
        assert low <= test["at_operating_point"]["precision"] <= high
        assert f"[{low:.2f}, {high:.2f}]" in point_row
    # the new release's report: the verdicts' shares and the finding's coco/ boxes before and after
    page = (Path(again["path"]) / "report" / "index.html").read_text()
    shares = f"{accepted / len(reviewed):.0%} / {1 - accepted / len(reviewed):.0%} / 0% / 0%"
    assert "&amp;" not in page.split("<h2>Review</h2>")[1]  # nothing escaped twice
    row = page[page.index(f"<tr><td>{finding}</td><td>{len(reviewed)}</td>") :].split("</tr>")[0]
    coco_before, coco_after = (
        sum(bool(b["at_operating_point"]) for b in r if b["finding"] == finding) for r in (boxes, after)
    )
    assert f"<td>{shares}</td>" in row and f"<td>{coco_before} &rarr; {coco_after}</td>" in row
    assert previous["counts"]["findings"][finding]["at_operating_point"] == 0  # no confidence: none in coco/
    assert f"<td>0 &rarr; {test['pairs']}</td>" in row  # box-test pairs: none before
