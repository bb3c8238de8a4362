"""The command line: bad input ends with the file, line and value, exit status 2, no traceback."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

import cxr_miner.flows.cli
from cxr_miner.flows.cli import main
from cxr_miner.storage.stages.lock import folder_lock


def _run(monkeypatch, *args) -> tuple[int, str]:
    """Run the CLI in-process; return its exit status and what it told the user."""
    out = io.StringIO()
    monkeypatch.setattr(cxr_miner.flows.cli, "err", Console(file=out, soft_wrap=True))
    monkeypatch.setattr(sys, "argv", ["cxr-miner", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, out.getvalue()


@pytest.mark.parametrize("value", ["Hernja", "[/red][b]x"])
def test_unknown_finding_is_reported_with_file_line_and_value_as_it_is(
    tmp_path, monkeypatch, nih_excerpt, prefect_server, value
):
    """The message names file, line and value; rich would read ``[/red]`` as markup (and crash) and
    drop ``[b]``, so messages are not markup."""
    root = tmp_path / "nih"
    root.mkdir()
    text = (
        (nih_excerpt / "Data_Entry_2017_v2020.csv")
        .read_text()
        .replace("00000003_000.png,Hernia", f"00000003_000.png,{value}")
    )
    (root / "Data_Entry_2017_v2020.csv").write_text(text)
    status, told = _run(monkeypatch, "ingest", str(root), "--workdir", str(tmp_path / "w"), "--metadata-only")
    assert status == 2
    assert f"Data_Entry_2017_v2020.csv:13: unknown finding '{value}'" in told


def test_metadata_only_ingest_of_the_excerpt(tmp_path, monkeypatch, nih_excerpt, prefect_server):
    import pyarrow.parquet as pq

    status, told = _run(monkeypatch, "ingest", str(nih_excerpt), "--workdir", str(tmp_path / "w"), "--metadata-only")
    assert status in (0, None) and "34 images" in told
    index = pq.read_table(tmp_path / "w" / "index.parquet").to_pylist()
    assert len(index) == 34 and all(r["file_present"] is None for r in index)
    assert len(pq.read_table(tmp_path / "w" / "gt_boxes.parquet")) == 15


def test_preprocess_without_ingest_says_what_to_run(tmp_path, monkeypatch, prefect_server):
    status, told = _run(monkeypatch, "preprocess", "--workdir", str(tmp_path), "--workers", "1")
    assert status == 2 and "run `cxr-miner ingest` first" in told


def test_run_logs_keep_the_message_and_drop_the_traceback():
    import logging

    from cxr_miner.flows.logs import quiet_run_tracebacks

    quiet_run_tracebacks()
    quiet_run_tracebacks()  # idempotent
    logger = logging.getLogger("prefect.task_runs")
    (ours,) = [f for f in logger.filters if type(f).__name__ == "_DropTraceback"]
    error = RuntimeError("bug")
    record = logger.makeRecord(
        "prefect.task_runs", logging.ERROR, __file__, 1, "failed: bug", (), (type(error), error, None)
    )
    assert ours.filter(record) and record.exc_info is None and record.getMessage() == "failed: bug"


RELEASED = {"version": "v", "path": "p", "boxes": 0, "report": "r"}


@pytest.mark.parametrize(
    "words, module, name, returns, expected",
    [
        (
            ["train", "--workdir", "W", "--run", "x", "--method", "cam"],
            "cxr_miner.flows.train",
            "train",
            {"directory": "d", "steps": [1], "auc": [{"finding": "Mass", "step1": None}]},
            {"run": "x", "method": "cam"},
        ),
        (
            ["evaluate", "--workdir", "W", "--run", "x", "--box-val-fraction", "0.3"],
            "cxr_miner.flows.evaluate",
            "evaluate",
            {"markdown": "", "path": "e", "images": 0, "split": "box-test", "box_val": {"images": 0}},
            {"run": "x", "box_val_fraction": 0.3},
        ),
        (
            ["harvest", "--workdir", "W", "--run", "x", "--method", "cam"],
            "cxr_miner.flows.harvest",
            "run_harvest",
            {"boxes": 0, "images": 0, "key": {"model_id": "x@0", "method": "cam", "mode": "mining"}},
            {"method": "cam"},
        ),
        (
            ["run", "ROOT", "--workdir", "W", "--out", "R", "--run", "x", "--method", "cam"],
            "cxr_miner.flows.pipeline",
            "run",
            RELEASED,
            {"run": "x", "method": "cam", "root": "ROOT"},
        ),
    ],
)
def test_run_and_method_options_reach_the_flows(
    monkeypatch, tmp_path, prefect_server, words, module, name, returns, expected
):
    """--run names the training run and --method the registered method, in every command."""
    import importlib

    monkeypatch.chdir(tmp_path)
    (tmp_path / "W").mkdir()  # the command line holds the work folder's lock before the (recorded) flow

    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return returns

    monkeypatch.setattr(importlib.import_module(module), name, record)
    status, told = _run(monkeypatch, *words)
    assert status in (0, None), told
    ((args, kwargs),) = calls
    assert {k: kwargs[k] for k in expected} == expected
    if name == "run_harvest":
        assert args[1] == "x"  # the run, positionally


def _collection(tmp_path, nih_excerpt, name: str, rows: int | None) -> str:
    """A copy of the excerpt's Data_Entry CSV with its header and the first ``rows`` rows (all by default)."""
    root = tmp_path / name
    root.mkdir()
    lines = (nih_excerpt / "Data_Entry_2017_v2020.csv").read_text().splitlines(keepends=True)
    (root / "Data_Entry_2017_v2020.csv").write_text("".join(lines[: 1 + rows] if rows is not None else lines))
    return str(root)


