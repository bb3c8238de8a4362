"""Hostile input and a second command: one clear line, the right exit status, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr_miner.storage.stages.checkpoints import CheckpointError
from cxr_miner.storage.vocab.errors import InputError, MissingInput, SettingError  # noqa: F401 (the tests eval them)
from tests.flows.test_cli import _run


def _nih_root(tmp_path, nih_excerpt, edit=None):
    """A copy of the excerpt's Data_Entry CSV (edited by ``edit(bytes) -> bytes``) in a new root."""
    root = tmp_path / "nih"
    root.mkdir()
    data = (nih_excerpt / "Data_Entry_2017_v2020.csv").read_bytes()
    (root / "Data_Entry_2017_v2020.csv").write_bytes(edit(data) if edit else data)
    return root


def _cli_with_failing_evaluate(workdir, error: str) -> subprocess.CompletedProcess:
    """The real command line in a new process, its ``evaluate`` flow raising ``error`` (Python source)
    inside a Prefect flow run: all it prints (Prefect's logging included) is what a user sees."""
    from prefect.settings import PREFECT_API_URL

    script = textwrap.dedent(f"""
        import sys
        from prefect import flow
        from cxr_miner.storage.vocab.errors import InputError, MissingInput, SettingError
        import cxr_miner.flows.evaluate
        from cxr_miner.flows.cli import main

        @flow
        def evaluate(workdir: str, run: str, box_val_fraction: float = 0.5, precision_target: float = 0.5):
            raise {error}

        cxr_miner.flows.evaluate.evaluate = evaluate
        sys.argv = ["cxr-miner", "evaluate", "--workdir", {str(workdir)!r}, "--run", "x"]
        main()
    """)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)


def test_an_internal_error_exits_1_with_its_traceback_in_a_log_file_under_the_workdir(tmp_path, prefect_server):
    done = _cli_with_failing_evaluate(tmp_path, 'RuntimeError("a bug, not bad input")')
    assert done.returncode == 1
    (log,) = (tmp_path / "logs").glob("error-*.log")
    assert f"internal error: RuntimeError: a bug, not bad input (traceback in {log})" in done.stderr
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in evaluate" in text and "evaluate --workdir" in text
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "error",
    [
        'SettingError("bad value [/red] 7")',
        'MissingInput("x.json: no such file (run `cxr-miner ingest` first)")',
        'InputError("x.csv", "no such column", line=3)',
    ],
)
def test_user_errors_are_one_line_with_exit_2_and_no_traceback(tmp_path, prefect_server, error):
    done = _cli_with_failing_evaluate(tmp_path, error)
    assert done.returncode == 2
    (log,) = (tmp_path / "logs").glob("error-*.log")  # Prefect's lines about the failed run, kept off the console
    assert f"\nerror: {eval(error)} (Prefect's log of it: {log})\n" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "| ERROR" not in done.stderr + done.stdout


def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    ("error", "status", "said"),
    [
        (ValueError("a bug that happens to be a ValueError"), 1, "internal error: ValueError: "),
        (KeyError("a bug"), 1, "internal error: KeyError: "),
        (OSError(28, "No space left on device"), 2, "error: "),
    ],
)
def test_errors_that_are_not_the_users_keep_their_traceback_in_a_log(
    tmp_path, monkeypatch, capsys, error, status, said
):
    """A ValueError is no longer taken for bad input: only UserError is. An OSError (the machine's)
    is said in one line with exit 2, but its traceback is kept as a bug's is."""
    from cxr_miner.flows.cli import failure_status

    monkeypatch.setattr(sys, "argv", ["cxr-miner", "evaluate", "--workdir", str(tmp_path)])
    assert failure_status(_raised(error)) == status
    told = capsys.readouterr().err
    (log,) = (tmp_path / "logs").glob("error-*.log")
    assert told.startswith(said) and told.rstrip().endswith(f"(traceback in {log})") and told.count("\n") == 1
    assert "Traceback (most recent call last)" in log.read_text() and "in _raised" in log.read_text()


