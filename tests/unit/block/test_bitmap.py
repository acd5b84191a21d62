"""Dirty bitmaps against a model: a set of dirty granule numbers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.block.bitmap import BitmapError, BitmapSet, DirtyBitmap


def model_runs(dirty: set[int], size: int, granularity: int, offset: int,
               length: int) -> list[tuple[int, bool]]:
    runs: list[tuple[int, bool]] = []
    end = min(offset + length, size)
    pos = offset
    while pos < end:
        state = (pos // granularity) in dirty
        stop = min(end, (pos // granularity + 1) * granularity)
        if runs and runs[-1][1] == state:
            runs[-1] = (runs[-1][0] + stop - pos, state)
        else:
            runs.append((stop - pos, state))
        pos = stop
    return runs


ops = st.lists(st.tuples(st.sampled_from(["set", "reset", "clear", "fill"]),
                         st.integers(0, 70_000), st.integers(0, 70_000)), max_size=25)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 70_000), shift=st.integers(9, 12), steps=ops,
       query=st.tuples(st.integers(0, 70_000), st.integers(1, 70_000)))
def test_against_a_model(size: int, shift: int, steps: list[tuple[str, int, int]],
                         query: tuple[int, int]) -> None:
    granularity = 1 << shift
    bitmap = DirtyBitmap("b", size, granularity)
    dirty: set[int] = set()
    granules = -(-size // granularity)
    for op, offset, length in steps:
        end = min(offset + length, size)
        if op == "set":
            bitmap.set(offset, length)
            if length and offset < size:
                dirty |= set(range(offset // granularity, (end - 1) // granularity + 1))
        elif op == "reset":
            bitmap.reset(offset, length)
            first = -(-offset // granularity)
            last = end // granularity if end < size else granules
            dirty -= set(range(first, last))
        elif op == "clear":
            bitmap.clear()
            dirty = set()
        else:
            bitmap.fill()
            dirty = set(range(granules))
    assert bitmap.count() == len(dirty) * granularity
    offset, length = query
    assert bitmap.runs(offset, length) == model_runs(dirty, size, granularity, offset, length)
    assert bitmap.runs(0, size) == model_runs(dirty, size, granularity, 0, size)
    for granule in range(granules):
        assert bitmap.is_dirty(granule * granularity) == (granule in dirty)
    copy = DirtyBitmap("c", size, granularity)
    copy.load_bytes(bitmap.to_bytes())
    assert copy.runs(0, size) == bitmap.runs(0, size)


def test_qcow2_bit_order() -> None:
    bitmap = DirtyBitmap("b", 64 * 512, 512)
    bitmap.set(0, 1)
    bitmap.set(9 * 512, 512)
    assert bitmap.to_bytes()[:2] == bytes([0b0000_0001, 0b0000_0010])


def test_merge_same_and_other_granularity() -> None:
    a, b = DirtyBitmap("a", 1 << 20, 4096), DirtyBitmap("b", 1 << 20, 4096)
    b.set(8192, 100)
    a.merge(b)
    assert a.dirty_runs(0, 1 << 20) == [(8192, 4096)]
    coarse = DirtyBitmap("c", 1 << 20, 65536)
    coarse.merge(a)
    assert coarse.dirty_runs(0, 1 << 20) == [(0, 65536)]
    with pytest.raises(BitmapError, match="incompatible"):
        a.merge(DirtyBitmap("d", 1 << 21, 4096))


@pytest.mark.parametrize("granularity", [0, 256, 3 * 4096, 1 << 32])
def test_bad_granularity(granularity: int) -> None:
    with pytest.raises(BitmapError, match="power of 2"):
        DirtyBitmap("b", 1 << 20, granularity)


def test_big_node_marks_cheaply() -> None:
    """1 TiB at 64 KiB: 16 Mi bits; marking and finding runs never walk bit by bit."""
    bitmap = DirtyBitmap("b", 1 << 40, 65536)
    bitmap.set(1 << 39, 1 << 30)
    bitmap.set((1 << 40) - 1, 1)
    assert bitmap.dirty_runs(0, 1 << 40) == [(1 << 39, 1 << 30), ((1 << 40) - 65536, 65536)]
    assert bitmap.count() == (1 << 30) + 65536


def test_set_records_into_enabled_bitmaps_only() -> None:
    bitmaps = BitmapSet()
    on, off = DirtyBitmap("on", 1 << 20, 4096), DirtyBitmap("off", 1 << 20, 4096,
                                                          enabled=False)
    bitmaps.add(on)
    bitmaps.add(off)
    assert bitmaps.recording
    bitmaps.record(0, 10)
    assert (on.count(), off.count()) == (4096, 0)
    on.enabled = False
    bitmaps.changed()
    still: bool = bitmaps.recording  # (a new read of the property)
    assert not still
    with pytest.raises(BitmapError, match="already exists"):
        bitmaps.add(DirtyBitmap("on", 1 << 20, 4096))
    assert [b.name for b in bitmaps] == ["on", "off"]
    bitmaps.remove("on")
    assert "on" not in bitmaps


def test_resize_keeps_bits_and_cleans_new_granules() -> None:
    bitmap = DirtyBitmap("b", 10 * 4096 + 1, 4096)
    bitmap.fill()
    bitmap.resize(20 * 4096)
    assert bitmap.dirty_runs(0, 20 * 4096) == [(0, 11 * 4096)]
    bitmap.resize(3 * 4096 + 7)
    assert bitmap.count() == 4 * 4096
