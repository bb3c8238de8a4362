"""NIH metadata parsing on an excerpt of the real files, with every quirk they have."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from cxr_miner.storage.inputs.csvtable import join_bracketed
from cxr_miner.storage.inputs.nih import read_bbox_list, read_data_entry, read_image_list
from cxr_miner.storage.vocab.errors import InputError
from cxr_miner.storage.vocab.findings import parse_findings
from tests.conftest import SHARED_NIH

REAL_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


@pytest.mark.parametrize(
    "header, expected",
    [
        (["a", "b"], [("a", 1), ("b", 1)]),
        (["OriginalImage[Width", "Height]"], [("OriginalImage[Width,Height]", 2)]),
        (["Bbox [x", "y", "w", "h]", "", "", ""], [("Bbox [x,y,w,h]", 4)]),
        (["Image Index", "X[a", "b]", ""], [("Image Index", 1), ("X[a,b]", 2)]),
    ],
)
def test_join_bracketed(header, expected):
    assert join_bracketed(header) == expected


def test_data_entry_excerpt(nih_excerpt):
    rows = read_data_entry(nih_excerpt / "Data_Entry_2017_v2020.csv")
    assert len(rows) == 34
    first = rows[0]
    assert (first.image_id, first.findings, first.follow_up, first.patient_id) == (
        "00000001_000.png",
        ["Cardiomegaly"],
        0,
        "1",
    )
    assert (first.age, first.sex, first.view_position) == (57, "M", "PA")
    assert (first.original_width, first.original_height) == (2682, 2749)
    assert first.pixel_spacing_x == pytest.approx(0.143)
    assert rows[1].findings == ["Cardiomegaly", "Emphysema"]  # "Cardiomegaly|Emphysema", FINDINGS order
    assert rows[3].findings == []  # "No Finding"


def test_bbox_excerpt(nih_excerpt):
    boxes = read_bbox_list(nih_excerpt / "BBox_List_2017.csv")
    assert len(boxes) == 15
    first = boxes[0]
    assert (first.image_id, first.finding) == ("00013118_008.png", "Atelectasis")
    # x, y, w, h = 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661
    assert (first.x_min, first.y_min) == (225.084745762712, 547.019216763771)
    assert first.x_max == pytest.approx(311.864406779661)
    assert first.y_max == pytest.approx(626.205657441737)
    findings = {b.finding for b in boxes}
    assert "Infiltration" in findings and "Infiltrate" not in findings
    assert sum(b.image_id == "00005066_030.png" for b in boxes) == 3


def test_data_rows_with_trailing_empty_columns(tmp_path):
    """The 2017 release ends every line with a comma; ages were '058Y'."""
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(REAL_HEADER + ",\n00000001_000.png,Cardiomegaly,0,1,058Y,M,PA,2682,2749,0.143,0.143,\n")
    (row,) = read_data_entry(path)
    assert row.age == 58 and row.original_height == 2749


def test_gzip_metadata(tmp_path, nih_excerpt):
    target = tmp_path / "BBox_List_2017.csv.gz"
    with open(nih_excerpt / "BBox_List_2017.csv", "rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert len(read_bbox_list(target)) == 15


def _entry(tmp_path: Path, *lines: str, header: str = REAL_HEADER) -> Path:
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


GOOD = "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143"


@pytest.mark.parametrize(
    "lines, header, message",
    [
        (
            [GOOD, GOOD.replace("Cardiomegaly", "Pneumonitis").replace("_000", "_001")],
            REAL_HEADER,
            r"Data_Entry_2017_v2020.csv:3: .*unknown finding 'Pneumonitis'",
        ),
        ([GOOD, GOOD], REAL_HEADER, r":3: duplicate image id '00000001_000.png' \(first on line 2\)"),
        ([GOOD], REAL_HEADER.replace("Patient ID,", ""), r":1: missing column 'Patient ID'"),
        (
            [GOOD.replace("00000001_000.png", "../../etc/passwd")],
            REAL_HEADER,
            r":2: image name '../../etc/passwd' is not a plain file name",
        ),
        ([GOOD + ",surplus"], REAL_HEADER, r":2: expected 11 fields, got 12"),
        ([GOOD.replace(",57,", ",old,")], REAL_HEADER, r":2: column 'Patient Age': 'old' is not an integer"),
        ([GOOD.replace("Cardiomegaly", "No Finding|Mass")], REAL_HEADER, r":2: 'No Finding' combined with findings"),
    ],
)
def test_data_entry_errors_name_file_line_value(tmp_path, lines, header, message):
    with pytest.raises(InputError, match=message):
        read_data_entry(_entry(tmp_path, *lines, header=header))


def test_bbox_errors(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Mass,10,10,0,5\n")
    with pytest.raises(InputError, match=r"BBox_List_2017.csv:2: box of '00000001_000.png' has width 0.0"):
        read_bbox_list(path)
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Growth,10,10,3,5\n")
    with pytest.raises(InputError, match=r":2: unknown finding 'Growth'"):
        read_bbox_list(path)


def test_image_list_rejects_paths(tmp_path):
    path = tmp_path / "test_list.txt"
    path.write_text("00000001_000.png\n\nsub/00000002_000.png\n")
    with pytest.raises(InputError, match=r"test_list.txt:3: image name 'sub/00000002_000.png'"):
        read_image_list(path)


def test_parse_findings_orders_and_canonicalises():
    assert parse_findings("Pneumothorax|Infiltrate|Atelectasis") == ["Atelectasis", "Infiltration", "Pneumothorax"]


@pytest.mark.skipif(not SHARED_NIH.exists(), reason="real NIH metadata not present (../shared/nih)")
def test_full_real_metadata():
    rows = read_data_entry(SHARED_NIH / "Data_Entry_2017_v2020.csv.gz")
    boxes = read_bbox_list(SHARED_NIH / "BBox_List_2017.csv.gz")
    assert len(rows) == 112_120 and len({r.patient_id for r in rows}) == 30_805
    assert len(boxes) == 984 and len({b.image_id for b in boxes}) == 880
    assert sum("Infiltration" in r.findings for r in rows) == 19_894
    assert sum(not r.findings for r in rows) == 60_361
