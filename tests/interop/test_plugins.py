"""Storage plugins served by a real pynbd, seen by real clients.

- ``pattern`` (built in): nbdinfo, libnbd reads at random offsets, nbdcopy to a
  file, qemu-img compare against the pattern written out.
- ``http`` (built in) over a local range server: the same clients, and the
  connection pool (never more connections than ``connections``).
- The complete plugin of ``docs/plugins.md``, served and written with qemu-io.
- ``DictDisk`` (the unit tests' async writable plugin, from a file): multi-conn
  advertised and kept, by ``pynbd check --write`` and by libnbd's write on one
  connection, flush on another, read on a third; qemu-io writes.
- The daemon: ``blockdev-add`` with driver ``python`` and the ``--blockdev``
  keyval form; bad plugins answered with GenericError while other exports serve.
- An installed plugin (a module and a ``NAME-1.0.dist-info`` with an entry point,
  found through ``PYTHONPATH`` by importlib.metadata in the server process):
  its name works in ``plugin:NAME`` and as a ``blockdev-add`` driver.
- Bad plugins at start (one line, exit 2) and bad requests (EIO or the plugin's
  errno, a timeout, the first bug logged once), the server serving on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any

import nbd
import pytest
from qemu.qmp import ExecuteError
from tests.support.interop import bounded, require_tool
from tests.support.qmp import qmp, qmp_session
from tests.unit.block.test_plugin import DictDisk, doc_example

from pynbd.plugins.pattern import pattern_bytes
from pynbd.testing.httpserver import RangeServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.conftest import RunningServer, ServerFactory
    from tests.interop.conftest import Daemon

pytestmark = pytest.mark.interop

MiB = 1 << 20
#: bound for one tool run, one libnbd call
T = 60.0
#: bound for a server process to start or stop
START = 20.0


def tool(*args: str, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client tool, bounded; with ``check`` it must exit 0."""
    require_tool(args[0])
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=T, env=env,
                          check=False)
    if check and proc.returncode:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def pynbd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``pynbd ARGS`` that is expected to exit by itself (bounded)."""
    return subprocess.run([sys.executable, "-m", "pynbd", *args], capture_output=True,
                          text=True, timeout=T, env=env, check=False)


@contextlib.contextmanager
def connect(uri: str) -> Iterator[Any]:
    h = nbd.NBD()
    bounded(h.connect_uri, uri, timeout=T)
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):
            bounded(h.shutdown, timeout=T)


def info(uri: str) -> dict[str, Any]:
    export: dict[str, Any] = json.loads(tool("nbdinfo", "--json", uri).stdout)["exports"][0]
    return export


def random_reads(uri: str, want: bytes, count: int = 200) -> None:
    """libnbd reads at random offsets and lengths match ``want``."""
    rng = random.Random(len(want))
    with connect(uri) as h:
        for _ in range(count):
            offset = rng.randrange(len(want))
            length = rng.randint(1, min(len(want) - offset, 300_000))
            got = bounded(h.pread, length, offset, timeout=T)
            assert got == want[offset:offset + length], f"read of {length} at {offset}"


def copies_and_compares(uri: str, want: bytes, tmp_path: Path) -> None:
    """nbdcopy to a file holds ``want``; qemu-img compare agrees with a reference file."""
    copy, reference = tmp_path / "copy.img", tmp_path / "reference.img"
    tool("nbdcopy", uri, str(copy))
    assert copy.read_bytes() == want
    reference.write_bytes(want)
    tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(reference), uri)
    copy.unlink()
    reference.unlink()


def plugin_file(tmp_path: Path, cls: type) -> str:
    """A plugin file holding the source of ``cls`` (a class of the unit tests)."""
    path = tmp_path / f"{cls.__name__.lower()}.py"
    path.write_text("from __future__ import annotations\n\nimport asyncio\nfrom typing import "
                    "Iterator\n\nfrom pynbd.plugins import DATA, HOLE, ZERO, parse_size\n\n\n"
                    + textwrap.dedent(inspect.getsource(cls)))
    return str(path)


# -- the built-in plugins ----------------------------------------------------------------

def test_pattern_with_every_client(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    size = 8 * MiB + 4096
    srv = pynbd_server("-e", "0", f"plugin:pattern:size={size}")
    export = info(srv.uri)
    assert export["export-size"] == size
    assert export["is_read_only"] is True  # no write(): read-only without -r
    assert export["can_multi_conn"] is True  # nothing to keep consistent
    want = pattern_bytes(0, size)
    random_reads(srv.uri, want)
    copies_and_compares(srv.uri, want, tmp_path)
    with connect(srv.uri) as h:
        assert h.pread(8, 0x123458) == (0x123458).to_bytes(8, "big")


@pytest.fixture
def www(tmp_path: Path) -> Iterator[RangeServer]:
    root = tmp_path / "www"
    root.mkdir()
    with RangeServer(root) as server:
        yield server


def test_http_with_every_client(pynbd_server: ServerFactory, www: RangeServer,
                                tmp_path: Path) -> None:
    want = random.Random(7).randbytes(8 * MiB + 123)
    (tmp_path / "www" / "disk.img").write_bytes(want)
    srv = pynbd_server("-e", "0", f"plugin:http:url={www.url('disk.img')}:connections=2")
    assert info(srv.uri)["export-size"] == len(want)
    random_reads(srv.uri, want)
    copies_and_compares(srv.uri, want, tmp_path)
    # libnbd, nbdcopy and qemu-img sent many requests at once: the pool kept two
    # connections alive (HEAD's included) and reused them
    assert www.connections <= 2
    assert www.ranges > 200


def test_qcow2_over_http(pynbd_server: ServerFactory, www: RangeServer,
                         tmp_path: Path) -> None:
    """A qcow2 image on a web server, read through the http plugin with -f qcow2."""
    image = tmp_path / "www" / "disk.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M")
    tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0x17 3M 1k",
         str(image))
    srv = pynbd_server("-e", "0", "-f", "qcow2", f"plugin:http:url={www.url('disk.qcow2')}")
    assert info(srv.uri)["export-size"] == 4 * MiB
    tool("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), srv.uri)


def test_http_errors_at_start(www: RangeServer) -> None:
    proc = pynbd("-k", "x.sock", f"plugin:http:url={www.url('missing.img')}")
    assert proc.returncode == 2
    assert proc.stderr == (f"pynbd: Could not open plugin 'http': {www.url('missing.img')}: "
                           "HEAD answered 404\n")


# -- a writable plugin: multi-conn ----------------------------------------------------------

def test_dict_disk_keeps_the_multi_conn_promise(pynbd_server: ServerFactory,
                                                tmp_path: Path) -> None:
    path = plugin_file(tmp_path, DictDisk)
    srv = pynbd_server("-e", "0", f"plugin:{path}:DictDisk:size=64M")
    export = info(srv.uri)
    assert export["can_multi_conn"] is True
    assert export["is_read_only"] is False
    # qemu's nbd-multiconn test: write on A, flush on B, read on C
    with connect(srv.uri) as a, connect(srv.uri) as b, connect(srv.uri) as c:
        a.pwrite(b"\x55" * MiB, 3 * MiB)
        b.flush()
        assert c.pread(MiB, 3 * MiB) == b"\x55" * MiB
    tool("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 64k", "-c", "write -z 1M 4k",
         srv.uri)
    out = tool("qemu-io", "-f", "raw", "-c", "read -P 0 1M 4k", "-c",
               "read -P 0xab 1052672 61440", srv.uri).stdout
    assert "Pattern verification failed" not in out
    check = pynbd("check", srv.uri, "--write", "--seconds", "3", "--connections", "4",
                  "--region", "8M", "--seed", "1")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "PASS" in check.stdout


def test_the_documented_plugin(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    """docs/plugins.md's complete plugin, served as its walkthrough serves it."""
    (tmp_path / "filedisk.py").write_text(doc_example())
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * MiB))
    srv = pynbd_server("-e", "0", f"plugin:{tmp_path / 'filedisk.py'}:path={disk}")
    export = info(srv.uri)
    assert (export["can_multi_conn"], export["can_flush"], export["is_read_only"]) == (
        True, True, False)
    out = tool("qemu-io", "-f", "raw", srv.uri, "-c", "write -P 0xab 0 1M", "-c",
               "read -P 0xab 0 1M").stdout
    assert "Pattern verification failed" not in out
    assert disk.read_bytes()[:MiB + 1] == b"\xab" * MiB + b"\0"


