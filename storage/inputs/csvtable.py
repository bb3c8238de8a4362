"""Reading NIH-style CSVs whose headers split bracketed names over several columns.

NIH writes ``OriginalImage[Width,Height]`` unquoted, so the header has the columns
``OriginalImage[Width`` and ``Height]`` while each data row has one value per part.
Some releases also end every line (or only the header) with empty columns.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator, Mapping
from pathlib import Path

from cxr_miner.storage.vocab.errors import InputError


def join_bracketed(header: list[str]) -> list[tuple[str, int]]:
    """Header cells -> (name, number of data fields) with split brackets joined.

    >>> join_bracketed(["Image Index", "OriginalImage[Width", "Height]", "", ""])
    [('Image Index', 1), ('OriginalImage[Width,Height]', 2)]

    Trailing empty cells are dropped; an empty cell between named ones is kept as "".
    """
    cells = list(header)
    while cells and not cells[-1].strip():
        cells.pop()
    columns: list[tuple[str, int]] = []
    i = 0
    while i < len(cells):
        name, width = cells[i].strip(), 1
        if "[" in name and "]" not in name:
            while i + width < len(cells) and "]" not in cells[i + width - 1]:
                name += "," + cells[i + width].strip()
                width += 1
        columns.append((name, width))
        i += width
    return columns


def read_rows(
    path: Path, required: Mapping[str, int], optional: Mapping[str, int] = {}
) -> Iterator[tuple[int, dict[str, list[str]]]]:
    """Yield (line number, {column name: its fields}) for each data row of a CSV.

    ``required``/``optional`` map column names to their number of fields. A missing
    required column, a column of the wrong width, or a row with values past the last
    named column raises :class:`InputError` naming the file, line and value.
    """
    try:
        yield from _read_rows(path, required, optional)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except csv.Error as error:
        raise InputError(path, f"not a readable CSV ({error})") from None


def not_utf8(path: Path) -> InputError:
    """The InputError for the first line of ``path`` that is not UTF-8: line, byte and column."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = raw[error.start]
                return InputError(
                    path,
                    f"byte 0x{byte:02x} at column {error.start + 1} is not UTF-8 (save the file as UTF-8)",
                    line=line,
                )
    return InputError(path, "not UTF-8 (save the file as UTF-8)")


def _read_rows(
    path: Path, required: Mapping[str, int], optional: Mapping[str, int]
) -> Iterator[tuple[int, dict[str, list[str]]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(path, "empty file, expected a CSV header") from None
        columns = join_bracketed(header)
        names = [name for name, _ in columns]
        for name in required:
            if name not in names:
                raise InputError(path, f"missing column {name!r}; header has {names}", line=1)
        slices: dict[str, slice] = {}
        start = 0
        for name, width in columns:
            expected = {**optional, **required}.get(name)
            if expected is not None and expected != width:
                raise InputError(path, f"column {name!r} spans {width} fields, expected {expected}", line=1)
            slices[name] = slice(start, start + width)
            start += width
        n_named = start
        for line, fields in enumerate(reader, start=2):
            if not fields or all(not f.strip() for f in fields):
                continue
            extra = [f for f in fields[n_named:] if f.strip()]
            if extra or len(fields) < n_named:
                raise InputError(path, f"expected {n_named} fields, got {len(fields)}: {','.join(fields)!r}", line=line)
            yield line, {name: [f.strip() for f in fields[s]] for name, s in slices.items()}
