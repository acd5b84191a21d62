"""pynbd on Ceph RBD, seen by real clients, against a real single-node cluster.

qemu-io, qemu-img, nbdinfo and nbdcopy through an rbd export; several pynbd
gateways (separate processes on loopback TCP, standing in for machines) on one
image checked by ``pynbd check`` across them, with a forced client cache as the
negative control; failover from a killed gateway; read-only snapshots; the
exclusive-lock mode; a blocklisted gateway; bad specs; and the daemon's
``blockdev-add`` with driver ``rbd`` driven by qemu.qmp.

The multi-conn scenarios of tests/interop/test_multiconn.py also run on rbd.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from qemu.qmp import ExecuteError
from tests.support.interop import bounded, require_tool
from tests.support.qmp import qmp, qmp_open

from pynbd.server.runtime import STOP_WAIT_REPORT

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.conftest import RunningServer
    from tests.support.ceph import CephCluster

pytestmark = pytest.mark.interop

MiB = 1 << 20
BLOCK = 64 * 1024
#: bound for one tool run or one libnbd call
T = 60.0
#: the test cluster's osd_client_watch_timeout (scripts/ceph-cluster): a killed
#: gateway's exclusive lock can be broken after this
WATCH_TIMEOUT = 5.0


def tool(*argv: str, timeout: float = T, check: bool = True) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: "
                             f"{done.stderr.strip() or done.stdout.strip()}")
    return done


def pynbd_cli(*args: str, timeout: float = T) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pynbd", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def connect(uri: str) -> Any:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    bounded(h.connect_uri, uri, timeout=T)
    return h


def close(h: Any) -> None:
    """Disconnect politely unless the server already went away (libnbd frees the handle
    when it is collected)."""
    if not h.aio_is_dead():
        h.shutdown()


def block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


# -- real tools through one gateway ------------------------------------------------------


def test_tools_read_write_map_and_copy(ceph: CephCluster, pynbd_server: Callable[..., Any],
                                       tmp_path: Path) -> None:
    name = ceph.new_image(64 * MiB)
    srv: RunningServer = pynbd_server("-e", "0", "--discard", "unmap", ceph.spec(name))
    info = json.loads(tool("nbdinfo", "--json", srv.uri).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 64 * MiB
    assert export["can_multi_conn"] is True
    assert export["is_read_only"] is False

    tool("qemu-io", "-f", "raw", srv.uri, "-c", "write -P 0xab 1M 2M", "-c", "flush",
         "-c", "read -P 0xab 1M 2M", "-c", "write -z 8M 1M", "-c", "read -P 0 8M 1M")
    # straight from the cluster, not through pynbd
    assert ceph.read(name, MiB, 2 * MiB) == b"\xab" * (2 * MiB)

    # block status: the written object is data, an untouched object is a hole
    extents = json.loads(tool("nbdinfo", "--map", "--json", srv.uri).stdout)
    assert extents[0]["offset"] == 0
    assert extents[0]["type"] & 1 == 0  # data
    assert any(e["offset"] <= 32 * MiB < e["offset"] + e["length"] and e["type"] == 3
               for e in extents), extents
    qemu_map = json.loads(tool("qemu-img", "map", "-f", "raw", "--output=json",
                               srv.uri).stdout)
    assert any(e["data"] for e in qemu_map)
    assert any(not e["data"] for e in qemu_map)

    # qemu-img convert in and out, compare
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(16 * MiB) + bytes(48 * MiB))
    tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), srv.uri)
    tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), srv.uri)
    out = tmp_path / "out.raw"
    tool("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(out))
    assert out.read_bytes() == source.read_bytes()

    # nbdcopy in (multi-conn by default) and out
    source.write_bytes(os.urandom(24 * MiB) + bytes(8 * MiB) + os.urandom(32 * MiB))
    tool("nbdcopy", str(source), srv.uri)
    out.unlink()
    tool("nbdcopy", srv.uri, str(out))
    assert out.read_bytes() == source.read_bytes()
    assert ceph.read(name, 0, 24 * MiB) == source.read_bytes()[:24 * MiB]


def test_nbdcopy_between_two_rbd_exports(ceph: CephCluster,
                                         pynbd_server: Callable[..., Any]) -> None:
    a, b = ceph.new_image(32 * MiB), ceph.new_image(32 * MiB)
    src = pynbd_server("-e", "0", ceph.spec(a))
    dst = pynbd_server("-e", "0", ceph.spec(b))
    data = os.urandom(8 * MiB)
    h = connect(src.uri)
    try:
        h.pwrite(data, 4 * MiB)
        h.flush()
    finally:
        close(h)
    tool("nbdcopy", src.uri, dst.uri)
    assert ceph.read(b, 4 * MiB, 8 * MiB) == data
    assert ceph.read(b, 0, 4 * MiB) == bytes(4 * MiB)


# -- several gateways, one disk --------------------------------------------------------------


def gateways(pynbd_server: Callable[..., Any], spec: str, count: int = 2,
             *args: str) -> list[RunningServer]:
    """``count`` pynbd processes on loopback TCP exporting the same image."""
    return [pynbd_server("-e", "0", *args, spec, tcp=True) for _ in range(count)]


def checker(*uris: str, seconds: float, force: bool = False,
            region: str = "2M") -> tuple[int, dict[str, Any]]:
    args = ["check", "--write", "--json", "--connections", "4", "--seconds", str(seconds),
            "--region", region, "--seed", "7", *(["--force"] if force else []), *uris]
    done = pynbd_cli(*args, timeout=seconds + T)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_checker_finds_no_violation_across_gateways(ceph: CephCluster,
                                                    pynbd_server: Callable[..., Any]) -> None:
    spec = ceph.spec(ceph.new_image(16 * MiB))
    a, b = gateways(pynbd_server, spec)
    code, result = checker(a.uri, b.uri, seconds=4)
    assert code == 0, result
    assert result["violations"] == []
    assert result["ops"] > 1000
    assert len(result["uris"]) == 2


def test_checker_catches_a_forced_writeback_cache(ceph: CephCluster,
                                                  pynbd_server: Callable[..., Any]) -> None:
    """Negative control: with librbd's client cache on, each gateway reads its own
    stale cache; pynbd then withdraws multi-conn, and the checker (forced) sees it."""
    spec = ceph.spec(ceph.new_image(16 * MiB), "rbd_cache=true",
                     "rbd_cache_policy=writeback")
    a, b = gateways(pynbd_server, spec)
    h = connect(a.uri)
    try:
        assert h.can_multi_conn() is False
    finally:
        close(h)
    refused = pynbd_cli("check", "--write", "--seconds", "1", a.uri, b.uri)
    assert refused.returncode == 2
    assert "multi-conn" in refused.stderr
    code, result = checker(a.uri, b.uri, seconds=15, force=True, region="1M")
    assert code == 1, result
    assert result["violations"]


@pytest.mark.parametrize("exclusive_lock", [False, True], ids=["no-lock", "exclusive-lock"])
def test_failover_keeps_every_flushed_write(ceph: CephCluster, pynbd_server: Callable[..., Any],
                                            exclusive_lock: bool) -> None:
    """A client writes through gateway A with flushes, A is SIGKILLed with writes in
    flight, the client goes on through gateway B: every write flushed before the
    kill is there.  With the exclusive-lock feature, B's first write waits until the
    dead gateway's watch expires (osd_client_watch_timeout) and its lock is broken."""
    name = ceph.new_image(32 * MiB, exclusive_lock=exclusive_lock)
    a, b = gateways(pynbd_server, ceph.spec(name))
    blocks = (32 * MiB) // BLOCK
    order = random.Random(1).sample(range(blocks), blocks)
    acked: list[int] = []
    flushed: list[int] = []
    h = connect(a.uri)
    try:
        for i, index in enumerate(order[:200]):
            h.pwrite(block(index), index * BLOCK)
            acked.append(index)
            if i % 20 == 19:
                h.flush()
                flushed = list(acked)
        # writes in flight when A dies
        for index in order[200:232]:
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(block(index))), index * BLOCK)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(T)
    finally:
        del h
    started = time.monotonic()
    h = connect(b.uri)
    try:
        h.pwrite(block(order[240]), order[240] * BLOCK)
        takeover = time.monotonic() - started
        h.flush()
        for index in [*flushed, order[240]]:
            assert h.pread(BLOCK, index * BLOCK) == block(index), f"block {index}"
        for index in order[300:310]:
            assert h.pread(BLOCK, index * BLOCK) == bytes(BLOCK)
    finally:
        close(h)
    assert len(flushed) == 200
    if exclusive_lock:
        assert takeover < WATCH_TIMEOUT + 30, takeover
    else:
        assert takeover < 5, takeover


