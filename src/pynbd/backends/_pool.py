"""The shared thread pool for backend calls that may block (file I/O, syncs).

One pool for every file-like backend, so the number of I/O threads stays
bounded however many exports there are; threads start on demand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

_T = TypeVar("_T")

POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="pynbd-io")


async def in_pool(call: Callable[..., _T], *args: object) -> _T:
    """Run ``call(*args)`` in the pool and wait for it.

    If the awaiting task is cancelled the call still runs to completion in
    its thread (a syscall cannot be interrupted from here).
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(POOL, functools.partial(call, *args) if args else call)