@pytest.mark.parametrize(
    "error",
    [SettingError("kp must be one of ..."), MissingInput("x.json: no such file"), CheckpointError("c", OSError())],
)
def test_user_errors_outside_a_flow_write_no_log(tmp_path, monkeypatch, capsys, error):
    from cxr_miner.flows import logs
    from cxr_miner.flows.cli import failure_status

    monkeypatch.setattr(logs._HOLD, "held", [])  # no Prefect error line held back by an earlier test's flow run
    monkeypatch.setattr(sys, "argv", ["cxr-miner", "evaluate", "--workdir", str(tmp_path)])
    assert failure_status(_raised(error)) == 2
    assert capsys.readouterr().err.replace("\n", " ").split() == ["error:", *str(error).split()]
    assert not (tmp_path / "logs").exists()


def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path, monkeypatch, nih_excerpt, prefect_server):
    root = _nih_root(tmp_path, nih_excerpt, lambda data: data.replace(b"00000005_000.png", b"0000000\xff_000.png"))
    line = next(
        i for i, text in enumerate((root / "Data_Entry_2017_v2020.csv").read_bytes().split(b"\n"), 1) if b"\xff" in text
    )
    status, told = _run(monkeypatch, "ingest", str(root), "--workdir", str(tmp_path / "w"), "--metadata-only")
    assert status == 2
    assert f"Data_Entry_2017_v2020.csv:{line}: byte 0xff at column 8 is not UTF-8" in told


def test_a_nul_byte_in_an_image_index_is_refused_at_ingest(tmp_path, monkeypatch, nih_excerpt, prefect_server):
    root = _nih_root(tmp_path, nih_excerpt, lambda data: data.replace(b"00000005_000.png", b"00000005\x00000.png"))
    status, told = _run(monkeypatch, "ingest", str(root), "--workdir", str(tmp_path / "w"), "--metadata-only")
    assert status == 2 and "image name '00000005\\x00000.png' holds a control character" in told
    assert not (tmp_path / "w" / "index.parquet").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"epochs": [5]}, "epochs must be an integer, got list [5]"),
        ({"lr": "fast"}, "lr must be a number, got str 'fast'"),
        ({"model": ["resnet18"]}, "model settings must be a JSON object"),
        ([1, 2], "expected a JSON object of setting: value, got list"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_named(tmp_path, monkeypatch, prefect_server, settings, message):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings))
    status, told = _run(monkeypatch, "train", "--workdir", str(tmp_path / "w"), "--config", str(config))
    assert status == 2 and f"{config}: " in told and message in told


def test_a_workdir_that_is_a_file_is_refused(tmp_path, monkeypatch, nih_excerpt, prefect_server):
    (tmp_path / "w").write_text("not a folder")
    status, told = _run(monkeypatch, "ingest", str(nih_excerpt), "--workdir", str(tmp_path / "w"), "--metadata-only")
    assert status == 2 and f"{tmp_path / 'w'}: exists and is not a folder" in told
    assert (tmp_path / "w").read_text() == "not a folder"


@pytest.mark.parametrize(
    "words, message",
    [
        (["--workers", "-1"], "--workers: -1 is below 1"),
        (["--dask-address", "tcp://127.0.0.1:9"], "--dask-address tcp://127.0.0.1:9: no Dask scheduler answers there"),
    ],
)
def test_impossible_dask_options_are_refused_at_once(tmp_path, monkeypatch, prefect_server, words, message):
    status, told = _run(monkeypatch, "preprocess", "--workdir", str(tmp_path), *words)
    assert status == 2 and message in told


def test_metadata_only_index_without_images_is_refused_by_preprocess(
    tmp_path, monkeypatch, nih_excerpt, prefect_server
):
    root = _nih_root(tmp_path, nih_excerpt)
    work = tmp_path / "w"
    assert _run(monkeypatch, "ingest", str(root), "--workdir", str(work), "--metadata-only")[0] in (0, None)
    status, told = _run(monkeypatch, "preprocess", "--workdir", str(work), "--workers", "1")
    assert status == 2
    assert (
        "none of its 34 images has a file to read" in told and f"run `cxr-miner ingest ROOT --workdir {work}`" in told
    )
    assert not (work / "shards").exists()


def test_metadata_only_finds_images_where_the_nih_layout_puts_them(tmp_path, monkeypatch, nih_excerpt, prefect_server):
    """images_*/images/<id>, found by listing the folders; no image file is opened."""
    root = _nih_root(tmp_path, nih_excerpt)
    (root / "images_002" / "images").mkdir(parents=True)
    (root / "images_002" / "images" / "00000003_000.png").write_bytes(b"never opened")
    assert _run(monkeypatch, "ingest", str(root), "--workdir", str(tmp_path / "w"), "--metadata-only")[0] in (0, None)
    rows = {r["image_id"]: r for r in pq.read_table(tmp_path / "w" / "index.parquet").to_pylist()}
    assert rows["00000003_000.png"]["source_path"] == "images_002/images/00000003_000.png"
    assert rows["00000001_000.png"]["source_path"] is None
    assert {r["file_present"] for r in rows.values()} == {None}


