"""Dirty bitmaps in ``pynbd daemon``, seen by qemu's and libnbd's own tools.

Each test starts a real ``pynbd daemon``, drives it with ``qemu.qmp``, writes
with qemu-io (or libnbd) through a writable export, and reads the bitmap back
the way a backup tool does: ``nbdinfo --map=qemu:dirty-bitmap:NAME`` and
``qemu-img map`` with ``x-dirty-bitmap`` (which reports dirty areas as
``"data": false``).  Error classes and words are qemu-storage-daemon 7.2's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from typing import TYPE_CHECKING, Any, cast

import nbd
import pytest
from qemu.qmp import ExecuteError, QMPClient
from tests.support.interop import bounded, require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.interop.conftest import Daemon

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
#: bound for the daemon to start or exit, a tool to run, an event to come
T = 30.0
BUSY = "Bitmap '{}' is currently in use by another operation and cannot be used"


def tool(*argv: str) -> str:
    require_tool(argv[0])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=T, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def qemu_io(daemon: Daemon, export: str, *commands: str) -> None:
    args = [arg for command in commands for arg in ("-c", command)]
    tool("qemu-io", "-f", "raw", *args, daemon.uri(export))


def dirty_map(daemon: Daemon, export: str, bitmap: str) -> list[tuple[int, int]]:
    """The dirty runs ``(offset, length)`` of a bitmap, as nbdinfo reads them."""
    extents = json.loads(tool("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}",
                              daemon.uri(export)))
    assert sum(e["length"] for e in extents) == SIZE
    return [(e["offset"], e["length"]) for e in extents if e["type"] & 1]


def qemu_img_dirty(daemon: Daemon, export: str, bitmap: str) -> list[tuple[int, int]]:
    """The same through qemu's NBD client: dirty reads as ``"data": false``."""
    opts = (f"driver=nbd,server.type=unix,server.path={daemon.sock},export={export},"
            f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
    entries = json.loads(tool("qemu-img", "map", "--output=json", "--image-opts", opts))
    return [(e["start"], e["length"]) for e in entries if not e["data"]]


async def fails(client: QMPClient, command: str, args: dict[str, Any]) -> str:
    with pytest.raises(ExecuteError) as info:
        await qmp(client, command, args)
    assert info.value.error_class == "GenericError"
    return str(info.value)


async def bitmaps_of(client: QMPClient, node: str) -> list[dict[str, Any]]:
    for entry in await qmp(client, "query-named-block-nodes"):
        if entry["node-name"] == node:
            return list(entry.get("dirty-bitmaps", []))
    raise AssertionError(f"no node {node}")


def zeroed(path: Path) -> Path:
    path.write_bytes(bytes(SIZE))
    return path


async def setup(client: QMPClient, daemon: Daemon, disk: Path) -> None:
    """File node ``f`` on ``disk``, raw node ``n`` over it, the NBD server."""
    await qmp(client, "blockdev-add", {"driver": "file", "node-name": "f",
                                       "filename": str(disk)})
    await qmp(client, "blockdev-add", {"driver": "raw", "node-name": "n", "file": "f"})
    await qmp(client, "nbd-server-start", {"addr": {"type": "unix",
                                                    "data": {"path": daemon.sock}}})


def export(export_id: str, node: str = "n", **extra: Any) -> dict[str, Any]:
    return {"type": "nbd", "id": export_id, "node-name": node, "name": export_id, **extra}


async def deleted(client: QMPClient, export_id: str) -> None:
    await qmp(client, "block-export-del", {"id": export_id, "mode": "hard"})
    async with asyncio.timeout(T):
        async for event in client.events:
            data = cast("dict[str, Any]", event["data"])
            if event["event"] == "BLOCK_EXPORT_DELETED" and data["id"] == export_id:
                return


def test_writes_of_every_client_reach_the_bitmap_and_backup_tools_read_it(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    daemon = start()
    disk = zeroed(tmp_path / "disk")

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            await qmp(client, "block-dirty-bitmap-add", {"node": "n", "name": "b"})
            await qmp(client, "block-dirty-bitmap-add", {"node": "f", "name": "fb",
                                                         "granularity": 4096})
            await qmp(client, "block-export-add", export("w", writable=True))
            await qmp(client, "block-export-add", export("w2", writable=True))
            qemu_io(daemon, "w", "write -P 0x55 0 4k", "write -P 0x55 1M 64k")
            qemu_io(daemon, "w2", "write -z 3M 1k", "write -P 0x66 3145727 2")
            # backup time: stop recording, offer the bitmap read-only
            await qmp(client, "transaction", {"actions": [
                {"type": "block-dirty-bitmap-disable", "data": {"node": "n", "name": "b"}}]})
            await qmp(client, "block-export-add", export("r", bitmaps=["b"]))
            expected = [(0, 64 * KiB), (MiB, 64 * KiB), (3 * MiB - 64 * KiB, 128 * KiB)]
            assert dirty_map(daemon, "r", "b") == expected
            assert qemu_img_dirty(daemon, "r", "b") == expected
            qemu_io(daemon, "w", "write -P 0x77 2M 1")  # no longer recorded
            assert dirty_map(daemon, "r", "b") == expected
            # the raw node wrote to its file through the file's own tracking
            assert await bitmaps_of(client, "f") == [
                {"name": "fb", "recording": True, "persistent": False, "busy": False,
                 "granularity": 4096, "count": 4 * 4096 + 64 * KiB}]
            assert await bitmaps_of(client, "n") == [
                {"name": "b", "recording": False, "persistent": False, "busy": True,
                 "granularity": 65536, "count": 4 * 64 * KiB}]
    asyncio.run(main())


def test_a_bitmap_added_while_a_client_is_connected_records_its_later_writes(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    """The client's fast paths were resolved when it connected, before the bitmap
    existed: its later writes are recorded all the same (raw file and qcow2)."""
    daemon = start()
    disk = zeroed(tmp_path / "disk")
    image = tmp_path / "disk.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE))
    mirror = bytearray(SIZE)

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            await qmp(client, "blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {
                "driver": "file", "filename": str(image)}})
            for node in ("n", "q"):
                await qmp(client, "block-export-add", export(f"w{node}", node, writable=True))
            handles = {}
            for node in ("n", "q"):
                h = nbd.NBD()
                bounded(h.connect_uri, daemon.uri(f"w{node}"), timeout=T)
                handles[node] = h
                bounded(h.pwrite, b"\x01" * 4096, 0, timeout=T)
            for node in ("n", "q"):
                await qmp(client, "block-dirty-bitmap-add", {"node": node, "name": "b",
                                                             "granularity": 4096})
            for node, h in handles.items():
                bounded(h.pwrite, b"\x02" * 4096, MiB, timeout=T)
                bounded(h.pwrite, b"\x03" * 100, 2 * MiB + 5000, timeout=T)
                bounded(h.flush, timeout=T)
                bounded(h.shutdown, timeout=T)
                await qmp(client, "block-export-add", export(f"m{node}", node, writable=True,
                                                             bitmaps=["b"]))
                assert dirty_map(daemon, f"m{node}", "b") == [(MiB, 4096), (2 * MiB + 4096,
                                                                            4096)]
            await qmp(client, "quit")
        mirror[0:4096] = b"\x01" * 4096
        mirror[MiB:MiB + 4096] = b"\x02" * 4096
        mirror[2 * MiB + 5000:2 * MiB + 5100] = b"\x03" * 100
    asyncio.run(main())
    assert daemon.proc.wait(T) == 0
    (tmp_path / "mirror").write_bytes(mirror)
    tool("qemu-img", "check", "-q", str(image))
    tool("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image),
         str(tmp_path / "mirror"))
    assert (tmp_path / "disk").read_bytes() == mirror


def test_merge_across_granularities(start: Callable[[], Daemon], tmp_path: Path) -> None:
    daemon = start()
    disk = zeroed(tmp_path / "disk")

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            for name, granularity in (("fine", 512), ("coarse", MiB)):
                await qmp(client, "block-dirty-bitmap-add", {"node": "n", "name": name,
                                                             "granularity": granularity})
            await qmp(client, "block-export-add", export("w", writable=True))
            qemu_io(daemon, "w", "write 70000 100", "write 3145738 1")
            await qmp(client, "transaction", {"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "n", "name": "t64k", "disabled": True}},
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "n", "name": "t4k", "disabled": True, "granularity": 4096}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "n", "target": "t64k", "bitmaps": ["fine"]}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "n", "target": "t4k", "bitmaps": [
                     {"node": "n", "name": "coarse"}, "fine"]}}]})
            await qmp(client, "block-export-add", export("r", bitmaps=["t64k", "t4k"]))
            assert dirty_map(daemon, "r", "t64k") == [(65536, 65536), (3 * MiB, 65536)]
            assert dirty_map(daemon, "r", "t4k") == [(0, MiB), (3 * MiB, MiB)]
            # the sources are as they were (an enabled one on a writable export)
            await qmp(client, "block-export-add", export("wf", writable=True,
                                                         bitmaps=["fine"]))
            assert dirty_map(daemon, "wf", "fine") == [(69632, 512), (3 * MiB, 512)]
    asyncio.run(main())