# -- the daemon ------------------------------------------------------------------------

def test_daemon_blockdev_add(start: Callable[[], Daemon], tmp_path: Path) -> None:
    """blockdev-add: driver python (a file), a built-in's own driver name; bad plugins
    are a GenericError each, and the exports that work keep working."""
    daemon = start()
    path = plugin_file(tmp_path, DictDisk)
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_abc\n")
    raising = tmp_path / "raising.py"
    raising.write_text("class R:\n    def __init__(self):\n        raise RuntimeError('nope')\n"
                       "    def size(self): return 1\n    def read(self, o, n): return b''\n")

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await qmp(client, "nbd-server-start", {"addr": {"type": "unix",
                                                            "data": {"path": daemon.sock}}})
            await qmp(client, "blockdev-add", {"driver": "python", "node-name": "d",
                                               "plugin": f"{path}:DictDisk",
                                               "options": {"size": "4M"}})
            await qmp(client, "blockdev-add", {"driver": "pattern", "node-name": "p",
                                               "read-only": True, "options": {"size": "1M"}})
            for node, writable in (("d", True), ("p", False)):
                await qmp(client, "block-export-add", {"type": "nbd", "id": node,
                                                       "node-name": node, "name": node,
                                                       "writable": writable})
            tool("qemu-io", "-f", "raw", "-c", "write -P 0x12 0 64k", daemon.uri("d"))
            tool("qemu-io", "-f", "raw", "-c", "read -P 0x12 0 64k", daemon.uri("d"))
            nodes = {n["node-name"]: n for n in await qmp(client, "query-named-block-nodes")}
            assert (nodes["d"]["drv"], nodes["d"]["file"]) == ("python", path)
            assert nodes["p"]["drv"] == "pattern"
            cases: list[tuple[dict[str, Any], str]] = [
                ({"driver": "nope"}, "Parameter 'driver' does not accept value 'nope'"),
                ({"driver": "python", "plugin": str(broken)},
                 f"Could not load plugin '{broken}': ModuleNotFoundError: No module named "
                 "'no_such_module_abc'"),
                ({"driver": "python", "plugin": f"{path}:Nope"},
                 f"Plugin '{path}' has no class 'Nope'"),
                ({"driver": "python", "plugin": str(raising)},
                 f"Could not open plugin '{raising}': plugin __init__() failed: "
                 "RuntimeError: nope"),
                ({"driver": "pattern", "options": {"size": 1}},
                 "Invalid parameter type for 'options.size', expected: string"),
                ({"driver": "pattern", "options": {"sise": "1"}},
                 "Plugin 'pattern' has no option 'sise' (its options: size)"),
            ]
            for args, message in cases:
                with pytest.raises(ExecuteError) as err:
                    await qmp(client, "blockdev-add", {"node-name": "bad", **args})
                assert err.value.error_class == "GenericError"
                assert str(err.value) == message
            with connect(daemon.uri("p")) as h:
                assert h.pread(8, 64) == (64).to_bytes(8, "big")
    asyncio.run(main())


