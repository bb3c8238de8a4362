"""The one JSON encoding (strict: undefined figures as null) and what a failed write says."""

from __future__ import annotations

import errno
import json
import math

import numpy as np
import pytest

from cxr_miner.storage.stages.atomic import atomic_path, read_json, write_json
from cxr_miner.storage.vocab.errors import InputError


def test_undefined_figures_are_written_as_null_and_nothing_else_changes(tmp_path):
    data = {
        "acc": math.nan,
        "afp": 0.25,
        "best": -math.inf,
        "rows": [(1, np.float32(0.5)), [np.float64("nan")]],
        "run": None,
    }
    write_json(tmp_path / "a.json", data)
    text = (tmp_path / "a.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"acc": None, "afp": 0.25, "best": None, "rows": [[1, 0.5], [None]], "run": None}


def test_a_truncated_json_file_is_an_input_error_that_names_it_and_the_fix(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text('{"findings": {"Nodule": ')
    with pytest.raises(InputError, match=rf"^{path}: damaged: not JSON \(.*line 1 column 25.*\); run evaluate again$"):
        read_json(path, "run evaluate again")
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'none.json'}: no such file \(run evaluate\)$"):
        read_json(tmp_path / "none.json", "run evaluate")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_names_the_folder_it_could_not_write_into(tmp_path, code):
    target = tmp_path / "shards" / "train-00000.parquet"
    with pytest.raises(OSError) as failed:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(code, "No space left on device")  # what a failing write() raises: no file name
    assert failed.value.errno == code and f"could not write train-00000.parquet into {target.parent}" in str(
        failed.value
    )
    assert list(target.parent.iterdir()) == []  # the partial file is gone