def test_a_header_only_csv_is_refused_and_the_index_kept(tmp_path, monkeypatch, nih_excerpt, prefect_server):
    work = tmp_path / "w"
    assert _run(
        monkeypatch,
        "ingest",
        _collection(tmp_path, nih_excerpt, "full", None),
        "--workdir",
        str(work),
        "--metadata-only",
    )[0] in (0, None)
    before = (work / "index.parquet").read_bytes()
    status, told = _run(
        monkeypatch, "ingest", _collection(tmp_path, nih_excerpt, "empty", 0), "--workdir", str(work), "--metadata-only"
    )
    assert status == 2 and "Data_Entry_2017_v2020.csv: lists no images: nothing was written" in told
    assert (work / "index.parquet").read_bytes() == before


@pytest.mark.parametrize(
    "rows, flags, refused",
    [(30, [], True), (30, ["--allow-shrink"], False), (32, [], False), (30, ["--max-shrink", "0.2"], False)],
)
def test_an_index_that_shrinks_more_than_allowed_is_refused(
    tmp_path, monkeypatch, nih_excerpt, prefect_server, rows, flags, refused
):
    """34 images indexed; then 30 (12% fewer, over the default 10%) or 32 (6%)."""
    work = tmp_path / "w"
    _run(
        monkeypatch,
        "ingest",
        _collection(tmp_path, nih_excerpt, "full", None),
        "--workdir",
        str(work),
        "--metadata-only",
    )
    before = (work / "index.parquet").read_bytes()
    status, told = _run(
        monkeypatch,
        "ingest",
        _collection(tmp_path, nih_excerpt, "less", rows),
        "--workdir",
        str(work),
        "--metadata-only",
        *flags,
    )
    if refused:
        assert status == 2 and "30 usable images against 34" in told and "12% fewer, more than the 10% allowed" in told
        assert "--allow-shrink" in told and (work / "index.parquet").read_bytes() == before
    else:
        assert status in (0, None) and f"{rows} images" in told


def test_an_ingest_that_finds_none_of_the_listed_images_is_refused(tmp_path, monkeypatch, nih_excerpt, prefect_server):
    root = _collection(tmp_path, nih_excerpt, "no-images", None)
    status, told = _run(monkeypatch, "ingest", root, "--workdir", str(tmp_path / "w"))
    assert status == 2 and f"none of its 34 images was found below {root}" in told
    assert not (tmp_path / "w" / "index.parquet").exists()


def test_detector_check_names_a_folder_that_is_no_release_and_a_setting_it_does_not_know(
    tmp_path, monkeypatch, prefect_server
):
    status, told = _run(
        monkeypatch, "detector-check", "--release", str(tmp_path / "nowhere"), "--workdir", str(tmp_path)
    )
    assert status == 2 and f"{tmp_path / 'nowhere'}: no such release folder" in told
    release = tmp_path / "r"
    release.mkdir()
    (release / "manifest.json").write_text('{"index_sha256": null}')
    (tmp_path / "settings.json").write_text('{"anchors": 3}')
    status, told = _run(
        monkeypatch,
        "detector-check",
        "--release",
        str(release),
        "--workdir",
        str(tmp_path),
        "--config",
        str(tmp_path / "settings.json"),
    )
    assert status == 2 and "detector settings: unknown ['anchors']" in told


