"""Storage plugins as nodes (``pynbd.block.plugin``, ``pynbd.block.pluginload``).

The plugin contract (``pynbd.testing.plugin_contract``) runs on both plugins that
ship with pynbd (``pattern``; ``http`` against a local range server), on the
complete plugin of ``docs/plugins.md``, and on two test plugins: ``DictDisk``
(async, writable, every optional method; the interop tests serve it too) and
``PlainDisk`` (plain methods in threads, no zero/trim/block_status: pynbd
writes the zeroes).  Then the adapter's rules one by one: capabilities from
what a class defines, threads and concurrency, the timeout, errors and their
logging, and every way loading or opening a plugin fails, each as one line.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import pathlib
import random
import textwrap
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from tests.unit.block.support import outcome, pattern, read, run

from pynbd.block.blockdev import BlockdevError, build
from pynbd.block.cachemode import NoFlushFilter
from pynbd.block.graph import BlockGraph
from pynbd.block.node import FastZeroUnsupported
from pynbd.block.plugin import PluginNode, open_class, open_plugin
from pynbd.block.pluginload import PluginError, cli_options, load_plugin, plugin_drivers
from pynbd.plugins import DATA, HOLE, ZERO, parse_size
from pynbd.plugins.http import HttpDisk
from pynbd.plugins.pattern import PatternDisk, pattern_bytes
from pynbd.testing.httpserver import RangeServer
from pynbd.testing.plugin_contract import PluginContract

if TYPE_CHECKING:
    from collections.abc import Iterator


class DictDisk:
    """An async in-memory disk: 4 KiB blocks in a dict, absent blocks read as zeroes."""

    multi_conn = True
    BLOCK = 4096

    def __init__(self, size: str) -> None:
        self._size = parse_size(size)
        self._blocks: dict[int, bytearray] = {}

    async def size(self) -> int:
        return self._size

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(block, start in block, start in range, length) over the range."""
        pos, end = offset, offset + length
        while pos < end:
            index, start = divmod(pos, self.BLOCK)
            take = min(self.BLOCK - start, end - pos)
            yield index, start, pos - offset, take
            pos += take

    async def read(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0)  # let other requests in, as real I/O would
        out = bytearray(length)
        for index, start, at, take in self._pieces(offset, length):
            block = self._blocks.get(index)
            if block is not None:
                out[at:at + take] = block[start:start + take]
        return bytes(out)

    async def write(self, offset: int, data: bytes) -> None:
        await asyncio.sleep(0)
        for index, start, at, take in self._pieces(offset, len(data)):
            block = self._blocks.setdefault(index, bytearray(self.BLOCK))
            block[start:start + take] = data[at:at + take]

    async def zero(self, offset: int, length: int, may_trim: bool) -> None:
        await asyncio.sleep(0)
        for index, start, _, take in self._pieces(offset, length):
            if take == self.BLOCK and may_trim:
                self._blocks.pop(index, None)
            elif index in self._blocks:
                self._blocks[index][start:start + take] = bytes(take)

    async def trim(self, offset: int, length: int) -> None:
        for index, _, _, take in self._pieces(offset, length):
            if take == self.BLOCK:
                self._blocks.pop(index, None)

    async def flush(self) -> None:
        await asyncio.sleep(0)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for index, _, _, take in self._pieces(offset, min(length, 1 << 24)):
            flags = DATA if index in self._blocks else HOLE | ZERO
            if runs and runs[-1][1] == flags:
                runs[-1] = (runs[-1][0] + take, flags)
            else:
                runs.append((take, flags))
        return runs