# -- read-only: snapshots and the exclusive-lock mode ---------------------------------------


def test_snapshot_export_is_read_only(ceph: CephCluster, pynbd_server: Callable[..., Any]) -> None:
    name = ceph.new_image(8 * MiB)
    live = pynbd_server("-e", "0", ceph.spec(name))
    tool("qemu-io", "-f", "raw", live.uri, "-c", "write -P 0x11 0 1M")
    ceph.rbd("snap", "create", f"{ceph.pool}/{name}@before")
    tool("qemu-io", "-f", "raw", live.uri, "-c", "write -P 0x22 0 1M")
    snap = pynbd_server("-e", "0", ceph.spec(f"{name}@before"))
    h = connect(snap.uri)
    try:
        assert h.is_read_only() is True
        assert h.can_multi_conn() is True
        assert h.pread(MiB, 0) == b"\x11" * MiB
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"x" * 512, 0)
        assert info.value.errno == "EPERM"
    finally:
        close(h)
    tool("qemu-io", "-f", "raw", live.uri, "-c", "read -P 0x22 0 1M")


def test_exclusive_mode_one_writer_and_read_only_gateways(
        ceph: CephCluster, pynbd_server: Callable[..., Any]) -> None:
    name = ceph.new_image(8 * MiB, exclusive_lock=True)
    spec = ceph.spec(name)
    writer = pynbd_server("-e", "0", "--rbd-lock", "exclusive", spec, tcp=True)
    # a second exclusive writer is refused at start, in one line
    second = pynbd_cli("-k", "/nonexistent/unused.sock", "--rbd-lock", "exclusive", spec)
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1
    assert "cannot take the exclusive lock" in second.stderr
    reader = pynbd_server("-e", "0", "-r", spec, tcp=True)
    tool("qemu-io", "-f", "raw", writer.uri, "-c", "write -P 0x5c 0 2M", "-c", "flush")
    tool("qemu-io", "-r", "-f", "raw", reader.uri, "-c", "read -P 0x5c 0 2M")
    # a writable gateway in the default mode cannot take the lock: EPERM, no hang
    other = pynbd_server("-e", "0", spec, tcp=True)
    h = connect(other.uri)
    try:
        with pytest.raises(nbd.Error) as info:
            bounded(h.pwrite, b"y" * 4096, 0, timeout=T)
        assert info.value.errno == "EPERM"
        assert h.pread(4096, 0) == b"\x5c" * 4096
    finally:
        close(h)
    tool("qemu-io", "-f", "raw", writer.uri, "-c", "write -P 0x5d 0 4k", "-c", "read -P 0x5d 0 4k")


