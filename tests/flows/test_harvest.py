"""The harvest flow on the shared trained run, tuned by evaluate: every image accounted for,
resumable, and the same boxes after a killed worker, a rerun, or the evaluate flow's own
computation; each box calibrated and marked at its finding's operating point as tuned."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cxr_miner.flows.engine import mining
from cxr_miner.flows.engine.checkpoints import load_model, load_models, read_config
from cxr_miner.flows.engine.mining import labelled
from cxr_miner.flows.faults import FAULT_ENV, plant_fault
from cxr_miner.flows.harvest import harvest_localizer, run_harvest
from cxr_miner.miner.calibration import hits
from cxr_miner.miner.metrics import LocalizationEvaluator
from cxr_miner.miner.training import prepare_images
from cxr_miner.storage.stages.batches import batch_stream, split_row_groups
from cxr_miner.storage.stages.box_splits import box_splits
from cxr_miner.storage.stages.harvest import (
    PART_SCHEMA,
    harvest_summary_file,
    part_key,
    parts_dir,
    read_part,
    write_part,
)
from cxr_miner.storage.stages.index import GT_BOXES_FILE, read_gt_boxes
from cxr_miner.storage.stages.lock import LOCK_FILE
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS, FINDINGS
from tests.flows.helpers import copy_workdir

pytestmark = pytest.mark.slow
FEW_SPLITS = ("val", "test")  # 3 of the trained phantoms' 7 shards, 98 of 320 images


@pytest.fixture(scope="module")
def harvest_on(dask_cluster):
    """run_harvest on the shared cluster, one torch thread per worker."""

    def harvest(work: Path, **options):
        return run_harvest(str(work), "t", dask_address=dask_cluster, threads=1, **options)

    return harvest


@pytest.fixture(scope="module")
def harvested(released, tmp_path_factory) -> tuple[Path, dict]:
    """The trained run evaluated (which writes tuning.json), then harvested with ``--method auto``
    on the shared cluster, one torch thread per worker: the released fixture's workdir, whose
    ``run`` did just that, copied (hard links: flows replace files, never write into them)."""
    work = tmp_path_factory.mktemp("harvest") / "work"
    shutil.copytree(released[0], work, ignore=shutil.ignore_patterns("logs", LOCK_FILE), copy_function=os.link)
    return work, json.loads(harvest_summary_file(work).read_text())


def tuning_of(work: Path) -> dict:
    return json.loads(RunFolder.of(work, "t").tuning_json.read_text())


def all_parts(work: Path) -> pa.Table:
    return pa.concat_tables([read_part(p) for p in sorted(parts_dir(work).glob("*.parquet"))])


def parts_of(work: Path, shards: list[str]) -> pa.Table:
    """The parts of these shards (by name), in the order all_parts reads them."""
    return pa.concat_tables([read_part(p) for p in sorted(parts_dir(work).glob("*.parquet")) if p.stem in shards])


def shard_rows(work: Path) -> dict[str, dict]:
    reader = ShardReader(work / SHARD_DIR)
    columns = ["image_id", "findings", "source_width", "source_height"]
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in reader.paths])
    return {row["image_id"]: row for row in table.to_pylist()}


def test_every_image_gets_boxes_for_each_finding_it_is_labelled_with(harvested):
    work, summary = harvested
    images = shard_rows(work)
    boxes = all_parts(work)
    assert summary["images"] == len(images) == 320 and summary["boxes"] == len(boxes)
    found: dict[str, set[str]] = {}
    for row in boxes.to_pylist():
        found.setdefault(row["image_id"], set()).add(row["finding"])
        image = images[row["image_id"]]
        assert 0 <= row["x_min"] <= row["x_max"] <= image["source_width"]
        assert 0 <= row["y_min"] <= row["y_max"] <= image["source_height"]
        assert 0 < row["probability"] < 1 and row["model_id"] == summary["key"]["model_id"]
    assert {i: set(r["findings"]) for i, r in images.items() if r["findings"]} == found
    by_pair: dict[tuple[str, str], list[dict]] = {}
    for row in boxes.to_pylist():
        by_pair.setdefault((row["image_id"], row["finding"]), []).append(row)
    for rows in by_pair.values():
        rows.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1)) and 1 <= len(rows) <= 3
        assert sorted(r["rule_rank"] for r in rows) == list(range(1, len(rows) + 1))
        by_rule = sorted(rows, key=lambda r: r["rule_rank"])
        assert [r["score"] for r in by_rule] == sorted(
            (r["score"] for r in rows), reverse=True
        )  # every rule ranks by its score
        if rows[0]["confidence"] is not None:  # rank 1 the most confident, ties in the rule's order
            assert [(-r["confidence"], r["rule_rank"]) for r in rows] == sorted(
                (-r["confidence"], r["rule_rank"]) for r in rows
            )
    assert summary["boxes_per_finding"] == {
        f: int(np.sum(np.array(boxes.column("finding").to_pylist()) == f)) for f in FINDINGS
    }


def test_each_finding_is_boxed_and_calibrated_as_tuned_on_box_val(harvested):
    """The method variant of each box is its finding's choice; a boxed finding's boxes carry a
    confidence in (0, 1), at the operating point exactly when it reaches the tuned confidence; the
    six findings without ground truth are boxed by the run's AM over all steps, uncalibrated."""
    work, summary = harvested
    tuning = tuning_of(work)
    assert summary["key"]["method"] == "auto"
    for row in all_parts(work).to_pylist():
        choice = tuning["findings"].get(row["finding"])
        if choice is None:
            assert row["finding"] not in BOXED_FINDINGS
            assert row["method"] == "am-t3" and row["confidence"] is None and row["at_operating_point"] is False
            continue
        picked = choice["candidates"][choice["method"]]
        assert row["method"] == choice["method"] and 0 < row["confidence"] < 1
        point = picked["operating_point"]
        assert row["at_operating_point"] == (point is not None and row["confidence"] >= np.float32(point) - 1e-6)