class PlainDisk:
    """Plain (blocking) methods on a bytearray; nothing optional but write and flush."""

    serialize = True

    def __init__(self, size: str) -> None:
        self._data = bytearray(int(size))

    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self._data[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass


# -- the contract, on every plugin here ------------------------------------------------

class TestDictDisk(PluginContract):
    plugin = DictDisk


class TestPlainDisk(PluginContract):
    plugin = PlainDisk


class TestPatternDisk(PluginContract):
    plugin = PatternDisk

    def expected(self, size: int) -> bytes:
        return pattern_bytes(0, size)


def _http_contents(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.fixture(scope="module")
def range_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeServer]:
    with RangeServer(tmp_path_factory.mktemp("www")) as server:
        yield server


class TestHttpDisk(PluginContract):
    plugin = HttpDisk
    size_option = None
    server: RangeServer

    @pytest.fixture(autouse=True)
    def _server(self, range_server: RangeServer) -> None:
        self.server = range_server

    def plugin_options(self, tmp_path: pathlib.Path, size: int) -> dict[str, str]:
        path = pathlib.Path(self.server.root) / f"disk-{size}.img"
        if not path.exists():
            path.write_bytes(_http_contents(size))
        return {"url": self.server.url(path.name), "connections": "3"}

    def expected(self, size: int) -> bytes:
        return _http_contents(size)


DOCS = pathlib.Path(__file__).resolve().parents[3] / "docs" / "plugins.md"


def doc_example() -> str:
    """The complete plugin of docs/plugins.md: the first python block of its section."""
    text = DOCS.read_text()
    section = text[text.index("## A complete plugin"):]
    return section[section.index("```python\n") + 10:section.index("\n```\n")]


def _doc_plugin() -> type:
    namespace: dict[str, Any] = {"__name__": "plugins_md"}
    exec(compile(doc_example(), str(DOCS), "exec"), namespace)
    cls: type = namespace["FileDisk"]
    return cls


class TestDocExample(PluginContract):
    """docs/plugins.md's complete plugin keeps the contract (served in the interop
    tests)."""

    plugin = _doc_plugin()

    def plugin_options(self, tmp_path: pathlib.Path, size: int) -> dict[str, str]:
        image = tmp_path / f"disk-{size}-{random.getrandbits(32)}.img"
        image.write_bytes(bytes(size))
        return {"path": str(image)}


def test_a_broken_plugin_fails_the_contract() -> None:
    """The contract can fail: a plugin whose reads come from the wrong offset, and one
    whose writes do not stick, are caught."""

    class Shifted(PatternDisk):
        def read(self, offset: int, length: int) -> bytes:
            return pattern_bytes(offset + 1, length)

    class Forgetful(DictDisk):
        async def write(self, offset: int, data: bytes) -> None:
            await super().write(offset, data[:-1])

    class ShiftedContract(TestPatternDisk):
        plugin = Shifted

    class ForgetfulContract(TestDictDisk):
        plugin = Forgetful

    for contract, name in ((ShiftedContract(), "test_reads_agree"),
                           (ForgetfulContract(), "test_roundtrip")):
        from pynbd.testing.support import LAYERS, shared_loop

        with shared_loop():
            stack = contract.make_stack(pathlib.Path("/nonexistent"), contract.size, LAYERS[0])
            test = getattr(contract, name)
            args = (stack, "aligned", 0, 4096) if name == "test_roundtrip" else (stack,)
            try:
                with pytest.raises(AssertionError):
                    test(*args)
            finally:
                run(stack.top.close())


# -- capabilities from what the class defines -------------------------------------------

class ReadOnly:
    def __init__(self, size: str = "65536") -> None:
        self._size = int(size)

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


def _open(cls: type, **kwargs: Any) -> PluginNode:
    return run(open_class(cls, **kwargs))


def test_capabilities_of_a_read_only_plugin() -> None:
    node = _open(ReadOnly)
    caps = node.capabilities
    assert (caps.can_write, caps.can_flush, caps.can_fua, caps.can_trim, caps.can_fast_zero,
            caps.can_extents, caps.can_multi_conn) == (False, False, False, False, False,
                                                      False, True)
    assert node.driver == "python"
    assert node.filename == f"{ReadOnly.__module__}.ReadOnly"
    assert run(node.block_status(100, 1 << 20))[0].length == 65536 - 100
    run(node.close())


def test_capabilities_of_a_writable_plugin() -> None:
    node = _open(DictDisk, options={"size": "1M"})
    caps = node.capabilities
    assert (caps.can_write, caps.can_flush, caps.can_fua, caps.can_trim, caps.can_fast_zero,
            caps.can_extents, caps.can_multi_conn) == (True, True, True, True, False,
                                                      True, True)
    run(node.close())
    # trims ignored (qemu's discard=ignore), read-only, no multi-conn unless declared
    assert not _open(DictDisk, options={"size": "1M"}, discard=False).capabilities.can_trim
    assert not _open(DictDisk, options={"size": "1M"},
                     read_only=True).capabilities.can_write

    class Private(PlainDisk):
        serialize = False

    assert not _open(Private, options={"size": "4096"}).capabilities.can_multi_conn


class Recorder:
    """Records every call (and whether it ran on the event loop's thread)."""

    calls: ClassVar[list[tuple[Any, ...]]] = []
    native_fua = False
    fast_zero = False

    def __init__(self) -> None:
        type(self).calls = []

    def size(self) -> int:
        return 1 << 20

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.calls.append(("write", offset, len(data), fua))

    def zero(self, offset: int, length: int, may_trim: bool, fua: bool = False) -> None:
        self.calls.append(("zero", offset, length, may_trim, fua))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.calls.append(("trim", offset, length, fua))

    def flush(self) -> None:
        self.calls.append(("flush",))


def test_fua_is_a_flush_after_unless_native() -> None:
    node = _open(Recorder)
    run(node.pwrite(b"abc", 5, fua=True))
    run(node.write_zeroes(0, 10, may_trim=True, fua=True))
    run(node.trim(0, 4096))
    assert Recorder.calls == [("write", 5, 3, False), ("flush",), ("zero", 0, 10, True, False),
                              ("flush",), ("trim", 0, 4096, False)]

    class Native(Recorder):
        native_fua = True

    node = _open(Native)
    run(node.pwrite(b"abc", 5, fua=True))
    run(node.trim(0, 4096, fua=True))
    run(node.pwrite(b"abc", 5))
    assert Native.calls == [("write", 5, 3, True), ("trim", 0, 4096, True),
                            ("write", 5, 3, False)]


def test_zeroes_fast_zero_and_no_flush() -> None:
    node = _open(Recorder)
    with pytest.raises(FastZeroUnsupported):
        run(node.write_zeroes(0, 10, fast=True))
    assert Recorder.calls == []

    class Fast(Recorder):
        fast_zero = True

    node = _open(Fast)
    run(node.write_zeroes(0, 10, fast=True))
    assert Fast.calls == [("zero", 0, 10, False, False)]
    # without zero(): pynbd writes zeroes, in pieces; never fast
    node = _open(PlainDisk, options={"size": str(3 << 20)})
    run(node.pwrite(pattern(1, 3 << 20), 0))
    run(node.write_zeroes(5, (2 << 20) + 7))
    got = run(read(node, 0, 3 << 20))
    assert got[5:(2 << 20) + 12].count(0) == (2 << 20) + 7
    assert got[:5] == pattern(1, 5)
    assert got[(2 << 20) + 12:] == pattern(1, 3 << 20)[(2 << 20) + 12:]
    with pytest.raises(FastZeroUnsupported):
        run(node.write_zeroes(0, 10, fast=True))


def test_block_status_replies_are_checked() -> None:
    class Extents(ReadOnly):
        reply: ClassVar[Any] = []

        def block_status(self, offset: int, length: int) -> Any:
            return self.reply

    node = _open(Extents)
    Extents.reply = [(4096, HOLE | ZERO), (1 << 30, DATA)]
    extents = run(node.block_status(0, 100))
    assert [(e.length, int(e.flags)) for e in extents] == [(4096, 3), (65536 - 4096, 0)]
    for bad in ([], [(0, 0)], [(10, 8)], [("x", 0)], None):
        Extents.reply = bad
        assert run(outcome(node.block_status(0, 100))) == errno.EIO


# -- threads, concurrency, timeout -------------------------------------------------------

class Gauge:
    """How many calls run at once, at most, and on which threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.threads: set[int] = set()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.threads.add(threading.get_ident())

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


class Slow(ReadOnly):
    gauge = Gauge()

    def read(self, offset: int, length: int) -> bytes:
        self.gauge.enter()
        time.sleep(0.1)
        self.gauge.leave()
        return bytes(length)


class SlowAsync(ReadOnly):
    gauge = Gauge()

    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        self.gauge.enter()
        await asyncio.sleep(0.02)
        self.gauge.leave()
        return bytes(length)


async def _many_reads(node: PluginNode, count: int = 16) -> None:
    await asyncio.gather(*(read(node, i * 512, 512) for i in range(count)))


@pytest.mark.parametrize(("cls", "serialize", "most"), [
    (Slow, False, 8), (Slow, True, 1), (SlowAsync, False, 16), (SlowAsync, True, 1)])
def test_requests_in_flight(cls: type, serialize: bool, most: int) -> None:
    """Plain methods run on up to 8 threads, async ones all at once; ``serialize`` runs
    one call at a time (on one thread)."""
    gauge = Gauge()
    kind = type(f"{cls.__name__}{serialize}", (cls,), {"serialize": serialize,
                                                      "gauge": gauge})
    node = _open(kind)
    run(_many_reads(node))
    assert gauge.most == most
    main = threading.get_ident()
    assert (main in gauge.threads) == (cls is SlowAsync)
    run(node.close())


def test_cheap_plain_methods_run_on_the_loop() -> None:
    seen: list[int] = []

    class Cheap(ReadOnly):
        blocking = False

        def read(self, offset: int, length: int) -> bytes:
            seen.append(threading.get_ident())
            return bytes(length)

    node = _open(Cheap)
    run(read(node, 0, 10))
    assert seen == [threading.get_ident()]


class Hangs(ReadOnly):
    release = threading.Event()

    def read(self, offset: int, length: int) -> bytes:
        if offset == 0:
            self.release.wait(30)  # "never" returns: until the test lets it go
        return b"\1" * length


class HangsAsync(ReadOnly):
    async def read(self, offset: int, length: int) -> bytes:  # type: ignore[override]
        if offset == 0:
            await asyncio.sleep(3600)
        return b"\1" * length


@pytest.mark.parametrize("cls", [Hangs, HangsAsync])
def test_a_request_that_never_returns_times_out(cls: type) -> None:
    """Past the timeout the request fails with ETIMEDOUT; other requests go on."""
    node = _open(cls, call_timeout=0.3)

    async def body() -> None:
        hung = asyncio.ensure_future(read(node, 0, 10))
        assert await read(node, 4096, 10) == b"\1" * 10  # meanwhile: served
        with pytest.raises(OSError, match=r"timed out after 0\.3 s") as info:
            await hung
        assert info.value.errno == errno.ETIMEDOUT
        assert await read(node, 8192, 10) == b"\1" * 10

    try:
        run(body())
    finally:
        Hangs.release.set()
        run(node.close())


# -- errors ------------------------------------------------------------------------------

class Failing(ReadOnly):
    error: ClassVar[BaseException] = ValueError("boom")

    def read(self, offset: int, length: int) -> bytes:
        raise self.error


def test_errors_become_errnos_and_bugs_are_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    node = _open(Failing)
    caplog.set_level(logging.DEBUG, logger="pynbd.plugin")
    Failing.error = OSError(errno.ENOSPC, "full")
    assert run(outcome(read(node, 0, 10))) == errno.ENOSPC
    Failing.error = OSError("no errno")
    assert run(outcome(read(node, 0, 10))) == errno.EIO
    assert not caplog.records, "an OSError is the plugin's answer, not a bug"
    Failing.error = ValueError("boom")
    for _ in range(3):
        with pytest.raises(OSError, match=r"read\(\) failed: ValueError: boom") as info:
            run(read(node, 0, 10))
        assert info.value.errno == errno.EIO
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 2


def test_a_read_of_the_wrong_length_is_an_error() -> None:
    class Short(ReadOnly):
        def read(self, offset: int, length: int) -> Any:
            return bytes(length - 1) if offset else "text"

    node = _open(Short)
    with pytest.raises(OSError, match="returned 9 bytes, not 10"):
        run(read(node, 1, 10))
    assert run(outcome(read(node, 0, 10))) == errno.EIO


# -- loading and opening: every failure is one line --------------------------------------

def _write(tmp_path: pathlib.Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


TWO = """
    class A:
        def size(self): return 512
        def read(self, offset, length): return b"a" * length

    class B(A):
        def read(self, offset, length): return b"b" * length

    class NotAPlugin:
        pass
"""


def test_a_class_is_found_or_named(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "two.py", TWO)
    assert load_plugin(f"{path}:B").cls.__name__ == "B"
    with pytest.raises(PluginError, match=r"defines several plugin classes \(A, B\): name "
                       r"one as '.*two.py:CLASS'"):
        load_plugin(path)
    with pytest.raises(PluginError, match="has no class 'C'"):
        load_plugin(f"{path}:C")
    with pytest.raises(PluginError, match="has no read"):
        load_plugin(f"{path}:NotAPlugin")
    one = _write(tmp_path, "one.py", "class Only:\n    def size(self): return 1\n"
                                     "    def read(self, o, n): return b'x' * n\n")
    assert load_plugin(one).cls.__name__ == "Only"


@pytest.mark.parametrize(("source", "message"), [
    ("import nonexistent_module_xyz\n",
     "Could not load plugin '{p}': ModuleNotFoundError: No module named "
     "'nonexistent_module_xyz'"),
    ("def broken(:\n", "Could not load plugin '{p}': SyntaxError: "),
    ("raise RuntimeError('at import')\n", "Could not load plugin '{p}': RuntimeError: at import"),
    ("x = 1\n", "Plugin '{p}' defines no plugin class (a class with read() and size())"),
    ("class P:\n    def read(self, o, n): pass\n    size = 5\n",
     "Plugin class '*.P': size is not a method"),
    ("class P:\n    serialize = 'yes'\n    def read(self, o, n): pass\n    def size(self): pass\n",
     "Plugin class '*.P': serialize must be True or False"),
])
def test_bad_plugin_files(tmp_path: pathlib.Path, source: str, message: str) -> None:
    path = _write(tmp_path, "bad.py", source)
    with pytest.raises(PluginError) as info:
        load_plugin(path + (":P" if "class P" in source else ""))
    text = str(info.value)
    assert "\n" not in text
    head, _, tail = message.format(p=path).partition("*")
    assert text.startswith(head), text
    assert text.endswith(tail), text


def test_a_missing_file_or_module(tmp_path: pathlib.Path) -> None:
    with pytest.raises(PluginError, match=r"Could not open plugin '.*/nope\.py': No such file"):
        load_plugin(str(tmp_path / "nope.py"))
    with pytest.raises(PluginError, match="Unknown plugin 'no_such_module_q': not a file, an "
                       "installed plugin"):
        load_plugin("no_such_module_q")


def test_a_module_on_the_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "plugin_mod_t.py", TWO)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugin("plugin_mod_t:A").source == "plugin_mod_t"
    assert load_plugin("pattern").driver == "pattern"
    assert {"pattern", "http"} <= set(plugin_drivers())


class Picky:
    def __init__(self, size: str, mode: str = "a") -> None:
        if mode not in ("a", "b"):
            raise ValueError(f"bad mode {mode!r}")
        if mode == "b":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")
        self._size = int(size)

    def size(self) -> Any:
        return self._size if self._size >= 0 else "big"

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def close(self) -> None:
        Picky.closed += 1

    closed = 0


@pytest.mark.parametrize(("options", "message"), [
    ({}, "Plugin '*.Picky' needs option 'size'"),
    ({"size": "1", "sise": "2"}, "Plugin '*.Picky' has no option 'sise' (its options: size, "
                                 "mode)"),
    ({"size": "x"}, "Could not open plugin '*.Picky': plugin __init__() failed: ValueError: "
                    "invalid literal for int() with base 10: 'x'"),
    ({"size": "1", "mode": "c"}, "Could not open plugin '*.Picky': plugin __init__() failed: "
                                 "ValueError: bad mode 'c'"),
    ({"size": "1", "mode": "b"}, "Could not open plugin '*.Picky': No such file or directory: "
                                 "'/x/y'"),
    ({"size": "-1"}, "Could not open plugin '*.Picky': size() returned 'big', not a number "
                     "of bytes"),
    ({"size": 5}, "Invalid parameter type for 'options.size', expected: string"),
    ({"size": "1", "timeout": "1"}, "Parameter 'options.timeout' is pynbd's"),
])
def test_a_plugin_that_cannot_open(options: dict[str, Any], message: str,
                                   caplog: pytest.LogCaptureFixture) -> None:
    closed = Picky.closed
    with pytest.raises(PluginError) as info:
        run(open_class(Picky, options))
    head, _, tail = message.partition("*")
    assert str(info.value).startswith(head), info.value
    assert str(info.value).endswith(tail), info.value
    assert not caplog.records, "opening logs nothing: the one line says it all"
    assert Picky.closed == closed + (options.get("size") == "-1")


def test_cli_syntax(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path, "two.py", TWO)
    assert cli_options(f"{path}:B") == ({"driver": "python", "plugin": f"{path}:B",
                                         "options": {}}, False)
    options, writable = cli_options("http:url=http://127.0.0.1:8080/a:b?c=d:connections=2"
                                    ":timeout=2.5")
    assert options == {"driver": "python", "plugin": "http", "timeout": 2.5,
                       "options": {"url": "http://127.0.0.1:8080/a:b?c=d",
                                   "connections": "2"}}
    assert not writable
    for bad, message in [("pattern:=1", "bad plugin option '=1'"),
                         ("pattern:size=1:size=2", "'size' appears more than once"),
                         ("pattern:timeout=x", "bad plugin timeout 'x'"),
                         ("pattern:sise=1", "has no option 'sise'")]:
        with pytest.raises(PluginError, match=message):
            cli_options(bad)


def test_blockdev_builds_plugins() -> None:
    """``build`` opens ``python`` and a plugin's own driver name; others are unknown."""
    graph = BlockGraph()

    async def body() -> None:
        opened: list[Any] = []
        made = await build(graph, {"driver": "pattern", "node-name": "p",
                                   "options": {"size": "1M"}}, opened)
        node = made[-1][1]
        assert (node.driver, node.size) == ("pattern", 1 << 20)
        assert await read(node, 8, 8) == (8).to_bytes(8, "big")
        made = await build(graph, {"driver": "python", "plugin": "pattern", "node-name": "q",
                                   "timeout": 5, "options": {"size": "4k"}}, opened)
        assert made[-1][1].size == 4096
        with pytest.raises(BlockdevError, match="Unknown driver 'nope'"):
            await build(graph, {"driver": "nope", "node-name": "n"}, opened)
        with pytest.raises(BlockdevError, match="Plugin 'pattern' needs option 'size'"):
            await build(graph, {"driver": "pattern", "node-name": "n"}, opened)
        for each in opened:
            await each.close()

    run(body())


def test_open_plugin_takes_blockdev_options() -> None:
    node = run(open_plugin({"driver": "python", "plugin": "pattern",
                            "options": {"size": "8"}, "discard": "unmap",
                            "cache": {"no-flush": True}}, True))
    assert (node.size, node.capabilities.can_write) == (8, False)
    with pytest.raises(PluginError, match="Parameter 'plugin' is missing"):
        run(open_plugin({"driver": "python"}, False))
    with pytest.raises(PluginError, match="Parameter 'timeout' expects a number"):
        run(open_plugin({"driver": "pattern", "timeout": -1, "options": {"size": "8"}},
                        False))


def test_cache_no_flush_over_a_plugin_is_the_shared_filter(tmp_path: pathlib.Path) -> None:
    """A plugin is a protocol node: ``cache.no-flush`` puts the same implicit
    ``NoFlushFilter`` over it as over a file, and no flush reaches the plugin."""
    source = tmp_path / "flushes.py"
    source.write_text(textwrap.dedent('''
        class Flushes:
            def __init__(self):
                self.calls = []

            def size(self):
                return 4096

            def read(self, offset, length):
                return bytes(length)

            def write(self, offset, data):
                self.calls.append("write")

            def flush(self):
                self.calls.append("flush")
    '''))

    async def body() -> None:
        opened: list[Any] = []
        made = await build(BlockGraph(), {"driver": "python", "plugin": str(source),
                                          "cache": {"no-flush": True}}, opened)
        top = made[-1][1]
        assert isinstance(top, NoFlushFilter)
        assert top.implicit
        assert isinstance(top.child, PluginNode)
        await top.pwrite(b"x", 0, fua=True)
        await top.flush()
        assert top.child._caller.instance.calls == ["write"]
        for each in reversed(opened):
            await each.close()

    run(body())
