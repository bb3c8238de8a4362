"""Shared set-up for the benchmarks: cached demo collections and a warm Prefect API."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

OUT = Path(__file__).resolve().parent / "out"


def demo_collection(n_images: int, size: int = 1024, seed: int = 0) -> Path:
    """A demo NIH collection under bench/out, generated once and reused."""
    from cxr_miner.storage.phantoms.generator import generate

    root = OUT / f"demo-{n_images}-{size}-{seed}"
    if not (root / "demo_manifest.json").exists():
        started = time.perf_counter()
        generate(root, n_images=n_images, size=size, seed=seed, workers=os.cpu_count() or 1)
        print(f"generated {n_images} demo images of {size} px in {time.perf_counter() - started:.0f} s")
    return root


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"


def prefect_api():
    """One Prefect API for every flow run of a benchmark, started before any timing."""
    from cxr_miner.flows.api import prefect_api as api

    return api()


def undefined(value) -> bool:
    """An undefined figure: None as the project's JSON files write it, NaN as the flows return it."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def mean(values) -> float:
    """The mean of the defined figures (NaN when none is)."""
    values = [v for v in values if not undefined(v)]
    return sum(values) / len(values) if values else math.nan