def test_boxes_on_the_boxed_images_score_as_evaluate_scores_them(harvested):
    """Acc from the harvested boxes on the box-test images equals the evaluate flow's Acc of what it
    chose per finding (``released``): the harvest's one mining pass and per-finding box rules give
    the boxes evaluate scored, variant by variant."""
    work, _ = harvested
    truth = read_gt_boxes(work / GT_BOXES_FILE)
    report = json.loads(RunFolder.of(work, "t").evaluation_json.read_text())
    assert report["split"] == "box-test"
    patients = {
        r["image_id"]: r["patient_id"]
        for r in pq.read_table(work / "index.parquet", columns=["image_id", "patient_id"]).to_pylist()
    }
    halves = box_splits(patients, truth)
    assert report["images"] == sum(h == "box-test" for h in halves.values()) > 0
    assert report["box_val"]["images"] == sum(h == "box-val" for h in halves.values()) > 0
    evaluator = LocalizationEvaluator()
    boxes = all_parts(work).to_pylist()
    for image_id, findings in truth.items():
        if halves[image_id] != "box-test":
            continue
        for finding, gt in findings.items():
            mine = sorted(
                (r for r in boxes if r["image_id"] == image_id and r["finding"] == finding), key=lambda r: r["rank"]
            )
            evaluator.accumulate(
                finding, np.array([[r["x_min"], r["y_min"], r["x_max"], r["y_max"]] for r in mine]).reshape(-1, 4), gt
            )
    ours = evaluator.compute()
    tuning = tuning_of(work)
    for finding, choice in tuning["findings"].items():  # rank 1 as released: by confidence or by the rule
        rank1 = [
            r
            for r in boxes
            if r["finding"] == finding
            and r["rank"] == 1
            and halves.get(r["image_id"]) == "box-test"
            and finding in truth[r["image_id"]]
        ]
        hit = [
            hits(np.array([[r["x_min"], r["y_min"], r["x_max"], r["y_max"]]]), np.array(truth[r["image_id"]][finding]))[
                0
            ]
            for r in rank1
        ]
        expected = choice["candidates"][choice["method"]]["box_test"]
        pairs = sum(finding in truth[i] for i, h in halves.items() if h == "box-test")
        assert pairs == expected["pairs"]
        if pairs:
            assert sum(hit) / pairs == pytest.approx(expected["acc_rank1"]), finding
    for finding in BOXED_FINDINGS:
        for threshold in (0.1, 0.3, 0.5):
            expected = report["results"]["released"][finding]["iou"][str(threshold)]
            got = ours[finding]["iou"][threshold]
            assert got["acc"] == pytest.approx(expected["acc"], nan_ok=True), (finding, threshold)
            assert got["afp"] == pytest.approx(expected["afp"], nan_ok=True), (finding, threshold)


