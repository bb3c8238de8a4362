"""Waiting on a flow's mapped tasks: results and failures by name, progress as they finish."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from prefect.futures import PrefectFuture, as_completed

from cxr_miner.flows.progress import progress_bar


def collect(
    description: str,
    futures: Sequence[PrefectFuture],
    names: Sequence[str],
    images: Mapping[str, int],
    already_done: int = 0,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each task's result by name, and the failures by name (``Type: message``), in completion
    order. The progress bar counts images: ``images[name]`` as each task ends, of the total
    plus ``already_done`` images of work skipped beforehand."""
    by_id = {id(future): name for future, name in zip(futures, names)}
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    with progress_bar(description, already_done + sum(images[n] for n in names)) as advance:
        advance(already_done)
        for future in as_completed(list(futures)):
            name = by_id[id(future)]
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                failures[name] = f"{type(outcome).__name__}: {outcome}"
            else:
                results[name] = outcome
            advance(images[name])
    return results, failures


def failure_text(failures: Mapping[str, str], total: int, what: str = "shards") -> str:
    """``N of M shards failed (name: error; ...)``, names sorted."""
    detail = "; ".join(f"{name}: {error}" for name, error in sorted(failures.items()))
    return f"{len(failures)} of {total} {what} failed ({detail})"


def artifact_key(run: str, prefix: str = "auc") -> str:
    """A Prefect artifact key for ``run`` (lowercase letters, digits and dashes only: a run may be ``v1.2``)."""
    return f"{prefix}-" + re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")