def test_exported_bitmaps_are_busy_until_the_export_is_gone(
        start: Callable[[], Daemon], tmp_path: Path) -> None:
    daemon = start()
    disk = zeroed(tmp_path / "disk")

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            (tmp_path / "other").write_bytes(bytes(SIZE))
            await qmp(client, "blockdev-add", {"driver": "file", "node-name": "o",
                                               "filename": str(tmp_path / "other")})
            for node, name in (("n", "b"), ("n", "c"), ("o", "ob")):
                await qmp(client, "block-dirty-bitmap-add", {"node": node, "name": name})
            await qmp(client, "block-export-add", export(
                "w", writable=True, bitmaps=["b", {"node": "o", "name": "ob"}]))
            cases: list[tuple[str, dict[str, Any]]] = [
                    ("block-dirty-bitmap-remove", {"node": "n", "name": "b"}),
                    ("block-dirty-bitmap-clear", {"node": "n", "name": "b"}),
                    ("block-dirty-bitmap-enable", {"node": "n", "name": "b"}),
                    ("block-dirty-bitmap-disable", {"node": "n", "name": "b"}),
                    ("block-dirty-bitmap-merge", {"node": "n", "target": "b",
                                                  "bitmaps": ["c"]}),
                    ("block-dirty-bitmap-merge", {"node": "n", "target": "c",
                                                  "bitmaps": ["b"]}),
                    ("block-export-add", export("w2", writable=True, bitmaps=["b"]))]
            for command, args in cases:
                assert await fails(client, command, args) == BUSY.format("b")
            assert await fails(client, "blockdev-del", {"node-name": "o"}) == (
                "Node 'o' is busy: in use by block export 'w'")
            # the exported bitmap records the export's own writes, and shows them
            qemu_io(daemon, "w", "write 2M 1")
            assert dirty_map(daemon, "w", "b") == [(2 * MiB, 64 * KiB)]
            assert [b["busy"] for b in await bitmaps_of(client, "n")] == [False, True]
            await deleted(client, "w")
            assert [b["busy"] for b in await bitmaps_of(client, "n")] == [False, False]
            await qmp(client, "blockdev-del", {"node-name": "o"})
            await qmp(client, "block-export-add", export("w", writable=True, bitmaps=["b"]))
            await qmp(client, "nbd-server-stop")
            await qmp(client, "block-dirty-bitmap-remove", {"node": "n", "name": "b"})
            assert [b["name"] for b in await bitmaps_of(client, "n")] == ["c"]
    asyncio.run(main())


