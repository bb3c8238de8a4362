"""One writer per folder, for the flows and the command line: hold the locks of the folders a
command writes into.

The command line takes them first, before it imports torch or starts a Prefect API, so that a
second command on a busy folder is refused within a second; the flows take them again (locks are
re-entrant within a process), for callers of the Python API. A work folder that a stage reads must
exist already (a missing one is refused, not created); the folders a stage makes (``creates``:
ingest's work folder, release's releases folder) are created.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cxr_miner.storage.stages.lock import folder_lock
from cxr_miner.storage.vocab.errors import MissingInput

F = TypeVar("F", bound=Callable[..., Any])


def _hold(stack: ExitStack, folder: Path, create: bool) -> Path:
    """Enter ``folder``'s lock on ``stack``; a folder to read that is missing raises MissingInput."""
    if not create and not folder.is_dir():
        raise MissingInput(
            f"{folder}: no such work folder (`cxr-miner ingest ROOT --workdir {folder}` or `cxr-miner run` makes one)"
        )
    return stack.enter_context(folder_lock(folder))


@contextmanager
def holding(*folders: Path, creates: tuple[Path, ...] = ()) -> Iterator[None]:
    """The block holds the lock of each of ``folders`` (which must exist) and ``creates`` (made if
    missing); another process writing into one makes it fail at once with FolderBusy naming it."""
    with ExitStack() as stack:
        for folder in folders:
            _hold(stack, Path(folder), create=False)
        for folder in creates:
            _hold(stack, Path(folder), create=True)
        yield


def writes_into(*parameters: str, creates: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorator: the call holds the lock of each folder named by these parameters (in order; each
    must exist unless it is one of ``creates``); another process writing there makes it fail at once
    with FolderBusy naming the holder. The function gets each folder as an absolute path: the Dask
    workers it sends tasks to may run in other working directories, or on other machines."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            with ExitStack() as stack:
                for name in parameters:
                    folder = Path(bound.arguments[name])
                    bound.arguments[name] = str(_hold(stack, folder, create=name in creates))
                return function(*bound.args, **bound.kwargs)

        return locked  # type: ignore[return-value]

    return decorate
