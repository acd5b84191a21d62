"""RbdNode: the node contract (under every layer) against a real Ceph cluster, plus
spec parsing.

Every contract test gets a fresh RBD image of the exact size it asks for;
``read_raw``/``write_raw`` go straight to the cluster through another librbd
client, so they also prove that the node keeps no private cache.  Like every
RBD test, these fail (never skip) when Ceph is missing (``tests/support/ceph.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import os
import re
from typing import TYPE_CHECKING, Any

import pytest
from tests.unit.block.contract import NodeContract
from tests.unit.block.support import pattern, read, run

from pynbd.block import _pool
from pynbd.block.node import ExtentFlags, FastZeroUnsupported, Node
from pynbd.block.rbd import RbdNode
from pynbd.block.rbdspec import RbdSpec, RbdSpecError, parse_rbd_filename

if TYPE_CHECKING:
    import pathlib

    from tests.support.ceph import CephCluster

MIB = 1 << 20


class TestRbdNode(NodeContract):
    has_raw_access = True

    @pytest.fixture(autouse=True)
    def _cluster(self, ceph: CephCluster) -> None:
        self.cluster = ceph

    def make_protocol(self, tmp_path: pathlib.Path, size: int) -> Node:
        name = self.cluster.new_image(size, prefix="contract")
        return RbdNode(parse_rbd_filename(self.cluster.spec(name)), discard=True)

    def read_raw(self, protocol: Node, offset: int, length: int) -> bytes:
        assert isinstance(protocol, RbdNode)
        return self.cluster.read(protocol.spec.image, offset, length)

    def write_raw(self, protocol: Node, offset: int, data: bytes) -> None:
        assert isinstance(protocol, RbdNode)
        rados, rbd = importlib.import_module("rados"), importlib.import_module("rbd")
        with rados.Rados(conffile=str(self.cluster.conf), conf={"rbd_cache": "false"}) as c, \
                c.open_ioctx(self.cluster.pool) as ioctx, \
                rbd.Image(ioctx, protocol.spec.image) as img:
            img.write(data, offset)


def _node(ceph: CephCluster, size: int = 8 * MIB, **kwargs: Any) -> RbdNode:
    return RbdNode(parse_rbd_filename(ceph.spec(ceph.new_image(size))), **kwargs)


def test_cache_off_by_default_and_multi_conn(ceph: CephCluster) -> None:
    node = _node(ceph)
    try:
        assert node._cluster.conf_get("rbd_cache") == "false"
        assert node.capabilities.can_multi_conn
    finally:
        run(node.close())


def test_graph_facing_parts_and_fast_paths(ceph: CephCluster) -> None:
    """Direct I/O and own-buffer reads (librbd's own threads and buffers); nothing
    inline, nothing to sendfile from."""
    node = _node(ceph)
    try:
        assert node.driver == "rbd"
        assert node.filename == f"rbd:{ceph.pool}/{node.spec.image}"
        assert node.children == {}
        assert node.resolve() is node
        paths = node.fast_paths()
        assert paths.start_read == node.start_read
        assert paths.start_write == node.start_write
        assert paths.read == node.read
        assert (paths.pread_nowait, paths.pwrite_nowait, paths.sendfile_source) == (
            None, None, None)
        # nothing to start for an empty request: the ordinary path answers it
        assert not node.start_read(0, 0, lambda data, error: None)
        assert not node.start_write(b"", 0, False, lambda error: None)
    finally:
        run(node.close())


def test_aio_in_flight_is_counted_for_the_loop(ceph: CephCluster) -> None:
    """While librbd works on a request the loop knows it awaits another thread (and
    so does not spin: pynbd.server.polling); the count drops when it is handed back."""
    node = _node(ceph)

    async def scenario() -> list[int]:
        before = _pool.off_thread_pending()
        seen = []
        loop = asyncio.get_running_loop()
        wrote: asyncio.Future[OSError | None] = loop.create_future()
        got: asyncio.Future[bytes | bytearray | None] = loop.create_future()
        assert node.start_write(b"w" * 4096, 0, False, wrote.set_result)
        assert node.start_read(8192, 4096, lambda data, _: got.set_result(data))
        seen.append(_pool.off_thread_pending() - before)
        assert await wrote is None
        assert await got == bytes(4096)
        seen.append(_pool.off_thread_pending() - before)
        return seen

    try:
        assert run(scenario()) == [2, 0]
    finally:
        run(node.close())


def _eventfds() -> int:
    """How many eventfds this process has open."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone already
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]"
    return count