def test_a_transaction_is_all_or_nothing(start: Callable[[], Daemon], tmp_path: Path) -> None:
    daemon = start()
    disk = zeroed(tmp_path / "disk")

    def act(kind: str, **data: Any) -> dict[str, Any]:
        return {"type": f"block-dirty-bitmap-{kind}", "data": {"node": "n", **data}}

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            await qmp(client, "block-dirty-bitmap-add", {"node": "n", "name": "b"})
            await qmp(client, "block-dirty-bitmap-add", {"node": "n", "name": "t",
                                                         "disabled": True})
            await qmp(client, "block-export-add", export("w", writable=True))
            qemu_io(daemon, "w", "write 0 1")
            before = await bitmaps_of(client, "n")
            for failing, message in [
                    ({"type": "abort", "data": {}}, "Transaction aborted using Abort action"),
                    (act("add", name="b"), "Bitmap already exists: b"),
                    ({"type": "drive-backup", "data": {}},
                     "Parameter 'type' does not accept value 'drive-backup'")]:
                assert await fails(client, "transaction", {"actions": [
                    act("add", name="x"), act("merge", target="t", bitmaps=["b"]),
                    act("clear", name="b"), act("disable", name="b"),
                    act("remove", name="t"), failing]}) == message
                assert await bitmaps_of(client, "n") == before
            # b still records
            qemu_io(daemon, "w", "write 1M 1")
            assert [b["count"] for b in await bitmaps_of(client, "n")] == [0, 2 * 64 * KiB]
            assert await qmp(client, "transaction", {"actions": [
                act("merge", target="t", bitmaps=["b"]), act("clear", name="b"),
                act("remove", name="b"), act("add", name="b2")]}) == {}
            assert [(b["name"], b["count"]) for b in await bitmaps_of(client, "n")] == [
                ("b2", 0), ("t", 2 * 64 * KiB)]
    asyncio.run(main())


