"""A DICOM tree end to end: headers only at ingest, no identifier in any output, plugin-naming quarantine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxr_miner.flows.ingest import ingest
from cxr_miner.flows.preprocess import run_preprocess
from cxr_miner.storage.vocab.errors import InputError
from tests.dicom_factory import IDENTIFIERS, write_dicom

pytestmark = pytest.mark.slow


def _tree(root: Path) -> dict[str, str]:
    ramp = np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) % 4096
    uids = {
        "a": write_dicom(root / "site1" / "a.dcm", ramp, patient_id="MRN-0042"),
        "b": write_dicom(
            root / "site1" / "b.dcm",
            ramp.T.copy(),
            photometric="MONOCHROME1",
            patient_id="MRN-0042",
            window=(2048, 4096),
        ),
        "c": write_dicom(root / "site2" / "c.dcm", ramp, patient_id="MRN-7777", compressed=True),
        "d": write_dicom(root / "site2" / "nested" / "d", ramp, patient_id="MRN-9999", slope=1.0, intercept=-1024.0),
    }
    (root / "site2" / "notes.txt").write_text("not a DICOM file")
    return uids


def test_dicom_ingest_and_preprocess(tmp_path, prefect_server):
    root, work = tmp_path / "dicom", tmp_path / "work"
    uids = _tree(root)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "path,sop_instance_uid,findings\n"
        "site1/a.dcm,,Nodule\n"
        f",{uids['b']},No Finding\n"
        "site2/c.dcm,,Effusion|Infiltrate\n"
        "site2/nested/d,,Mass\n"
        "site9/gone.dcm,,Mass\n"
    )
    report = ingest(root=str(root), workdir=str(work), dicom=True, labels=str(labels))
    assert report["rows"] == 5 and len(report["missing"]) == 1
    assert report["skipped"] == [{"source_path": "site2/notes.txt", "reason": report["skipped"][0]["reason"]}]
    index = {r["source_path"]: r for r in pq.read_table(work / "index.parquet").to_pylist()}
    a, b = index["site1/a.dcm"], index["site1/b.dcm"]
    assert a["patient_id"] == b["patient_id"] != index["site2/c.dcm"]["patient_id"]  # same patient, same pseudonym
    assert a["split"] == b["split"]
    assert (a["width"], a["height"], b["width"], b["height"]) == (80, 60, 60, 80)
    assert (a["age"], a["sex"], a["view_position"], a["findings"]) == (57, "F", "PA", ["Nodule"])
    assert index["site2/c.dcm"]["findings"] == ["Effusion", "Infiltration"]

    manifest = run_preprocess(str(work), workers=1, size=32, shard_size=2, max_lost=0.5)  # 1 of 5 is missing on purpose
    assert manifest["counts"] == {"index_rows": 5, "shard_rows": 3, "quarantined": 1, "missing": 1}
    (quarantined,) = pq.read_table(work / "quarantine.parquet").to_pylist()
    assert quarantined["source_path"] == "site2/c.dcm"
    assert quarantined["reason"].startswith(
        "cannot decode DICOM pixels (JPEG-LS Lossless Image Compression): "
    )  # its bytes are no JPEG-LS

    secrets = ["MRN-0042", "MRN-7777", "MRN-9999", *IDENTIFIERS.values(), *uids.values()]
    for path in work.rglob("*"):
        if path.is_file() and "secrets" not in path.parts:
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{secret} leaked into {path}"
    assert (work / "secrets" / "pseudonym.key").stat().st_mode & 0o777 == 0o600


def test_labels_path_escaping_root_is_refused(tmp_path, prefect_server):
    root = tmp_path / "dicom"
    _tree(root)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,findings\nsite1/a.dcm,Nodule\n../../etc/passwd,Mass\n")
    with pytest.raises(InputError, match=r"labels.csv:3: path '../../etc/passwd' escapes the dataset root"):
        ingest(root=str(root), workdir=str(tmp_path / "work"), dicom=True, labels=str(labels))