def test_boxing_overlapped_with_the_next_batch_gives_the_same_rows_in_order(harvested):
    """shard_rows with ``overlap`` (a batch boxed in a thread while the next one's forward passes
    run, the default on a GPU) against boxing each batch after its own passes, on batches of 8."""
    work, summary = harvested
    localizer = harvest_localizer(RunFolder.of(work, "t"), "auto")
    models = load_models(RunFolder.of(work, "t"), localizer.checkpoints())
    shard = ShardReader(work / SHARD_DIR).paths[0]
    model_id = summary["key"]["model_id"]
    after, images = mining.shard_rows(localizer, models, shard, labelled, 8, model_id, overlap=False)
    overlapped, count = mining.shard_rows(localizer, models, shard, labelled, 8, model_id, overlap=True)
    assert count == images > 16 and len(after) > 0
    assert json.dumps(overlapped, default=float) == json.dumps(after, default=float)  # floats exactly, NaN too


def test_rerun_skips_every_part_and_redoes_one_made_with_another_key(harvested, harvest_on):
    work, first = harvested
    before = {p.name: p.stat().st_mtime_ns for p in parts_dir(work).glob("*.parquet")}
    again = harvest_on(work)
    assert again["built"] == 0 and again["boxes"] == first["boxes"]
    assert {p.name: p.stat().st_mtime_ns for p in parts_dir(work).glob("*.parquet")} == before
    reference = all_parts(work)
    stale = sorted(parts_dir(work).glob("*.parquet"))[2]
    write_part(stale, [], {**part_key(stale), "model_id": "another"}, images=0)
    redone = harvest_on(work)
    assert redone["built"] == 1 and all_parts(work).equals(reference)


def test_a_killed_worker_is_survived_with_the_same_boxes(harvested, trained_workdir, tmp_path, monkeypatch):
    """On a cluster of its own, whose workers see the planted fault; the val and test shards (3 of 7:
    what is tested is the lost task's rerun, not the harvest of more shards)."""
    reference, _ = harvested
    work = copy_workdir(trained_workdir, tmp_path / "work")
    shutil.copy2(RunFolder.of(reference, "t").tuning_json, RunFolder.of(work, "t").tuning_json)
    shards = [s["name"] for s in ShardReader(work / SHARD_DIR).shards if s["split"] in FEW_SPLITS]
    plant_fault(tmp_path / "fault.json", shards[1], "exit")
    monkeypatch.setenv(FAULT_ENV, str(tmp_path / "fault.json"))
    summary = run_harvest(str(work), "t", workers=2, splits=FEW_SPLITS)
    assert not (tmp_path / "fault.json").exists()  # the worker did die
    assert summary["built"] == len(summary["shards"]) == len(shards) > 2
    assert all_parts(work).equals(parts_of(reference, shards))


def classifier_probabilities(work: Path) -> dict[tuple[str, str], float]:
    """(image id, finding) -> the step-1 sigmoid, by a plain forward pass over every shard."""
    config = read_config(RunFolder.of(work, "t"))
    model, _ = load_model(RunFolder.of(work, "t").step(1))
    out = {}
    for batch in batch_stream(split_row_groups(work, ("train", "val", "test")), 32):
        with torch.no_grad():
            scores = torch.sigmoid(
                model(prepare_images(torch.from_numpy(batch.images), config.input_size, torch.device("cpu")))
            )
        for image_id, row in zip(batch.meta["image_id"], scores.numpy()):
            out.update({(image_id, f): float(p) for f, p in zip(FINDINGS, row)})
    return out


