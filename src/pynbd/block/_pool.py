"""The shared thread pool for node calls that may block (file I/O, syncs),
and the count of work the event loop awaits from other threads.

One pool for every file-like node, so the number of I/O threads stays
bounded however many exports there are; threads start on demand.

``off_thread_pending()`` is what the event loop's adaptive polling
(``pynbd.server.polling``) asks before it spins: a thread that finishes work
for the loop needs the GIL to hand the result over, and a loop that spins
keeps taking the GIL back, so while anything is awaited from another thread
(this pool, librbd's threads) the loop sleeps at once instead.  Counted only
on the loop's thread.
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

_pending = 0


def off_thread_pending() -> int:
    """How many operations the loop now awaits from other threads."""
    return _pending


def off_thread_started() -> None:
    global _pending
    _pending += 1


def off_thread_done(_: object = None) -> None:
    """One awaited operation has come back (usable as a done callback)."""
    global _pending
    _pending -= 1


def track(future: asyncio.Future[_T]) -> asyncio.Future[_T]:
    """Count ``future`` as awaited from another thread until it is done."""
    off_thread_started()
    future.add_done_callback(off_thread_done)
    return future


async def in_pool(call: Callable[..., _T], *args: object) -> _T:
    """Run ``call(*args)`` in the pool and wait for it.

    If the awaiting task is cancelled the call still runs to completion in
    its thread (a syscall cannot be interrupted from here).
    """
    loop = asyncio.get_running_loop()
    return await track(loop.run_in_executor(
        POOL, functools.partial(call, *args) if args else call))