def test_completions_reach_each_loop_and_close_releases_the_wakeups(ceph: CephCluster) -> None:
    """librbd's completions wake the loop through an eventfd per event loop: a node
    used from one loop and then another hands each its completions, and closing the
    node (after the image, so no late completion can write to a reused number)
    closes them all."""
    before = _eventfds()
    node = _node(ceph)

    async def write_then_read(seed: int) -> bytes | bytearray:
        await node.pwrite(pattern(seed, 4096), 0)
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes | bytearray | None] = loop.create_future()
        assert node.start_read(0, 4096, lambda data, _: got.set_result(data))
        data = await got
        assert data is not None
        return data

    try:
        assert run(write_then_read(1)) == pattern(1, 4096)
        assert _eventfds() == before + 1
        assert run(write_then_read(2)) == pattern(2, 4096)  # another loop
        assert _eventfds() == before + 2
    finally:
        run(node.close())
    assert _eventfds() == before


@pytest.mark.parametrize("fast_diff", [False, True], ids=["layering", "fast-diff"])
def test_block_status_per_object(ceph: CephCluster, fast_diff: bool) -> None:
    """Without fast-diff, extents come from the OSDs (per object extent); with it,
    from the object map, a whole 4 MIB object at a time.  Either way an untouched
    object is a hole, and large reads never ask (no sparse-read probe)."""
    name = ceph.new_image(16 * MIB, fast_diff=fast_diff)
    node = RbdNode(parse_rbd_filename(ceph.spec(name)))

    async def body() -> list[tuple[int, ExtentFlags]]:
        await node.pwrite(b"d" * 4096, 5 * MIB)
        return [(e.length, e.flags) for e in await node.block_status(0, 16 * MIB)]

    try:
        assert node.fast_diff is fast_diff
        assert not node.capabilities.sparse_reads
        extents = run(body())
    finally:
        run(node.close())
    hole = ExtentFlags.HOLE | ExtentFlags.ZERO
    assert extents[0] == (4 * MIB, hole)
    data = [e for e in extents if e[1] == ExtentFlags.DATA]
    assert len(data) == 1
    if fast_diff:
        assert extents == [(4 * MIB, hole), (4 * MIB, ExtentFlags.DATA), (8 * MIB, hole)]
    assert sum(length for length, _ in extents) == 16 * MIB


def test_client_cache_on_request_withdraws_multi_conn(ceph: CephCluster) -> None:
    spec = parse_rbd_filename(ceph.spec(ceph.new_image(MIB), "rbd_cache=true"))
    node = RbdNode(spec)
    try:
        assert node._cluster.conf_get("rbd_cache") == "true"
        assert not node.capabilities.can_multi_conn
        # a FUA write must flush the private cache: not a direct write then
        assert not node.start_write(b"x", 0, True, lambda error: None)
    finally:
        run(node.close())


def test_zeroes_without_holes_are_thick_and_never_fast(ceph: CephCluster) -> None:
    node = _node(ceph, discard=True)

    async def body() -> None:
        await node.pwrite(pattern(1, 4 * MIB), 0)
        with pytest.raises(FastZeroUnsupported):
            await node.write_zeroes(0, MIB, may_trim=False, fast=True)
        assert await read(node, 0, MIB) == pattern(1, 4 * MIB)[:MIB]
        await node.write_zeroes(0, MIB, may_trim=False)
        assert await read(node, 0, MIB) == bytes(MIB)
        # thick: still allocated
        extents = await node.block_status(0, MIB)
        assert extents[0].flags == ExtentFlags.DATA
        # thin, when holes are allowed: the 4 MIB object goes away
        await node.write_zeroes(0, 4 * MIB, may_trim=True, fast=True)
        extents = await node.block_status(0, 4 * MIB)
        assert [(e.length, e.flags) for e in extents] == [
            (4 * MIB, ExtentFlags.HOLE | ExtentFlags.ZERO)]
        assert await read(node, 0, 4 * MIB) == bytes(4 * MIB)

    try:
        run(body())
    finally:
        run(node.close())