def test_discovery_mode_boxes_exactly_the_findings_scored_above_the_threshold(trained_workdir, harvest_on, tmp_path):
    work = copy_workdir(trained_workdir, tmp_path / "work")
    probability = classifier_probabilities(work)
    values = np.sort(np.array(list(probability.values())))
    middle = len(values) // 2  # a threshold half-way across the widest gap near the median: no pair sits on it
    gaps = np.diff(values[middle - 200 : middle + 200])
    widest = int(np.argmax(gaps)) + middle - 200
    threshold = float((values[widest] + values[widest + 1]) / 2)
    expected = {pair for pair, p in probability.items() if p >= threshold}
    assert 0.2 < len(expected) / len(probability) < 0.8  # the threshold excludes many pairs, keeps many
    harvest_on(work, method="cam", all_findings=True, min_score=threshold)
    boxes = all_parts(work)
    assert set(zip(boxes.column("image_id").to_pylist(), boxes.column("finding").to_pylist())) == expected
    for row in boxes.select(["image_id", "finding", "probability"]).to_pylist():
        assert row["probability"] == pytest.approx(probability[(row["image_id"], row["finding"])], abs=1e-5)
    key = part_key(next(parts_dir(work).glob("*.parquet")))
    assert key["method"] == "cam" and key["mode"] == "discovery" and len(key["checkpoints"]) == 1
    assert {c["variant"] for c in key["choices"].values()} == {"cam"}
    assert key["min_score"] == threshold
    assert boxes.schema.names == PART_SCHEMA.names and set(boxes.column("method").to_pylist()) == {"cam"}


def test_am_harvest_boxes_every_finding_with_am_by_its_own_tuned_rule(harvested, trained_workdir, harvest_on, tmp_path):
    work = copy_workdir(trained_workdir, tmp_path / "work")
    shutil.copy2(RunFolder.of(harvested[0], "t").tuning_json, RunFolder.of(work, "t").tuning_json)
    summary = harvest_on(work, method="am")
    tuning = tuning_of(work)
    choices = summary["key"]["choices"]
    assert {c["variant"] for c in choices.values()} == {"am-t3"}
    for finding in BOXED_FINDINGS:
        assert choices[finding]["rule"] == tuning["findings"][finding]["candidates"]["am-t3"]["rule"]
    assert set(all_parts(work).column("method").to_pylist()) == {"am-t3"}


@pytest.mark.parametrize(
    "method, error, message",
    [
        ("mil", FileNotFoundError, "method 'mil' needs mil-all.safetensors .train the run with --method mil"),
        ("grad", ValueError, "unknown method 'grad'"),
    ],
)
def test_unknown_or_untrained_methods_are_refused(trained_workdir, method, error, message, tmp_path):
    work = copy_workdir(trained_workdir, tmp_path / "work")  # a flow holds its folder's lock: not the shared one
    with pytest.raises(error, match=message):
        run_harvest(str(work), "t", workers=1, method=method)


def test_a_cluster_started_apart_with_workers_elsewhere_gives_the_local_boxes(
    harvested, trained_workdir, tmp_path, monkeypatch
):
    """A scheduler and two workers started as processes of their own (as on machines the flow does
    not manage), each worker in a working directory of its own, and the work folder given relative
    to the command's: the boxes of the harvest on the tests' local cluster."""
    import os
    import socket
    import subprocess
    import sys

    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    reference, _ = harvested
    work = copy_workdir(trained_workdir, tmp_path / "work")
    shutil.copy2(RunFolder.of(reference, "t").tuning_json, RunFolder.of(work, "t").tuning_json)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    places = [tmp_path / name for name in ("scheduler", "worker-a", "worker-b")]
    for place in places:
        place.mkdir()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
            cwd=places[0],
            env=env,
            stderr=subprocess.DEVNULL,
        )
    ]
    processes += [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--dashboard-address",
                ":0",
                "--name",
                place.name,
            ],
            cwd=place,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for place in places[1:]
    ]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            assert sorted(client.run(os.getcwd).values()) == [str(p) for p in places[1:]]
        monkeypatch.chdir(tmp_path)
        summary = run_harvest("work", "t", dask_address=address, threads=1, splits=FEW_SPLITS)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
    assert summary["built"] == len(summary["shards"]) > 2
    assert all_parts(work).equals(parts_of(reference, summary["shards"]))