def test_review_pointed_at_a_work_or_releases_folder_says_it_is_not_a_release(tmp_path, monkeypatch):
    work, releases = tmp_path / "w", tmp_path / "releases"
    work.mkdir()
    (work / "index.parquet").write_bytes(b"")
    (releases / "latest").mkdir(parents=True)
    status, told = _run(monkeypatch, "review", str(work), "--workdir", str(work))
    assert status == 2 and f"{work}: this is not a release (it has no manifest.json); a work folder" in told
    status, told = _run(monkeypatch, "review", str(releases), "--workdir", str(work))
    assert status == 2 and f"a releases folder: give one of its releases, e.g. {releases / 'latest'}" in told


# What the command line has imported when it refuses: torch, a Prefect server or a Dask cluster
# would each take seconds (an unknown preset took 8 to 9 s, a busy work folder 42 s).
REFUSAL_PROBE = """
import json, sys, time
start = time.monotonic()
sys.argv = ["cxr-miner", *sys.argv[1:]]
from cxr_miner.flows.cli import main
try:
    main()
except SystemExit as exit:
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "prefect", "distributed"})
    print(json.dumps({"status": exit.code, "heavy": heavy, "seconds": round(time.monotonic() - start, 2)}))
"""


def _refusal(*words: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", REFUSAL_PROBE, *words], capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize(
    "case",
    ["unknown preset", "unknown method", "bad settings file", "run with a bad settings file", "busy work folder"],
)
def test_a_bad_option_or_a_busy_work_folder_is_refused_before_torch_prefect_or_dask(tmp_path, case):
    work = tmp_path / "w"
    work.mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": "x"}')
    words, expected = {
        "unknown preset": (["train", "--workdir", str(work), "--preset", "nope"], "unknown preset 'nope'"),
        "unknown method": (["train", "--workdir", str(work), "--method", "nope"], "unknown method 'nope'"),
        "bad settings file": (["train", "--workdir", str(work), "--config", str(bad)], f"{bad}: training settings"),
        "run with a bad settings file": (
            ["run", str(tmp_path), "--workdir", str(work), "--out", str(tmp_path / "r"), "--config", str(bad)],
            f"{bad}: training settings: epochs must be an integer",
        ),
        "busy work folder": (
            ["run", str(tmp_path), "--workdir", str(work), "--out", str(tmp_path / "r")],
            f"{work}: in use by pid {os.getpid()}",
        ),
    }[case]
    with folder_lock(work, "the test"):
        refused, told = _refusal(*words)
    assert refused["status"] == 2 and expected in told, told
    assert refused["heavy"] == [], refused  # hence well under 2 s (0.6-0.8 s on the Xeon host)


def test_a_stage_on_a_missing_work_folder_creates_nothing(tmp_path, monkeypatch):
    nowhere = tmp_path / "nowhere"
    for words in (["train", "--workdir", str(nowhere)], ["evaluate", "--workdir", str(nowhere), "--run", "r"]):
        status, told = _run(monkeypatch, *words)
        assert status == 2 and f"{nowhere}: no such work folder (`cxr-miner ingest ROOT --workdir {nowhere}`" in told
        assert not nowhere.exists()  # not the folder, not its logs/


def test_harvest_asking_for_more_gpus_than_the_machine_has_is_refused_naming_how_many_it_has(tmp_path, monkeypatch):
    import torch

    (tmp_path / "w").mkdir()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, told = _run(monkeypatch, "harvest", "--workdir", str(tmp_path / "w"), "--run", "r", "--gpus", "3")
    assert status == 2 and "--gpus: 3 asked for, but this machine has no CUDA GPU torch can use" in told
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    status, told = _run(monkeypatch, "harvest", "--workdir", str(tmp_path / "w"), "--run", "r", "--gpus", "3")
    assert status == 2 and "--gpus: 3 asked for, but this machine has 2 CUDA GPUs" in told


def test_a_full_disk_during_release_names_the_folder_and_publishes_nothing(released, tmp_path, monkeypatch):
    """The write that fills the disk raises ENOSPC without a file name (pyarrow's and a flush's do)."""
    import cxr_miner.flows.release as release_flow

    work, out = released[0], tmp_path / "releases"
    build = release_flow.build_release

    def fills_the_disk(harvested, staging, version, previous):
        build(harvested, staging, version, previous)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(release_flow, "build_release", fills_the_disk)
    status, told = _run(monkeypatch, "release", "--workdir", str(work), "--out", str(out))
    assert status == 2, told
    assert f"{out.resolve()}: no space left on its disk while writing release " in told
    assert "MiB free now); nothing of it was kept: free some space and run `cxr-miner release` again" in told
    assert [p.name for p in out.iterdir() if p.name != ".cxr-miner.lock"] == []  # no staging folder, no latest
