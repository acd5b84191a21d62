"""The event loop's adaptive polling (pynbd.server.polling).

The window rule is checked directly; the selector itself with a real socket
pair: a wait that sleeps long closes the window, quick arrivals open it, an
event that arrives while polling is returned, and idle waits cost no polling.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time

import pytest

from pynbd.block import _pool
from pynbd.server import polling
from pynbd.server.polling import POLL_START_NS, PollingSelector, event_loop_factory

MAX = 64_000


def test_window_opens_doubles_and_caps() -> None:
    selector = PollingSelector(MAX)
    try:
        assert selector.poll_ns == 0
        selector._adjust(10_000)  # woken within the limit: start polling
        assert selector.poll_ns == POLL_START_NS
        sizes = []
        for _ in range(6):
            selector._adjust(10_000)
            sizes.append(selector.poll_ns)
        assert sizes == [8_000, 16_000, 32_000, MAX, MAX, MAX]
        selector._adjust(MAX + 1)  # slept longer than the limit: stop polling
        assert selector.poll_ns == 0
    finally:
        selector.close()


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        PollingSelector(-1)


def _pair(selector: selectors.BaseSelector) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    selector.register(a, selectors.EVENT_READ)
    return a, b


def test_idle_waits_close_the_window() -> None:
    selector = PollingSelector(MAX)
    a, b = _pair(selector)
    try:
        selector.poll_ns = MAX
        assert selector.select(0.01) == []  # nothing came: 10 ms > the limit
        assert selector.poll_ns == 0
        started = time.monotonic_ns()
        assert selector.select(0.005) == []
        # with the window closed the wait sleeps: it took its timeout, no polling left
        assert selector.poll_ns == 0
        assert time.monotonic_ns() - started >= 4_000_000
    finally:
        selector.close()
        a.close()
        b.close()


def test_an_event_during_the_poll_window_is_returned() -> None:
    # the window is far longer than the GIL's 5 ms switch interval: the sending
    # thread needs the GIL, which the polling thread only lends it now and then
    window = 200_000_000
    selector = PollingSelector(window)
    a, b = _pair(selector)
    try:
        selector.poll_ns = window
        sender = threading.Timer(0.0002, b.send, args=(b"x",))
        sender.start()
        ready = selector.select(1.0)
        sender.join()
        assert [key.fileobj for key, _ in ready] == [a]
        assert selector.poll_ns == window  # a successful poll keeps the window
    finally:
        selector.close()
        a.close()
        b.close()


def test_zero_timeout_never_polls() -> None:
    selector = PollingSelector(MAX)
    a, b = _pair(selector)
    try:
        selector.poll_ns = MAX
        assert selector.select(0) == []
        assert selector.poll_ns == MAX  # untouched: that was not a wait
    finally:
        selector.close()
        a.close()
        b.close()


def test_the_loop_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert event_loop_factory(0) is None
    monkeypatch.setattr(polling, "usable_cpus", lambda: 1)
    assert event_loop_factory(MAX) is None  # spinning would starve the client
    monkeypatch.setattr(polling, "usable_cpus", lambda: 2)
    factory = event_loop_factory(MAX)
    assert factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, asyncio.SelectorEventLoop)
        selector = loop._selector  # type: ignore[attr-defined]
        assert isinstance(selector, PollingSelector)
        assert selector.poll_max_ns == MAX

        async def echo() -> bytes:
            a, b = socket.socketpair()
            with a, b:
                a.setblocking(False)
                b.setblocking(False)
                await loop.sock_sendall(b, b"ping")
                return await loop.sock_recv(a, 4)

        assert runner.run(echo()) == b"ping"


def test_no_polling_while_work_is_awaited_from_other_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread that finishes work for the loop needs the GIL to hand it over: the
    loop must sleep at once instead of spinning while such work is pending."""
    selector = PollingSelector(1_000_000)
    a, b = _pair(selector)
    polls: list[float | None] = []
    real_select = selectors.EpollSelector.select

    def counting(self: selectors.EpollSelector, timeout: float | None = None
                 ) -> list[tuple[selectors.SelectorKey, int]]:
        polls.append(timeout)
        return real_select(self, timeout)

    monkeypatch.setattr(selectors.EpollSelector, "select", counting)
    try:
        selector.poll_ns = 1_000_000
        _pool.off_thread_started()
        try:
            assert selector.select(0.002) == []
        finally:
            _pool.off_thread_done()
        assert polls == [0.002]  # one sleeping wait, no timeout-0 polls
        polls.clear()
        selector.poll_ns = 1_000_000
        assert selector.select(0.002) == []
        assert polls.count(0) > 1  # nothing pending: it polled first
    finally:
        selector.close()
        a.close()
        b.close()


def test_the_pool_counts_what_it_runs() -> None:
    async def scenario() -> list[int]:
        seen = []
        before = _pool.off_thread_pending()
        job = asyncio.ensure_future(_pool.in_pool(time.sleep, 0.01))
        await asyncio.sleep(0)
        seen.append(_pool.off_thread_pending() - before)
        await job
        seen.append(_pool.off_thread_pending() - before)
        return seen

    assert asyncio.run(scenario()) == [1, 0]