def launch_daemon(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                  ) -> subprocess.Popen[bytes]:
    """``pynbd daemon ARGS --pid-file``, started (its pid file written) or failed."""
    pid = tmp_path / "daemon.pid"
    err = open(tmp_path / "daemon.err", "wb")  # noqa: SIM115 - the daemon's
    proc = subprocess.Popen([sys.executable, "-m", "pynbd", "daemon", *args,
                             "--pid-file", str(pid)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err, env=env)
    err.close()
    deadline = time.monotonic() + START
    while not pid.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"daemon did not start: {(tmp_path / 'daemon.err').read_text()}")
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(START)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_daemon_blockdev_keyval(tmp_path: Path) -> None:
    sock = str(tmp_path / "n.sock")
    proc = launch_daemon(
        tmp_path, "--blockdev", "driver=python,node-name=p,plugin=pattern,options.size=2M,"
        "timeout=5", "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=p,name=p")
    try:
        uri = f"nbd+unix:///p?socket={sock}"
        assert info(uri)["export-size"] == 2 * MiB
        random_reads(uri, pattern_bytes(0, 2 * MiB), 50)
    finally:
        stop(proc)
    bad = pynbd("daemon", "--blockdev", "driver=python,node-name=p,plugin=pattern",
                "--export", "type=nbd,id=e,node-name=p")
    assert bad.returncode == 2
    assert bad.stderr == ("pynbd daemon: --blockdev driver=python,node-name=p,plugin=pattern: "
                          "Plugin 'pattern' needs option 'size'\n")


