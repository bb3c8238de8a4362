"""What every output records about where it came from: file digests, the code version, model ids."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex), read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> str:
    """The installed cxr-miner version, or ``unknown``."""
    try:
        return version("cxr-miner")
    except PackageNotFoundError:
        return "unknown"


KEY_PACKAGES = (
    "torch",
    "torchvision",
    "prefect",
    "dask",
    "distributed",
    "pyarrow",
    "pydicom",
    "scikit-image",
    "numpy",
    "pillow",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "simplejpeg",
)


def package_versions(names: Sequence[str] = KEY_PACKAGES) -> dict[str, str]:
    """Installed version of each package (``not installed`` for one that is not), and Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_identity(run: str, files: Sequence[Path]) -> tuple[str, list[str]]:
    """``<run>@<12 hex>`` from the sha256 of the checkpoint files a method uses, and those sha256s."""
    digests = [file_sha256(f) for f in files]
    return f"{run}@{hashlib.sha256(''.join(digests).encode()).hexdigest()[:12]}", digests


def settings_digest(settings: Any, length: int = 10) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``settings`` as sorted JSON: a folder name
    that changes with any setting."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:length]