def test_a_folder_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(
    tmp_path, monkeypatch, nih_excerpt, prefect_server
):
    from cxr_miner.storage.stages.lock import LOCK_FILE

    work = tmp_path / "w"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from cxr_miner.storage.stages.lock import folder_lock
            with folder_lock(Path({str(work)!r}), "cxr-miner preprocess (the holder)"):
                print("held", flush=True)
                time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        status, told = _run(monkeypatch, "ingest", str(nih_excerpt), "--workdir", str(work), "--metadata-only")
        assert status == 2
        assert (
            f"{work.resolve()}: in use by pid {holder.pid} on " in told and "cxr-miner preprocess (the holder)" in told
        )
        assert not (work / "index.parquet").exists()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((work / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the killed holder
    status, told = _run(monkeypatch, "ingest", str(nih_excerpt), "--workdir", str(work), "--metadata-only")
    assert status in (0, None) and (work / "index.parquet").exists()


def test_ingest_reports_a_fifo_named_like_a_listed_image_and_does_not_block(
    tmp_path, monkeypatch, nih_excerpt, prefect_server
):
    root = _nih_root(tmp_path, nih_excerpt)
    (root / "images").mkdir()
    Image.new("L", (8, 8), 90).save(root / "images" / "00000001_000.png")
    os.mkfifo(root / "images" / "00000003_000.png")
    status, told = _run(monkeypatch, "ingest", str(root), "--workdir", str(tmp_path / "w"), "--allow-shrink")
    assert status in (0, None), told
    report = json.loads((tmp_path / "w" / "ingest_report.json").read_text())
    assert report["skipped"] == [
        {"source_path": "images/00000003_000.png", "reason": "a FIFO, not a regular file: not opened"}
    ]
    assert {"image_id": "00000003_000.png", "reason": "listed in the metadata, no file found"} in report["missing"]
    assert report["files_present"] == 1


def test_non_regular_files_are_reported_not_opened(tmp_path):
    """A FIFO named like an image would block whoever opens it."""
    from cxr_miner.storage.inputs.files import walk_files
    from cxr_miner.storage.inputs.images import ImageReadError, read_image

    (tmp_path / "a.png").write_bytes(b"x")
    os.mkfifo(tmp_path / "b.png")
    (tmp_path / "c.png").mkdir()
    skipped = []
    assert list(walk_files(tmp_path, {".png"}, on_skip=lambda p, why: skipped.append((p.name, why)))) == [
        tmp_path / "a.png"
    ]
    assert skipped == [("b.png", "a FIFO, not a regular file: not opened")]  # a folder is walked, not listed
    with pytest.raises(ImageReadError, match="a FIFO, not a regular file: not opened"):
        read_image(tmp_path / "b.png")


def test_links_out_of_the_root_are_refused_unless_allowed(tmp_path):
    from cxr_miner.storage.inputs.files import source_problem, walk_files
    from cxr_miner.storage.vocab.errors import InputError

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "images" / "inside.png").write_bytes(b"y")
    (root / "images" / "alias.png").symlink_to(root / "images" / "inside.png")
    assert [p.name for p in walk_files(root, {".png"})] == ["alias.png", "inside.png"]  # links within the root are fine
    (root / "images" / "leak.png").symlink_to(outside / "secret.png")
    with pytest.raises(InputError, match="leak.png: is a link to .*secret.png, outside the dataset root"):
        list(walk_files(root, {".png"}))
    assert [p.name for p in walk_files(root, {".png"}, allow_outside_links=True)] == [
        "alias.png",
        "inside.png",
        "leak.png",
    ]
    assert "outside the dataset root" in source_problem(root, "images/leak.png")
    assert source_problem(root, "images/leak.png", allow_outside_links=True) is None
    (root / "images" / "leak.png").unlink()
    (root / "more").symlink_to(outside, target_is_directory=True)  # a linked folder is followed, and checked
    with pytest.raises(InputError, match="more: is a link to"):
        list(walk_files(root, {".png"}))