# -- an installed plugin: entry points -------------------------------------------------

EDISK = '''
from __future__ import annotations

from pynbd.plugins import parse_size


class EDisk:
    """Every byte holds the low byte of its offset's 4 KiB block number."""

    def __init__(self, size: str) -> None:
        self._size = parse_size(size)

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return bytes((pos >> 12) & 0xFF for pos in range(offset, offset + length))
'''


def edisk_bytes(size: int) -> bytes:
    return bytes((pos >> 12) & 0xFF for pos in range(size))


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A package installed in a directory on PYTHONPATH: a module and its dist-info
    with an entry point in pynbd.plugins (as pip leaves them).  Every process started
    here sees it; the test process itself does not."""
    site = tmp_path / "site"
    info_dir = site / "edisk-1.0.dist-info"
    info_dir.mkdir(parents=True)
    (site / "edisk.py").write_text(EDISK)
    (info_dir / "METADATA").write_text("Metadata-Version: 2.1\nName: edisk\nVersion: 1.0\n")
    (info_dir / "entry_points.txt").write_text("[pynbd.plugins]\nedisk = edisk:EDisk\n")
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(site) + (os.pathsep + path if path else ""))
    return dict(os.environ)


def test_an_installed_plugin_is_a_driver(installed: dict[str, str],
                                         pynbd_server: ServerFactory,
                                         start: Callable[[], Daemon]) -> None:
    size = 256 * 1024 + 3
    srv = pynbd_server("-e", "0", f"plugin:edisk:size={size}")
    assert info(srv.uri)["export-size"] == size
    random_reads(srv.uri, edisk_bytes(size), 30)
    daemon = start()

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await qmp(client, "nbd-server-start", {"addr": {"type": "unix",
                                                            "data": {"path": daemon.sock}}})
            await qmp(client, "blockdev-add", {"driver": "edisk", "node-name": "e",
                                               "options": {"size": "64k"}})
            await qmp(client, "block-export-add", {"type": "nbd", "id": "e",
                                                   "node-name": "e", "name": "e"})
            nodes = await qmp(client, "query-named-block-nodes")
            assert [n["drv"] for n in nodes if n["node-name"] == "e"] == ["edisk"]
    asyncio.run(main())
    random_reads(daemon.uri("e"), edisk_bytes(64 * 1024), 30)


def test_an_uninstalled_plugin_is_unknown(start: Callable[[], Daemon]) -> None:
    proc = pynbd("-k", "x.sock", "plugin:edisk:size=1M")
    assert proc.returncode == 2
    assert proc.stderr == ("pynbd: Unknown plugin 'edisk': not a file, an installed plugin "
                           "(entry point group pynbd.plugins) or an importable module\n")
    daemon = start()

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            with pytest.raises(ExecuteError) as err:
                await qmp(client, "blockdev-add", {"driver": "edisk", "node-name": "e"})
            assert str(err.value) == "Parameter 'driver' does not accept value 'edisk'"
    asyncio.run(main())


# -- bad plugins ---------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "spec", "message"), [
    ("import no_such_module_abc\n", "{p}",
     "Could not load plugin '{p}': ModuleNotFoundError: No module named 'no_such_module_abc'"),
    ("class A:\n    def size(self): return 1\n    def read(self, o, n): return b''\n",
     "{p}:B", "Plugin '{p}' has no class 'B'"),
    ("class A:\n    def size(self): return 1\n", "{p}:A", "Plugin class '*.A' has no read() "
     "method"),
    ("class A:\n    def read(self, o, n): return b''\n", "{p}:A", "Plugin class '*.A' has no "
     "size() method"),
    ("class A:\n    def __init__(self): raise ValueError('no disk here')\n"
     "    def size(self): return 1\n    def read(self, o, n): return b''\n", "{p}",
     "Could not open plugin '{p}': plugin __init__() failed: ValueError: no disk here"),
    ("class A:\n    def size(self): return 1\n    def read(self, o, n): return b''\n",
     "{p}:x=1", "Plugin '{p}' has no option 'x' (its options: none)"),
    (None, "{p}", "Could not open plugin '{p}': No such file or directory"),
])
def test_bad_plugins_at_start(tmp_path: Path, source: str | None, spec: str,
                              message: str) -> None:
    path = tmp_path / "bad.py"
    if source is not None:
        path.write_text(source)
    proc = pynbd("-k", str(tmp_path / "s.sock"), "plugin:" + spec.format(p=path))
    assert proc.returncode == 2
    head, _, tail = f"pynbd: {message.format(p=path)}\n".partition("*")
    assert proc.stderr.startswith(head), proc.stderr
    assert proc.stderr.endswith(tail), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "s.sock").exists()


FLAKY = '''
from __future__ import annotations

import asyncio
import errno


class Flaky:
    """Reads at 0 fail with a bug, at 4096 with ENOSPC, at 8192 never return."""

    def size(self) -> int:
        return 1 << 20

    async def read(self, offset: int, length: int) -> bytes:
        if offset == 0:
            raise ZeroDivisionError("a bug")
        if offset == 4096:
            raise OSError(errno.ENOSPC, "out of space")
        if offset == 8192:
            await asyncio.sleep(3600)
        return b"\\x07" * length
'''


def test_bad_requests_fail_alone(tmp_path: Path, pynbd_server: ServerFactory) -> None:
    """A bug is EIO (its traceback logged once), an OSError its errno, a request past
    the timeout EIO; the connection and the server go on."""
    path = tmp_path / "flaky.py"
    path.write_text(FLAKY)
    srv = pynbd_server("-e", "0", f"plugin:{path}:timeout=1")
    with connect(srv.uri) as h:
        for _ in range(3):
            with pytest.raises(nbd.Error) as err:
                bounded(h.pread, 512, 0, timeout=T)
            assert err.value.errno == "EIO"
        with pytest.raises(nbd.Error) as err:
            bounded(h.pread, 512, 4096, timeout=T)
        assert err.value.errno == "ENOSPC"
        began = time.monotonic()
        with pytest.raises(nbd.Error) as err:
            bounded(h.pread, 512, 8192, timeout=T)
        assert err.value.errno == "EIO"
        assert time.monotonic() - began >= 0.9
        assert bounded(h.pread, 512, 12288, timeout=T) == b"\x07" * 512
    assert srv.stop() == 0
    log = stderr_of(srv)
    assert log.count("Traceback") == 1, log
    assert "ZeroDivisionError: a bug" in log


def test_a_hung_plugin_leaves_other_exports_alone(start: Callable[[], Daemon],
                                                  tmp_path: Path) -> None:
    daemon = start()
    path = tmp_path / "flaky.py"
    path.write_text(FLAKY)

    async def main() -> None:
        async with qmp_session(daemon.qmp) as client:
            await qmp(client, "nbd-server-start", {"addr": {"type": "unix",
                                                            "data": {"path": daemon.sock}}})
            await qmp(client, "blockdev-add", {"driver": "python", "node-name": "f",
                                               "plugin": str(path), "timeout": 3})
            await qmp(client, "blockdev-add", {"driver": "pattern", "node-name": "p",
                                               "options": {"size": "1M"}})
            for node in ("f", "p"):
                await qmp(client, "block-export-add", {"type": "nbd", "id": node,
                                                       "node-name": node, "name": node})
    asyncio.run(main())
    with connect(daemon.uri("f")) as hung, connect(daemon.uri("p")) as other:
        buf = nbd.Buffer(512)
        cookie = hung.aio_pread(buf, 8192)
        began = time.monotonic()
        for i in range(20):  # meanwhile the other export, and the same one, serve
            assert bounded(other.pread, 8, i * 8, timeout=T) == (i * 8).to_bytes(8, "big")
        assert bounded(hung.pread, 8, 16384, timeout=T) == b"\x07" * 8
        codes: list[str] = []
        assert not _done(hung, cookie, codes), "served only after the hung request ended"
        while not _done(hung, cookie, codes):
            bounded(hung.poll, 1, timeout=T)
            assert time.monotonic() - began < T
        assert codes == ["EIO"]  # the timeout's
        assert time.monotonic() - began >= 2.9
        assert bounded(other.pread, 8, 0, timeout=T) == bytes(8)


def _done(h: Any, cookie: int, codes: list[str]) -> bool:
    """Whether the command finished (its error's errno appended to ``codes``)."""
    try:
        return bool(h.aio_command_completed(cookie))
    except nbd.Error as err:
        codes.append(err.errno)
        return True


def stderr_of(srv: RunningServer) -> str:
    assert srv.proc.stderr is not None
    return srv.proc.stderr.read()