# -- errors -------------------------------------------------------------------------------


def test_stop_with_the_cluster_gone(pynbd_server: Callable[..., Any], tmp_path: Path) -> None:
    """The cluster goes away under a gateway that has written: the first SIGTERM
    waits for the final flush and the image's close and says so on stderr (never
    cutting them short), a second one exits at once with status 1.  The test has
    its own cluster, since it kills it."""
    from tests.support.ceph import CephCluster

    cluster = CephCluster.start(tmp_path / "doomed")
    try:
        srv = pynbd_server(cluster.spec(cluster.new_image(8 * MiB)))
        h = connect(srv.uri)
        try:
            h.pwrite(block(1), 0)
        finally:
            close(h)
    finally:
        cluster.stop()
    srv.proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        srv.proc.wait(STOP_WAIT_REPORT + 1.5)
    started = time.monotonic()
    assert srv.stop(signal.SIGTERM, timeout=T) == 1
    assert time.monotonic() - started < 10
    stderr = srv.proc.stderr.read()
    # librbd without a cache has nothing to flush: closing the image is what waits
    assert re.search(r"stopping: still waiting for (the final flush|the storage to close) "
                     r"after 2 s \(storage not answering\?\)", stderr), stderr
    assert "second signal: exiting without waiting for the storage" in stderr


def test_blocklisted_gateway_answers_eshutdown(ceph: CephCluster,
                                               pynbd_server: Callable[..., Any]) -> None:
    name = ceph.new_image(8 * MiB)
    srv = pynbd_server("-e", "0", ceph.spec(name))
    status = json.loads(ceph.rbd("status", "--format", "json", f"{ceph.pool}/{name}"))
    watchers = [w["address"] for w in status["watchers"]]
    assert len(watchers) == 1, status
    done = subprocess.run(["ceph", "-c", str(ceph.conf), "osd", "blocklist", "add", watchers[0]],
                          capture_output=True, text=True, timeout=T, check=False)
    assert done.returncode == 0, done.stderr
    try:
        h = connect(srv.uri)
        try:
            with pytest.raises(nbd.Error) as info:
                bounded(h.pwrite, b"z" * 4096, 0, timeout=T)
            assert info.value.errno == "ESHUTDOWN"
        finally:
            close(h)
    finally:
        subprocess.run(["ceph", "-c", str(ceph.conf), "osd", "blocklist", "rm", watchers[0]],
                       capture_output=True, timeout=T, check=False)