def test_refusals_and_the_backing_chain(start: Callable[[], Daemon], tmp_path: Path) -> None:
    daemon = start()
    disk = zeroed(tmp_path / "disk")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE))
    tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(base))
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await setup(client, daemon, disk)
            await qmp(client, "block-dirty-bitmap-add", {"node": "n", "name": "b"})
            refusals: list[tuple[str, dict[str, Any], str]] = [
                    ("block-dirty-bitmap-add", {"node": "zz", "name": "b"},
                     "Cannot find device=zz nor node-name=zz"),
                    ("block-dirty-bitmap-add", {"node": "n", "name": ""},
                     "Bitmap name cannot be empty"),
                    ("block-dirty-bitmap-add", {"node": "n", "name": "g", "granularity": 1000},
                     "Granularity must be power of 2 and at least 512"),
                    ("block-dirty-bitmap-add", {"node": "n", "name": "p", "persistent": True},
                     "Can't store persistent bitmaps to n: Operation not supported"),
                    ("block-dirty-bitmap-clear", {"node": "n", "name": "zz"},
                     "Dirty bitmap 'zz' not found"),
                    ("block-dirty-bitmap-enable", {"node": "zz", "name": "b"},
                     "Node 'zz' not found"),
                    ("block-export-add", export("e", bitmaps=["zz"]), "Bitmap 'zz' is not found"),
                    ("block-export-add", export("e", bitmaps=["b"]),
                     "Enabled bitmap 'b' incompatible with readonly export")]
            for command, args, message in refusals:
                assert await fails(client, command, args) == message
            # a name is looked up down the backing chain; the base is read-only
            await qmp(client, "blockdev-add", {
                "driver": "qcow2", "node-name": "base", "read-only": True,
                "file": {"driver": "file", "filename": str(base), "read-only": True}})
            await qmp(client, "blockdev-add", {
                "driver": "qcow2", "node-name": "top", "backing": "base",
                "file": {"driver": "file", "filename": str(top)}})
            await qmp(client, "block-dirty-bitmap-add", {"node": "base", "name": "bb"})
            await qmp(client, "block-dirty-bitmap-merge", {
                "node": "base", "target": "bb", "bitmaps": [{"node": "n", "name": "b"}]})
            await qmp(client, "block-export-add", export("t", "top", bitmaps=["bb"]))
            assert dirty_map(daemon, "t", "bb") == []
            await qmp(client, "block-export-add", export("w", writable=True))
            qemu_io(daemon, "w", "write 1M 1")
            await qmp(client, "block-dirty-bitmap-disable", {"node": "n", "name": "b"})
            await qmp(client, "block-export-add", export("r", bitmaps=["b"]))
            assert dirty_map(daemon, "r", "b") == [(MiB, 64 * KiB)]
            assert qemu_img_dirty(daemon, "t", "bb") == []
            await qmp(client, "quit")
    asyncio.run(main())
    assert daemon.proc.wait(T) == 0
    assert os.path.getsize(top) > 0
    tool("qemu-img", "check", "-q", str(top))
