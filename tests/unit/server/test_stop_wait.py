"""``wait_at_stop``: a final flush or close is awaited to the end, and storage
that keeps it waiting is reported (pynbd.server.runtime)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pynbd.server import runtime
from pynbd.server.runtime import wait_at_stop


@pytest.fixture
def quick_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "STOP_WAIT_REPORT", 0.05)
    monkeypatch.setattr(runtime, "STOP_WAIT_REPEAT", 0.1)


def waiting_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "still waiting" in r.getMessage()]


@pytest.mark.usefixtures("quick_reports")
def test_a_quick_step_returns_its_result_silently(caplog: pytest.LogCaptureFixture) -> None:
    async def step() -> int:
        return 7

    assert asyncio.run(wait_at_stop(step(), "the final flush")) == 7
    assert waiting_reports(caplog) == []


@pytest.mark.usefixtures("quick_reports")
def test_a_slow_step_is_reported_and_still_awaited(caplog: pytest.LogCaptureFixture) -> None:
    finished: list[bool] = []

    async def step() -> str:
        await asyncio.sleep(0.3)
        finished.append(True)
        return "done"

    assert asyncio.run(wait_at_stop(step(), "the final flush")) == "done"
    assert finished == [True]  # never cut short
    reports = waiting_reports(caplog)
    # after 0.05 s, then every 0.1 s: 0.05, 0.15, 0.25 (timer slack may drop the last)
    assert 2 <= len(reports) <= 3
    assert reports[0].startswith("stopping: still waiting for the final flush after 0 s")
    assert all("a signal now exits without waiting" in r for r in reports)


@pytest.mark.usefixtures("quick_reports")
def test_a_failing_step_raises_its_error() -> None:
    async def step() -> None:
        await asyncio.sleep(0.08)  # after the first report
        raise OSError(5, "flush failed")

    with pytest.raises(OSError, match="flush failed"):
        asyncio.run(wait_at_stop(step(), "the final flush"))


@pytest.mark.usefixtures("quick_reports")
def test_cancelling_the_wait_cancels_the_step() -> None:
    cancelled: list[bool] = []

    async def step() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        waiter = asyncio.ensure_future(wait_at_stop(step(), "the storage to close"))
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
    assert cancelled == [True]