@pytest.mark.parametrize(("spec", "message"), [
    ("rbd:nopool/img:conf={conf}", "pool 'nopool' does not exist"),
    ("rbd:rbd/no-such-image:conf={conf}", "image 'no-such-image' not found in pool 'rbd'"),
    ("rbd:rbd/img:conf={conf}:mon_host=127.0.0.1\\:9:client_mount_timeout=2",
     "cannot connect to the Ceph cluster"),
    ("rbd:rbd/img:conf={tmp}/missing.conf", "configuration file"),
    ("rbd:justapool", "expected rbd:POOL/IMAGE"),
])
def test_bad_specs_exit_2_with_one_line(ceph: CephCluster, tmp_path: Path, spec: str,
                                        message: str) -> None:
    done = pynbd_cli("-k", str(tmp_path / "s.sock"), spec.format(conf=ceph.conf, tmp=tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("pynbd: ")
    assert done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "s.sock").exists()


def test_missing_bindings_exit_2_with_one_line(tmp_path: Path) -> None:
    # a Python that cannot import rados: shadow it with a module that fails to import
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "rados.py").write_text("raise ImportError('No module named rados')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "pynbd", "-k", str(tmp_path / "s.sock"),
                           "rbd:rbd/img"], capture_output=True, text=True, timeout=T,
                          env=env, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "python3-rados python3-rbd" in done.stderr


def test_fork_opens_the_image_in_the_child(ceph: CephCluster, tmp_path: Path) -> None:
    name = ceph.new_image(4 * MiB)
    sock, pid_file = tmp_path / "f.sock", tmp_path / "f.pid"
    done = pynbd_cli("--fork", "-t", "-e", "0", "-k", str(sock), "--pid-file", str(pid_file),
                     ceph.spec(name))
    assert done.returncode == 0, done.stderr
    pid = int(pid_file.read_text())
    try:
        uri = f"nbd+unix:///?socket={sock}"
        tool("qemu-io", "-f", "raw", uri, "-c", "write -P 0x33 0 64k", "-c", "read -P 0x33 0 64k")
    finally:
        os.kill(pid, signal.SIGTERM)
    # a bad image with --fork: the parent reports the child's error
    bad = pynbd_cli("--fork", "-k", str(tmp_path / "g.sock"), ceph.spec("no-such-image"))
    assert bad.returncode == 2
    assert "not found" in bad.stderr


# -- the daemon: blockdev-add driver rbd over QMP -------------------------------------------


def test_daemon_blockdev_add_rbd(ceph: CephCluster, tmp_path: Path) -> None:
    name = ceph.new_image(8 * MiB)
    ceph.rbd("snap", "create", f"{ceph.pool}/{name}@s")
    qmp_path, nbd_path = str(tmp_path / "q.sock"), str(tmp_path / "n.sock")
    err = open(tmp_path / "daemon.err", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    uri = f"nbd+unix:///disk?socket={nbd_path}"

    deadline = time.monotonic() + T
    while not os.path.exists(qmp_path):
        assert proc.poll() is None, (tmp_path / "daemon.err").read_text()
        assert time.monotonic() < deadline, "no QMP socket"
        time.sleep(0.02)

    async def main() -> None:
        client = await qmp_open(qmp_path)
        try:
            rbd_args = {"driver": "rbd", "pool": ceph.pool, "image": name,
                        "conf": str(ceph.conf)}
            assert await qmp(client, "blockdev-add", {"node-name": "r", **rbd_args}) == {}
            with pytest.raises(ExecuteError, match="read-only"):
                await qmp(client, "blockdev-add", {"node-name": "s", **rbd_args,
                                                     "snapshot": "s"})
            with pytest.raises(ExecuteError, match="pool 'nope' does not exist"):
                await qmp(client, "blockdev-add", {**rbd_args, "node-name": "x",
                                                     "pool": "nope"})
            nodes = await qmp(client, "query-named-block-nodes")
            assert {"node-name": "r", "drv": "rbd"}.items() <= nodes[0].items()
            await qmp(client, "nbd-server-start",
                       {"addr": {"type": "unix", "data": {"path": nbd_path}}})
            await qmp(client, "block-export-add", {"type": "nbd", "id": "e", "node-name": "r",
                                                    "name": "disk", "writable": True})
            await asyncio.to_thread(tool, "qemu-io", "-f", "raw", uri,
                                    "-c", "write -P 0x44 0 1M", "-c", "flush")
            assert ceph.read(name, 0, MiB) == b"\x44" * MiB
            await qmp(client, "block-export-del", {"id": "e"})
            await qmp(client, "nbd-server-stop")
            # the export is gone when BLOCK_EXPORT_DELETED comes; then the node can go
            async with asyncio.timeout(T):
                while True:
                    try:
                        await client.execute("blockdev-del", {"node-name": "r"})
                        break
                    except ExecuteError:
                        await asyncio.sleep(0.05)
        finally:
            await client.disconnect()

    try:
        asyncio.run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
