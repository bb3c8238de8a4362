"""Shared set-up for the benchmarks: cached demo collections and a warm Prefect API."""

from __future__ import annotations

import math
import os
import platform
import threading
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


class PeakMemory:
    """Peak of the summed RSS of a process (``root``, default this one) and all its descendants,
    sampled every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.05, root: int | None = None) -> None:
        import psutil

        self.process, self.interval, self.peak = psutil.Process(root), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        try:
            processes = [self.process, *self.process.children(recursive=True)]
        except Exception:  # the process has ended
            return 0
        for p in processes:
            try:
                total += p.memory_info().rss
            except Exception:  # a process that just ended
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
