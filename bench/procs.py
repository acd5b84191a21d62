"""Processes for the benchmarks: bounded commands, process trees and their CPU time.

bench/run.py (and its modules) and bench/reliability.py measure servers by
pid through /proc: this module runs a command to completion with a timeout,
finds a process's live descendants, sums their CPU time, tells whether a pid
is still alive, and reads the host's busy CPU time and our children's CPU.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def run_cmd(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (bounded), capturing its text output."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat from the third (state) on."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (found by scanning /proc for parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo and len(found) < 10_000:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(root: int) -> float:
    """utime+stime+cutime+cstime of ``root`` and its live descendants (threads included)."""
    ticks = 0
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat_fields(pid)
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def pid_alive(pid: int) -> bool:
    try:
        state = stat_fields(pid)[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def host_busy_seconds() -> float:
    """Non-idle CPU time of the whole host (user nice system irq softirq steal)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
