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


# With pytest-xdist (make test runs two workers, --dist loadgroup), the tests of one module-scoped or
# expensive session fixture run in one worker, so that it is made once: by the fixture they use.
GROUPS = {"released": "released", "mil_work": "mil", "harvested": "harvested", "trained": "train",
          "preprocessed": "pipeline", "indexed": "pipeline", "wheel": "wheel"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = next((name for fixture, name in GROUPS.items() if fixture in item.fixturenames), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def worker_id(request) -> str:
    """pytest-xdist's worker name (gw0, gw1, ...), "master" without it (also when it is not installed)."""
    workerinput = getattr(request.config, "workerinput", None)
    return workerinput["workerid"] if workerinput else "master"
