"""The throttle and log filters, seen by real clients: libnbd's Python API, qemu-io,
nbdcopy, nbdinfo, and ``qemu.qmp`` driving ``pynbd daemon``.

The rate tests are the one place with timed assertions: a client with several
requests in flight drives a throttled export for 10 s (8 s for the shared
group), and the measured rate must be within 10% of the limit.  Every load is
bounded in time and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from qemu.qmp import ExecuteError
from tests.support.interop import bounded, require_tool
from tests.support.qmp import qmp, qmp_session

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.conftest import RunningServer, ServerFactory
    from tests.interop.conftest import Daemon

pytestmark = pytest.mark.interop

KiB, MiB = 1 << 10, 1 << 20
#: bound for a tool run, a QMP exchange, a daemon to start or stop
T = 30.0
#: the documented log line (docs/filters.md)
LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z id=(?P<id>\d+) cmd=(?P<cmd>[a-z-]+) "
    r"offset=(?P<offset>0x[0-9a-f]+) count=(?P<count>0x[0-9a-f]+) "
    r"flags=(?P<flags>none|[a-z+-]+) result=(?P<result>ok|cancelled|E[A-Z0-9]+) "
    r"elapsed=\d+\.\d{6}")


# -- helpers ------------------------------------------------------------------------------------


def drive(uri: str, *, write: bool, size: int, seconds: float, span: int,
          depth: int = 8) -> float:
    """Keep ``depth`` requests of ``size`` bytes in flight on ``uri`` for ``seconds``;
    the rate of completed requests per second over that time."""
    h = nbd.NBD()
    h.connect_uri(uri)
    done, errors = 0, []

    def completed(error: Any) -> int:
        nonlocal done
        done += 1
        if error.value:
            errors.append(error.value)
        return 1  # retire it

    buf = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * size))
    start = time.monotonic()
    end, issued = start + seconds, 0
    while (now := time.monotonic()) < end:
        while h.aio_in_flight() < depth:
            offset = issued * size % span
            if write:
                h.aio_pwrite(buf, offset, completion=completed)
            else:
                h.aio_pread(buf, offset, completion=completed)
            issued += 1
        h.poll(max(1, min(100, int((end - now) * 1000))))
    rate = done / (time.monotonic() - start)
    drain = time.monotonic() + T
    while h.aio_in_flight() and time.monotonic() < drain:
        h.poll(100)
    h.shutdown()
    assert not errors, errors
    return rate


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    require_tool(argv[0])
    return subprocess.run(argv, capture_output=True, text=True, timeout=T, check=False)


def multi_conn(uri: str) -> bool:
    out = run_tool("nbdinfo", uri)
    assert out.returncode == 0, out.stderr
    found = re.search(r"can_multi_conn: (true|false)", out.stdout)
    assert found is not None, out.stdout
    return found.group(1) == "true"


def log_lines(path: Path) -> list[dict[str, Any]]:
    parsed = []
    for text in path.read_text().splitlines():
        match = LINE.fullmatch(text)
        assert match is not None, f"unparseable log line: {text!r}"
        fields: dict[str, Any] = match.groupdict()
        fields["id"] = int(fields["id"])
        fields["offset"], fields["count"] = int(fields["offset"], 16), int(fields["count"], 16)
        parsed.append(fields)
    return parsed


def stop(server: RunningServer) -> None:
    assert server.stop() == 0
    assert "Traceback" not in (server.proc.stderr.read() if server.proc.stderr else "")


def refused(*args: str) -> str:
    """Run ``pynbd ARGS`` expecting a usage error: its one line."""
    done = subprocess.run([sys.executable, "-m", "pynbd", *args], capture_output=True,
                          text=True, timeout=T, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip()


# -- the limits hold, as a client measures them -------------------------------------------------


def test_an_iops_limit_holds_within_10_percent(pynbd_server: ServerFactory) -> None:
    server = pynbd_server("-e", "0", "--filter", "throttle,iops-total=200", "memory:64M")
    rate = bounded(lambda: drive(server.uri, write=False, size=4 * KiB, seconds=10.0,
                                 span=64 * MiB), timeout=10.0 + T)
    assert 180.0 <= rate <= 220.0, f"{rate:.1f} reads/s against iops-total=200"
    stop(server)


def test_a_bps_limit_holds_within_10_percent(pynbd_server: ServerFactory) -> None:
    server = pynbd_server("-e", "0", "--object", "throttle-group,id=tg0,limits.bps-total=4M",
                          "--filter", "throttle,throttle-group=tg0", "memory:64M")
    rate = bounded(lambda: drive(server.uri, write=True, size=64 * KiB, seconds=10.0,
                                 span=64 * MiB), timeout=10.0 + T)
    limit = 4 * MiB / (64 * KiB)  # 64 writes/s
    assert 0.9 * limit <= rate <= 1.1 * limit, f"{rate * 64 * KiB / MiB:.2f} MiB/s against 4M"
    stop(server)


def test_two_exports_of_one_group_share_its_limit(start: Callable[[], Daemon]) -> None:
    daemon = start()

    async def setup() -> None:
        async with qmp_session(daemon.qmp) as client:
            await qmp(client, "object-add", {"qom-type": "throttle-group", "id": "tg0",
                                             "limits": {"iops-total": 200}})
            for name in ("a", "b"):
                await qmp(client, "blockdev-add", {
                    "driver": "throttle", "node-name": f"t{name}", "throttle-group": "tg0",
                    "file": {"driver": "memory", "node-name": name, "size": 16 * MiB}})
            await qmp(client, "nbd-server-start", {"addr": {"type": "unix",
                                                            "data": {"path": daemon.sock}}})
            for name in ("a", "b"):
                await qmp(client, "block-export-add", {"type": "nbd", "id": name,
                                                       "node-name": f"t{name}", "name": name})

    asyncio.run(setup())
    rates: dict[str, float] = {}

    def load(name: str) -> None:
        rates[name] = drive(daemon.uri(name), write=False, size=4 * KiB, seconds=8.0,
                            span=16 * MiB)

    threads = [threading.Thread(target=load, args=(name,), daemon=True) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(8.0 + T)
        assert not thread.is_alive(), "a load did not stop"
    total = rates["a"] + rates["b"]
    assert 180.0 <= total <= 220.0, f"{rates} together against iops-total=200"
    for name in "ab":  # served in turn: neither export starves the other
        assert 0.35 * total <= rates[name] <= 0.65 * total, rates


# -- multi-conn over filters --------------------------------------------------------------------


def test_multi_conn_is_still_advertised_over_throttle_and_log(
        pynbd_server: ServerFactory, tmp_path: Path) -> None:
    throttled = pynbd_server("-e", "0", "--filter", "throttle,bps-total=100M", "memory:1M")
    assert multi_conn(throttled.uri)
    logged = pynbd_server("-e", "0", "--filter", f"log,logfile={tmp_path / 'l.log'}",
                          "--filter", "throttle,iops-total=1000", "memory:1M")
    assert multi_conn(logged.uri)
    alone = pynbd_server("-e", "1", "--filter", "throttle,iops-total=1000", "memory:1M")
    assert not multi_conn(alone.uri)  # one client only: nothing to promise


# -- the log: one line per request --------------------------------------------------------------


def test_the_log_has_one_line_per_qemu_io_request(pynbd_server: ServerFactory,
                                                  tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    server = pynbd_server("-e", "0", "--filter", "throttle,iops-total=10000", "--filter",
                          f"log,logfile={log}", "memory:8M")
    done = run_tool("qemu-io", "-f", "raw", server.uri, "-c", "write -P 0xab 4096 64k",
                    "-c", "read -P 0xab 4096 64k", "-c", "write -z 1M 128k",
                    "-c", "write -z -u 2M 64k", "-c", "discard 3M 64k", "-c", "flush",
                    "-c", "read -P 0 1M 128k")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stdout, done.stdout
    stop(server)  # the last lines reach the file when the node closes
    lines = log_lines(log)
    assert [line["id"] for line in lines] == list(range(1, len(lines) + 1))
    assert all(line["result"] == "ok" for line in lines)
    requests = [(line["cmd"], line["offset"], line["count"]) for line in lines
                if line["cmd"] != "flush"]
    assert requests == [("write", 4096, 64 * KiB), ("read", 4096, 64 * KiB),
                        ("zero", MiB, 128 * KiB), ("zero", 2 * MiB, 64 * KiB),
                        ("trim", 3 * MiB, 64 * KiB), ("read", MiB, 128 * KiB)]
    flags = [line["flags"] for line in lines if line["cmd"] in ("write", "zero")]
    assert flags == ["fua", "fua", "fua+may-trim"]  # qemu-io writes through; -u may unmap
    assert sum(line["cmd"] == "flush" for line in lines) >= 1


def test_the_log_of_an_nbdcopy_covers_the_image_once(pynbd_server: ServerFactory,
                                                     tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    with open(source, "wb") as out:
        out.truncate(8 * MiB)
        for start, length in ((0, MiB), (5 * MiB, 512 * KiB)):
            out.seek(start)
            out.write(bytes([start // MiB + 1]) * length)
    log = tmp_path / "copy.log"
    server = pynbd_server("-e", "0", "--filter", f"log,logfile={log},logappend=on",
                          "memory:8M")
    done = run_tool("nbdcopy", str(source), server.uri)
    assert done.returncode == 0, done.stderr
    back = tmp_path / "back.img"
    assert run_tool("nbdcopy", server.uri, str(back)).returncode == 0
    assert back.read_bytes() == source.read_bytes()
    stop(server)
    lines = log_lines(log)
    assert [line["id"] for line in lines] == list(range(1, len(lines) + 1))
    written = sorted((line["offset"], line["count"]) for line in lines
                     if line["cmd"] in ("write", "zero"))
    pos = 0
    for offset, count in written:  # the copy wrote every byte exactly once
        assert offset == pos, written
        pos += count
    assert pos == 8 * MiB
    data = sum(line["count"] for line in lines if line["cmd"] == "write")
    assert data >= MiB + 512 * KiB
    reads = [line for line in lines if line["cmd"] == "read"]
    assert sum(line["count"] for line in reads) >= MiB + 512 * KiB


def test_append_keeps_what_the_file_had(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("earlier line\n")
    server = pynbd_server("-e", "0", "--filter", f"log,logfile={log},logappend=on",
                          "memory:1M")
    assert run_tool("qemu-io", "-f", "raw", server.uri, "-c", "read 0 512").returncode == 0
    stop(server)
    assert log.read_text().startswith("earlier line\n")
    assert "cmd=read offset=0x0 count=0x200" in log.read_text()


# -- the daemon: its command-line forms, QMP, qemu's words ---------------------------------------


@contextlib.contextmanager
def daemon_with(tmp_path: Path, *options: str) -> Iterator[tuple[str, str]]:
    """``pynbd daemon --qmp ... OPTIONS`` running: (QMP socket, NBD socket)."""
    qmp_path, sock, pid = tmp_path / "dq.sock", tmp_path / "dn.sock", tmp_path / "d.pid"
    err = open(tmp_path / "d.err", "wb")  # noqa: SIM115 - the daemon's
    proc = subprocess.Popen(
        [sys.executable, "-m", "pynbd", "daemon", "--qmp", str(qmp_path), "--pid-file",
         str(pid), "--nbd-server", f"addr.type=unix,addr.path={sock}", *options],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    err.close()
    try:
        deadline = time.monotonic() + T
        while not pid.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"daemon did not start: {(tmp_path / 'd.err').read_text()}")
            time.sleep(0.02)
        yield str(qmp_path), str(sock)
        assert proc.wait(T) == 0
        assert "Traceback" not in (tmp_path / "d.err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_daemon_command_line_forms_and_qmp(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    with daemon_with(tmp_path, "--object", "throttle-group,id=tg0,limits.iops-total=1000",
                     "--object", "throttle-group,id=tg1,x-bps-total=1M,x-bps-total-max=2M",
                     "--blockdev", "driver=memory,node-name=m,size=4M",
                     "--blockdev", "driver=throttle,node-name=t,throttle-group=tg0,file=m",
                     "--blockdev", f"driver=log,node-name=l,file=t,logfile={log},"
                     "logappend=off",
                     "--export", "type=nbd,id=e,node-name=l,name=disk,writable=on"
                     ) as (qmp_path, sock):
        uri = f"nbd+unix:///disk?socket={sock}"
        assert multi_conn(uri)
        done = run_tool("qemu-io", "-f", "raw", uri, "-c", "write -P 7 0 4k",
                        "-c", "read -P 7 0 4k")
        assert done.returncode == 0, done.stderr
        assert "failed" not in done.stdout, done.stdout

        async def session() -> None:
            async with qmp_session(qmp_path) as client:
                nodes = {n["node-name"]: n["drv"]
                         for n in await qmp(client, "query-named-block-nodes")}
                assert nodes["t"] == "throttle"
                assert nodes["l"] == "log"
                limits = await qmp(client, "qom-get", {"path": "tg1", "property": "limits"})
                assert (limits["bps-total"], limits["bps-total-max"]) == (MiB, 2 * MiB)
                await qmp(client, "qom-set", {"path": "/objects/tg0", "property": "limits",
                                              "value": {"iops-total": 500}})
                assert (await qmp(client, "qom-get", {"path": "tg0", "property": "limits"})
                        )["iops-total"] == 500
                refusals: list[tuple[str, dict[str, Any], str]] = [
                        ("object-del", {"id": "tg0"},
                         "object 'tg0' is in use, can not be deleted"),
                        ("object-add", {"qom-type": "throttle-group", "id": "bad",
                                        "limits": {"bps-total": -4}},
                         "bps/iops/max values must be within [0, 1000000000000000]"),
                        ("object-add", {"qom-type": "throttle-group", "id": "bad",
                                        "limits": {"iops-total": 100, "iops-total-max": 99}},
                         "bps_max/iops_max cannot be lower than bps/iops"),
                        ("object-add", {"qom-type": "throttle-group", "id": "bad",
                                        "limits": {"iops-totals": 1}},
                         "Parameter 'limits.iops-totals' is unexpected"),
                        ("blockdev-add", {"driver": "throttle", "node-name": "u",
                                          "throttle-group": "tg9", "file": "m"},
                         "Throttle group 'tg9' does not exist"),
                        ("blockdev-add", {"driver": "log", "node-name": "u", "file": "m"},
                         "Parameter 'logfile' is missing")]
                for command, args, message in refusals:
                    with pytest.raises(ExecuteError) as info:
                        await qmp(client, command, args)
                    assert info.value.error_class == "GenericError"
                    assert str(info.value) == message
                await qmp(client, "object-del", {"id": "tg1"})  # unused: goes
                await qmp(client, "quit")

        asyncio.run(session())
    cmds = [(line["cmd"], line["offset"], line["count"]) for line in log_lines(log)
            if line["cmd"] != "flush"]
    # nbdinfo's probe read, then qemu-io's requests
    assert [cmd for cmd, _, _ in cmds[:-2]] == ["read"] * (len(cmds) - 2)
    assert cmds[-2:] == [("write", 0, 4 * KiB), ("read", 0, 4 * KiB)]


# -- bad values: one line, status 2 ------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--filter", "throttle,iops-total=-5"],
     "pynbd: --filter throttle,iops-total=-5: bps/iops/max values must be within "
     "[0, 1000000000000000]"),
    (["--filter", "throttle,iops-totl=5"],
     "pynbd: --filter throttle,iops-totl=5: Parameter 'iops-totl' is unexpected"),
    (["--filter", "throttle,throttle-group=tg9"],
     "pynbd: --filter throttle,throttle-group=tg9: Throttle group 'tg9' does not exist"),
    (["--object", "throttle-group,id=tg0,limits.bps-total=100,limits.bps-total-max=50",
      "--filter", "throttle,throttle-group=tg0"],
     "pynbd: --object throttle-group,id=tg0: bps_max/iops_max cannot be lower than "
     "bps/iops"),
    (["--object", "throttle-group,id=tg0,x-iops-total=-1"],
     "pynbd: --object throttle-group,id=tg0: Property values cannot be negative"),
    (["--filter", "log"], "pynbd: --filter log: Parameter 'logfile' is missing"),
    (["--filter", "gzip"],
     "pynbd: --filter gzip: unknown filter 'gzip' (expected throttle or log)"),
    (["--filter", "log,logfile=/nonexistent/dir/x.log"],
     "pynbd: --filter log,logfile=/nonexistent/dir/x.log: Could not open "
     "'/nonexistent/dir/x.log': No such file or directory"),
])
def test_bad_filters_are_one_line_and_status_2(args: list[str], message: str,
                                               tmp_path: Path) -> None:
    assert refused(*args, "-k", str(tmp_path / "s.sock"), "memory:1M") == message


def test_bad_daemon_options_are_one_line_and_status_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pynbd", "daemon", "--object",
         "throttle-group,id=tg0,limits.iops-total=5,limits.iops-read=5",
         "--qmp", str(tmp_path / "q.sock")],
        capture_output=True, text=True, timeout=T, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "pynbd daemon: --object throttle-group,id=tg0,limits.iops-total=5,"
        "limits.iops-read=5: bps/iops/max total values and read/write values cannot be "
        "used at the same time")
