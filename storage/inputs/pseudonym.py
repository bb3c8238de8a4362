"""Keyed pseudonyms for identifiers that must never leave the source (DICOM PatientID)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "CXR_MINER_PSEUDONYM_KEY"


def pseudonym(key: bytes, value: str, prefix: str = "P") -> str:
    """HMAC-SHA256(key, value), first 80 bits in hex: stable per key, not reversible without it."""
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:20]}"


def load_or_create_key(path: Path) -> bytes:
    """The key from $CXR_MINER_PSEUDONYM_KEY, else from ``path`` (created, mode 0600, if absent)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode("utf-8")
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key
