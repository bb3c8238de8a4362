"""One writer per folder, for the flows: hold the locks of the folders a flow writes into."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

from cxr_miner.storage.stages.lock import folder_lock

F = TypeVar("F", bound=Callable[..., Any])


def writes_into(*parameters: str) -> Callable[[F], F]:
    """Decorator: the call holds the lock of each folder named by these parameters (in order);
    another process writing there makes it fail at once with FolderBusy naming the holder. The
    function gets each folder as an absolute path: the Dask workers it sends tasks to may run in
    other working directories, or on other machines."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            with ExitStack() as stack:
                for name in parameters:
                    bound.arguments[name] = str(stack.enter_context(folder_lock(Path(bound.arguments[name]))))
                return function(*bound.args, **bound.kwargs)

        return locked  # type: ignore[return-value]

    return decorate
