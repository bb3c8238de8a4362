"""Files under a dataset root: only regular files are opened, and none outside the root.

A FIFO named ``x.png`` would block the reader that opens it, and a device or socket is no image:
such entries are reported, never opened. A symbolic link whose target lies outside the root
(``images -> /mnt/other``) is refused unless the caller allows links out of the root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from cxr_miner.storage.vocab.errors import InputError

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def not_regular(path: Path) -> str | None:
    """None for a regular file (after symlinks), else why it is not one: 'a FIFO', 'missing', ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing (or a broken link)"
    except OSError as error:
        return f"not readable ({error.strerror})"
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def resolves_outside(root: Path, path: Path, folders: dict[Path, Path] | None = None) -> Path | None:
    """The real path of ``path`` if it lies outside ``root`` (through a symbolic link), else None.

    ``folders`` caches real folder paths between calls (one shard's images share a few folders),
    so a file that is not a link itself costs one lstat."""
    folders = {} if folders is None else folders
    real = path.resolve() if os.path.islink(path) else _real_folder(path.parent, folders) / path.name
    try:
        real.relative_to(_real_folder(root, folders))
    except ValueError:
        return real
    return None


def _real_folder(folder: Path, folders: dict[Path, Path]) -> Path:
    if folder not in folders:
        folders[folder] = folder.resolve()
    return folders[folder]


def check_inside_root(root: Path, path: Path, folders: dict[Path, Path] | None = None) -> None:
    """Raise InputError for a path that leads out of ``root`` through a symbolic link (``folders``:
    see :func:`resolves_outside`)."""
    if (target := resolves_outside(root, path, folders)) is not None:
        raise InputError(
            path,
            f"is a link to {target}, outside the dataset root {root}; pass --allow-outside-links to read files there",
        )


def walk_files(
    root: Path,
    suffixes: set[str] | None = None,
    *,
    on_skip: Callable[[Path, str], None] | None = None,
    allow_outside_links: bool = False,
) -> Iterator[Path]:
    """Every regular file below ``root`` (sorted; hidden entries skipped), optionally by suffix.

    Linked folders are followed (each real folder once). Entries that are not regular files go
    to ``on_skip(path, reason)`` unopened; a link out of ``root`` raises InputError unless
    ``allow_outside_links``.
    """
    seen: set[Path] = set()
    folders: dict[Path, Path] = {}  # real paths of the folders walked
    for folder, subfolders, files in os.walk(root, followlinks=True):
        here = Path(folder)
        real = _real_folder(here, folders)
        if real in seen:  # a link loop, or two links to one folder
            subfolders[:] = []
            continue
        seen.add(real)
        if not allow_outside_links:
            check_inside_root(root, here, folders)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or (suffixes is not None and path.suffix.lower() not in suffixes):
                continue
            if not allow_outside_links:
                check_inside_root(root, path, folders)
            if (reason := not_regular(path)) is not None:
                if on_skip:
                    on_skip(path, f"{reason}, not a regular file: not opened")
                continue
            yield path


def source_problem(
    root: Path, relative: str, allow_outside_links: bool = False, folders: dict[Path, Path] | None = None
) -> str | None:
    """Why the image file ``root/relative`` cannot be read (None when it can): missing, not a
    regular file, or a link out of ``root`` (unless allowed). Nothing is opened. ``folders``: see
    :func:`resolves_outside`."""
    path = root / relative
    if not allow_outside_links and (target := resolves_outside(root, path, folders)) is not None:
        return f"a link to {target}, outside the dataset root (ingest --allow-outside-links reads it)"
    if (reason := not_regular(path)) is not None:
        return reason if reason.startswith("missing") else f"{reason}, not a regular file: not opened"
    return None
