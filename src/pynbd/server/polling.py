"""Adaptive polling for the event loop: a short busy wait before each sleep.

A request that arrives while the server sleeps in ``epoll_wait`` pays for a
wake-up, and on a virtual machine an idle vCPU that has halted takes tens of
microseconds to wake: at queue depth 1 that is most of a request's round trip.
qemu's event loop polls for a while before it blocks (its ``poll-max-ns``,
32 us by default); this selector does the same, with the same adaptive rule,
so that only loads that benefit pay for polling:

- the poll window starts at 0 (no polling);
- after each wait that blocked for ``block_ns``:
  - longer than ``poll_max_ns``: the window goes back to 0 (an idle or lightly
    loaded server does not spin);
  - otherwise, if the window is below the maximum, it doubles (starting at
    ``POLL_START_NS``), up to ``poll_max_ns``;
- a poll that finds an event keeps the window as it is.

Polling only happens when the loop would otherwise block (``timeout`` not 0):
under load the loop never sleeps and so never polls.  It does not happen while
the loop awaits work from other threads (the I/O pool, librbd): they need the
GIL to hand their results over, and a spinning loop keeps taking it back
(``pynbd.block._pool.off_thread_pending``).  It is never used with a single
usable CPU, where spinning would only keep the client from running.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from typing import TYPE_CHECKING

from ..block._pool import off_thread_pending

if TYPE_CHECKING:
    from collections.abc import Callable

#: The default limit.  qemu's is 32 us, but what decides whether the window
#: opens is how long a wait that *sleeps* takes, wake-up included, and on
#: small VMs that is longer than 32 us (the A/B is in docs/performance.md).
DEFAULT_POLL_MAX_NS = 65_536
#: the largest limit accepted (a wait longer than this is not "soon")
MAX_POLL_NS = 1_000_000
#: the first non-zero window (qemu's starting value as well)
POLL_START_NS = 4_000


class PollingSelector(selectors.EpollSelector):
    """An epoll selector that polls (timeout 0) for up to an adaptive window first."""

    def __init__(self, poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        super().__init__()
        if poll_max_ns < 0:
            raise ValueError(f"poll_max_ns must not be negative, got {poll_max_ns}")
        self.poll_max_ns = poll_max_ns
        #: the current poll window
        self.poll_ns = 0

    def select(self, timeout: float | None = None
               ) -> list[tuple[selectors.SelectorKey, int]]:
        if (timeout is not None and timeout <= 0) or self.poll_max_ns == 0:
            return super().select(timeout)
        start = time.monotonic_ns()
        if self.poll_ns and not off_thread_pending():
            window = self.poll_ns if timeout is None else min(self.poll_ns, int(timeout * 1e9))
            deadline = start + window
            while True:
                ready = super().select(0)
                if ready:
                    return ready
                if time.monotonic_ns() >= deadline:
                    break
            if timeout is not None:
                timeout = max(0.0, timeout - window / 1e9)
        ready = super().select(timeout)
        self._adjust(time.monotonic_ns() - start)
        return ready

    def _adjust(self, block_ns: int) -> None:
        if block_ns > self.poll_max_ns:
            self.poll_ns = 0
        elif self.poll_ns < self.poll_max_ns:
            self.poll_ns = min(self.poll_max_ns, max(POLL_START_NS, self.poll_ns * 2))


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def event_loop_factory(poll_max_ns: int = DEFAULT_POLL_MAX_NS
                       ) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What ``asyncio.Runner(loop_factory=...)`` should use: a selector loop
    with a ``PollingSelector``, or None (asyncio's default) when polling is off
    or only one CPU is usable."""
    if poll_max_ns == 0 or usable_cpus() < 2:
        return None
    return lambda: asyncio.SelectorEventLoop(PollingSelector(poll_max_ns))
