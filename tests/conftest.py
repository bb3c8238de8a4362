"""Shared fixtures: the real NIH excerpt, generated demo data, a Prefect test server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_NIH = Path(__file__).resolve().parents[2] / "shared" / "nih"


@pytest.fixture(scope="session")
def nih_excerpt() -> Path:
    """The first rows of the real Data_Entry_2017_v2020.csv plus every image of a 15-box excerpt."""
    return FIXTURES / "nih"


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API (SQLite) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
