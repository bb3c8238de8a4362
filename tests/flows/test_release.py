"""Releases end to end (flow ``run``) on the shared trained run: the Parquet read back with pyarrow and
DuckDB agrees with the COCO files, COCOeval and torchvision load them, the manifest's hashes
hold, a second release of the same harvest has the same boxes and no changes, releases are
immutable, the report opens in headless Chromium, and `serve` registers its schedule."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from cxr_miner.storage.releases.release import PROVENANCE_META, RELEASE_SCHEMA, ReleaseExists, publish, staging_dir
from cxr_miner.storage.stages.index import GT_BOXES_FILE
from cxr_miner.storage.vocab.findings import FINDINGS

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def test_parquet_has_the_schema_provenance_and_normalised_copies(released):
    _, _, first, _ = released
    path = Path(first["path"]) / "boxes.parquet"
    handle = pq.ParquetFile(path)
    assert handle.schema_arrow.remove_metadata().equals(RELEASE_SCHEMA)
    assert handle.metadata.row_group(0).column(0).compression == "ZSTD"
    provenance = json.loads(handle.schema_arrow.metadata[PROVENANCE_META])
    assert provenance["release"] == first["version"] and provenance["model"]["model_id"].startswith("t@")
    table = pq.read_table(path)
    assert len(table) == first["boxes"] > 0
    for name, size in (("x_min", "image_width"), ("y_max", "image_height")):
        expected = table.column(name).to_numpy() / table.column(size).to_numpy()
        assert np.allclose(table.column(f"{name}_norm").to_numpy(), expected, atol=1e-6)
    assert set(table.column("method").to_pylist()) <= {"cam", "am-t2", "am-t3"}
    tuned = [
        r
        for r in table.select(["finding", "confidence", "at_operating_point"]).to_pylist()
        if r["confidence"] is not None
    ]
    assert tuned and all(0 < r["confidence"] < 1 for r in tuned)


@pytest.mark.parametrize("variant, where", [("coco-all", "true"), ("coco", "at_operating_point")])
def test_duckdb_counts_agree_with_the_coco_files(released, variant, where):
    """coco-all/ holds every box of boxes.parquet, coco/ those at their finding's operating point;
    both list every image of the split."""
    _, _, first, _ = released
    folder = Path(first["path"])
    counts = duckdb.sql(
        f"SELECT split, finding, count(*) AS n FROM read_parquet('{folder / 'boxes.parquet'}') WHERE {where} GROUP BY split, finding"
    ).fetchall()
    by_db = {(split, finding): n for split, finding, n in counts}
    images = dict(
        duckdb.sql(
            f"SELECT split, count(DISTINCT image_id) FROM read_parquet('{folder / 'boxes.parquet'}') GROUP BY split"
        ).fetchall()
    )
    for split in ("train", "val", "test"):
        coco = COCO(str(folder / variant / f"{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(FINDINGS)
        for category in coco.loadCats(coco.getCatIds()):
            assert len(coco.getAnnIds(catIds=[category["id"]])) == by_db.get((split, category["name"]), 0)
        manifest = first["manifest"]["counts"][variant.replace("-", "_")][split]
        assert manifest["annotations"] == len(coco.getAnnIds()) and manifest["images"] == len(coco.getImgIds())
        assert len(coco.getImgIds()) >= images.get(split, 0)
    if variant == "coco-all":
        assert sum(n for n in by_db.values()) == first["boxes"]
    else:
        assert sum(n for n in by_db.values()) == sum(
            c["at_operating_point"] for c in first["manifest"]["counts"]["findings"].values()
        )


def test_manifest_records_each_calibrated_findings_operating_point(released):
    work, _, first, _ = released
    tuning = json.loads((work / "models" / "t" / "tuning.json").read_text())
    points = first["manifest"]["operating_points"]
    assert points and set(points) <= set(tuning["findings"])
    for finding, point in points.items():
        choice = tuning["findings"][finding]
        entry = choice["candidates"][choice["method"]]
        assert (point["method"], point["box_rule"], point["confidence_at_least"]) == (
            choice["method"],
            entry["rule"],
            entry["operating_point"],
        )
        assert point["box_test"]["ece"] == entry["box_test"]["reliability"]["ece"]
        assert (
            point["box_val"]["precision"] == entry["box_val"]["at_operating_point"]["precision"]
            or point["box_val"]["boxes"] == 0
        )


def xyxy(boxes: list[list[float]]):
    import torch

    b = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def test_cocoeval_agrees_with_an_independent_count_on_the_ground_truth(released):
    """The ground truth scored as its own detections gives AP 1 (our ids and boxes line up); for
    the mined boxes, COCOeval's recall per finding at IoU 0.1, 0.3, 0.5 equals the fraction of
    ground-truth boxes that torchvision's box_iou finds a mined box of the same image and
    finding for (one box per image and finding here, so greedy matching changes nothing)."""
    work, _, first, _ = released
    mined = json.loads((Path(first["path"]) / "coco-all" / "test.json").read_text())
    ids = {image["image_name"]: image["id"] for image in mined["images"]}
    truth = [b for b in pq.read_table(work / GT_BOXES_FILE).to_pylist() if b["image_id"] in ids]  # the test split's
    assert len(truth) >= 10
    gt = {key: mined[key] for key in ("images", "categories")}
    gt["annotations"] = [
        {
            "id": k,
            "image_id": ids[b["image_id"]],
            "category_id": FINDINGS.index(b["finding"]) + 1,
            "iscrowd": 0,
            "bbox": [b["x_min"], b["y_min"], b["x_max"] - b["x_min"], b["y_max"] - b["y_min"]],
            "area": (b["x_max"] - b["x_min"]) * (b["y_max"] - b["y_min"]),
        }
        for k, b in enumerate(truth, start=1)
    ]
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()

    thresholds = [0.1, 0.3, 0.5]

    def evaluated(annotations):
        evaluator = COCOeval(
            coco_gt, coco_gt.loadRes([{**a, "score": a.get("score", 1.0)} for a in annotations]), "bbox"
        )
        evaluator.params.imgIds = sorted({a["image_id"] for a in gt["annotations"]})
        evaluator.params.iouThrs = np.array(thresholds)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return evaluator

    assert evaluated(gt["annotations"]).stats[0] == pytest.approx(1.0)
    boxed = {a["image_id"] for a in gt["annotations"]}
    mined_boxed = [a for a in mined["annotations"] if a["image_id"] in boxed]
    recall = evaluated(mined_boxed).eval["recall"]  # (T, K, area, max detections)
    for t, threshold in enumerate(thresholds):  # recall = ground-truth boxes hit by a mined box of theirs, by box_iou
        for k, category in enumerate(coco_gt.getCatIds()):
            truths = [a for a in gt["annotations"] if a["category_id"] == category]
            if not truths:
                assert recall[t, k, 0, -1] == -1
                continue
            hits = 0
            for a in truths:
                ours = [
                    m["bbox"] for m in mined_boxed if m["image_id"] == a["image_id"] and m["category_id"] == category
                ]
                if ours:
                    hits += bool((box_iou(xyxy([a["bbox"]]), xyxy(ours)) >= threshold).any())
            assert recall[t, k, 0, -1] == pytest.approx(hits / len(truths)), (threshold, category)
    assert recall[0, :, 0, -1].max() > 0  # some ground truth is found at IoU 0.1


def test_torchvision_coco_detection_loads_a_split(released, trained_workdir):
    from torchvision.datasets import CocoDetection

    _, _, first, _ = released
    root = json.loads((trained_workdir / "ingest_report.json").read_text())["root"]
    dataset = CocoDetection(root, str(Path(first["path"]) / "coco-all" / "train.json"))
    image, annotations = next((dataset[i] for i in range(len(dataset)) if dataset[i][1]))
    record = dataset.coco.loadImgs(annotations[0]["image_id"])[0]
    assert image.size == (record["width"], record["height"])
    x, y, w, h = annotations[0]["bbox"]
    assert annotations[0]["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]]


def test_manifest_hashes_every_file_and_latest_is_the_newest(released):
    _, releases, first, second = released
    folder = Path(first["path"])
    manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(manifest["files"]) == files and "report/index.html" in files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert manifest["counts"]["boxes"] == first["boxes"] and manifest["model"]["model_id"].startswith("t@")
    assert sum(v["boxes"] for v in manifest["counts"]["findings"].values()) == first["boxes"]
    assert sorted(p.name for p in releases.iterdir() if not p.name.startswith(".")) == sorted(
        [first["version"], second["version"], "latest"]
    )
    assert [p.name for p in releases.glob(".*")] == [".cxr-miner.lock"]  # no staging folder left behind
    from importlib.metadata import version

    assert {k: manifest["packages"][k] for k in ("torch", "prefect", "pydicom")} == {
        k: version(k) for k in ("torch", "prefect", "pydicom")
    }
    assert first["version"] < second["version"] and (releases / "latest").resolve().name == second["version"]


def test_second_run_redoes_nothing_and_releases_the_same_boxes_with_no_changes(released):
    work, _, first, second = released
    assert json.loads((work / "harvest" / "harvest.json").read_text())["built"] == 0
    evaluated = (work / "models" / "t" / "evaluation.json").stat().st_mtime_ns
    assert evaluated < (Path(first["path"]) / "manifest.json").stat().st_mtime_ns  # not evaluated again
    assert second["manifest"]["model"] == first["manifest"]["model"]  # not retrained
    assert (
        pq.read_table(Path(second["path"]) / "boxes.parquet")
        .drop_columns([])
        .equals(pq.read_table(Path(first["path"]) / "boxes.parquet"))
    )
    changes = second["manifest"]["changes"]
    assert changes["previous"] == first["version"]
    assert all(
        c["added"] == 0 and c["removed"] == 0 and c["before"] == c["after"] for c in changes["findings"].values()
    )
    first_changes = first["manifest"]["changes"]["findings"]
    assert sum(c["added"] for c in first_changes.values()) == first["boxes"]


def test_an_evaluation_is_current_until_what_it_scored_or_wrote_changes(released, tmp_path):
    from cxr_miner.flows.evaluate import is_evaluated
    from tests.flows.helpers import copy_workdir

    work = copy_workdir(released[0], tmp_path / "w")  # hard links: a file is changed by writing a new one
    assert is_evaluated(str(work), "t")
    assert not is_evaluated(str(work), "t", box_val_fraction=0.4) and not is_evaluated(str(work), "other-run")

    def rewritten(path: Path, text: str) -> None:
        path.unlink()
        path.write_text(text)

    tuning = work / "models" / "t" / "tuning.json"
    original = tuning.read_text()
    for edit in (original.replace('"run"', '"run" ', 1), original[:-10]):  # edited, truncated
        rewritten(tuning, edit)
        assert not is_evaluated(str(work), "t")
    rewritten(tuning, original)
    assert is_evaluated(str(work), "t")
    boxes = work / GT_BOXES_FILE
    data = boxes.read_bytes()
    boxes.unlink()
    assert not is_evaluated(str(work), "t")
    boxes.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert not is_evaluated(str(work), "t")


def test_releases_are_immutable(released):
    _, releases, first, _ = released
    staging = staging_dir(releases, first["version"])
    with pytest.raises(ReleaseExists, match="immutable"):
        publish(staging, releases, first["version"])
    shutil.rmtree(staging)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in Path(first["path"]).rglob("*") if p.is_file()}
    assert modes == {0o444}  # read-only (bits only: the tests may run as root)


@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CXR_MINER_REQUIRE_BROWSER"),
    reason="Debian's chromium and chromium-driver are not installed (make test installs them)",
)
def test_report_pages_open_in_headless_chromium_with_every_image(released, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, _, first, _ = released
    report = Path(first["report"]).parent
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_window_size(1200, 1600)
        driver.get((report / "index.html").as_uri())
        links = driver.execute_script("return [...document.querySelectorAll('a')].map(a => a.getAttribute('href'))")
        assert sorted(links) == sorted(p for p in first["pages"] if p != "index.html")
        for page in first["pages"]:
            driver.get((report / page).as_uri())
            assert driver.title and "not found" not in driver.page_source.lower()
            broken = driver.execute_script(
                "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
            )
            assert broken == [], (page, broken)
            count = driver.execute_script("return document.images.length")
            assert count >= (0 if page == "index.html" else 4)
            assert driver.save_screenshot(str(tmp_path / f"{page}.png"))
    finally:
        driver.quit()


def test_serve_registers_the_deployment_with_its_schedule(trained_workdir, tmp_path):
    """`cxr-miner serve` against a Prefect server (the test harness's) registers `run` with its cron."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [
        sys.executable,
        "-m",
        "cxr_miner.flows.cli",
        "serve",
        str(tmp_path / "nih"),
        "--workdir",
        str(tmp_path / "w"),
        "--out",
        str(tmp_path / "r"),
        "--cron",
        "0 3 * * 1",
        "--name",
        "weekly-test",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    async def read_back():
        async with get_client() as client:
            return await client.read_deployment_by_name("run/weekly-test")

    try:
        deadline, deployment = time.monotonic() + 90, None
        while deployment is None and time.monotonic() < deadline and process.poll() is None:
            try:
                deployment = asyncio.run(read_back())
            except Exception:
                time.sleep(1)
        assert deployment is not None, process.stdout.read() if process.poll() is not None else "not registered in 90 s"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
        assert deployment.parameters["out"] == str((tmp_path / "r").resolve())
    finally:
        process.terminate()
        process.wait(timeout=30)