def test_discard_off_makes_trim_a_no_op(ceph: CephCluster) -> None:
    node = _node(ceph, discard=False)

    async def body() -> None:
        await node.pwrite(b"x" * 4096, 0)
        await node.trim(0, 4096)
        assert await read(node, 0, 4096) == b"x" * 4096
        # zeroing is not a discard: thin (and fast) whenever holes are allowed
        await node.write_zeroes(0, 4096, may_trim=True, fast=True)
        assert await read(node, 0, 4096) == bytes(4096)

    try:
        assert not node.capabilities.can_trim
        run(body())
    finally:
        run(node.close())


def test_snapshot_is_read_only_and_frozen(ceph: CephCluster) -> None:
    name = ceph.new_image(MIB)
    live = RbdNode(parse_rbd_filename(ceph.spec(name)))
    try:
        run(live.pwrite(b"before" * 100, 0))
        ceph.rbd("snap", "create", f"{ceph.pool}/{name}@s1")
        run(live.pwrite(b"after!" * 100, 0))
    finally:
        run(live.close())
    snap = RbdNode(parse_rbd_filename(ceph.spec(f"{name}@s1")))
    try:
        assert snap.read_only
        assert not snap.capabilities.can_write
        assert run(read(snap, 0, 600)) == b"before" * 100
        with pytest.raises(OSError, match="Read-only") as info:
            run(snap.pwrite(b"x", 0))
        assert info.value.errno == errno.EROFS
    finally:
        run(snap.close())


@pytest.mark.parametrize(("text", "message"), [
    ("rbd:pool/nope:conf=/nonexistent.conf", "configuration file '/nonexistent.conf' not found"),
    ("rbd:nopool/img:conf={conf}", "pool 'nopool' does not exist"),
    ("rbd:rbd/missing-image:conf={conf}", "image 'missing-image' not found in pool 'rbd'"),
    ("rbd:rbd/img:conf={conf}:mon_host=127.0.0.1\\:9:client_mount_timeout=1",
     "cannot connect to the Ceph cluster"),
])
def test_open_errors_say_what_is_wrong(ceph: CephCluster, text: str, message: str) -> None:
    with pytest.raises(OSError, match=re.escape(message)):
        RbdNode(parse_rbd_filename(text.format(conf=ceph.conf)))


# -- qemu's rbd: filename syntax (no cluster needed) -----------------------------------------

@pytest.mark.parametrize(("text", "spec"), [
    ("rbd:pool/image", RbdSpec(pool="pool", image="image")),
    ("rbd:pool/ns/image@snap", RbdSpec(pool="pool", namespace="ns", image="image",
                                       snapshot="snap")),
    ("rbd:p/i:conf=/etc/ceph/x.conf:id=admin",
     RbdSpec(pool="p", image="i", conf="/etc/ceph/x.conf", user="admin")),
    (r"rbd:p/i:mon_host=10.0.0.1\:6789:rbd_cache=true",
     RbdSpec(pool="p", image="i", options=(("mon_host", "10.0.0.1:6789"),
                                           ("rbd_cache", "true")))),
    (r"rbd:p/we\:ird\@name", RbdSpec(pool="p", image="we:ird@name")),
    ("rbd:p/i:key=a=b", RbdSpec(pool="p", image="i", options=(("key", "a=b"),))),
])
def test_parse_rbd_filename(text: str, spec: RbdSpec) -> None:
    assert parse_rbd_filename(text) == spec


@pytest.mark.parametrize("text", [
    "rbd:", "rbd:pool", "rbd:/image", "rbd:pool/", "rbd:a/b/c/d", "rbd:p/i@", "rbd:p/i@a@b",
    "rbd:p/i:novalue", "rbd:p/i:=v", "file.img",
])
def test_parse_rbd_filename_rejects(text: str) -> None:
    with pytest.raises(RbdSpecError):
        parse_rbd_filename(text)


def test_cache_requested() -> None:
    assert parse_rbd_filename("rbd:p/i:rbd_cache=true").cache_requested
    assert parse_rbd_filename("rbd:p/i:rbd-cache=on").cache_requested
    assert not parse_rbd_filename("rbd:p/i:rbd_cache=false").cache_requested
    assert not parse_rbd_filename("rbd:p/i").cache_requested
