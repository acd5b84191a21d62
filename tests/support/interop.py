"""Helpers shared by the interop tests (real client tools and libnbd).

Import as ``from tests.support.interop import bounded, require_tool``.
"""

from __future__ import annotations

import shutil
import threading
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable


def require_tool(name: str) -> str:
    """Path of an interop tool; the suite fails (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run the README's test command, "
                    "which installs every test dependency")
    return path


def bounded(fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
    """Call ``fn(*args)`` in a helper thread; fail the test if it hangs."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as err:  # handed to the test thread
            outcome.append((False, err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} hung for more than {timeout} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
