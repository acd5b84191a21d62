"""``tune_malloc``: glibc keeps large buffers on the heap and free memory at its
top (pynbd.server.malloc).  Each case runs in a fresh interpreter, since glibc's
thresholds move with what a process has freed."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from pynbd.server.malloc import user_has_chosen

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")

PROBE = textwrap.dedent("""
    import ctypes, sys
    from pynbd.server.malloc import tune_malloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    tuned = tune_malloc({}) if sys.argv[1] == "tune" else None
    mapped, kept = libc.mallinfo2().hblks, libc.mallinfo2().fordblks
    buffers = [bytearray(1 << 20) for _ in range(16)]   # 1 MiB reads in flight
    mapped = libc.mallinfo2().hblks - mapped
    del buffers                                         # their replies have gone
    kept = libc.mallinfo2().fordblks - kept
    print(tuned, mapped, kept >> 20)
""")


def probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    return out[0], int(out[1]), int(out[2])


@glibc
def test_untuned_glibc_maps_each_buffer_and_returns_it() -> None:
    """The behaviour that costs a page fault per page of every new buffer."""
    tuned, mapped, kept_mib = probe("plain")
    assert tuned == "None"
    assert mapped == 16  # each 1 MiB buffer in its own mapping (threshold 128 KiB)
    assert kept_mib == 0  # and unmapped when freed


@glibc
def test_tuned_glibc_keeps_buffers_on_the_heap_and_the_heap_kept() -> None:
    tuned, mapped, kept_mib = probe("tune")
    assert tuned == "True"
    assert mapped == 0  # from the heap
    assert kept_mib >= 15  # freed (16 MiB), not returned: the next buffers reuse the pages


@pytest.mark.parametrize(("environ", "chosen"), [
    ({}, False),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, True),
])
def test_the_users_own_settings_stand(environ: dict[str, str], chosen: bool) -> None:
    assert user_has_chosen(environ) is chosen


def test_tuning_is_skipped_when_the_user_chose() -> None:
    from pynbd.server.malloc import tune_malloc

    assert tune_malloc({"MALLOC_TRIM_THRESHOLD_": "0"}) is False
