"""``PluginNode``: a Python storage plugin (``docs/plugins.md``) as a protocol node.

The plugin is one object, made once per node from its options and shared by
every connection of every export over the node; this module calls it and keeps
every rule of the node interface for it.

Rules of this module:
- Async methods are awaited on the event loop, many at once.  Plain methods run
  on the node's own daemon threads (at most ``THREADS``; one with ``serialize``),
  so that a call that never returns holds neither the shared file pool nor the
  process at exit; with ``blocking = False`` they run on the event loop.  The
  constructor is a plain method too.  ``serialize`` also puts one lock around
  every call.
- Every call is bounded by the node's timeout (``timeout`` seconds, default
  ``DEFAULT_TIMEOUT``, 0 for none): past it the request fails with ETIMEDOUT
  (EIO on the wire) and the connection goes on; a plain call that is still
  running keeps its thread.
- A plugin's ``OSError`` fails the request with its errno (EIO without one);
  any other exception fails it with EIO, and the first of each method is logged
  with its traceback (later ones at debug level).  At open, every failure is a
  one-line ``PluginError``.
- Capabilities come from what the class defines: no ``write``, read-only; no
  ``trim``, trims do nothing; no ``zero``, zeroes are written; no ``flush``, no
  flush (and FUA only if ``native_fua``); no ``block_status``, all data.  The
  multi-conn promise holds if the class says so (``multi_conn = True``), and by
  default only for a node that cannot write.
- ``write`` gets a ``bytes`` copy of the payload (the plugin may keep it);
  ``read`` must return exactly the bytes asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

from ._pool import track
from .node import Capabilities, Extent, ExtentFlags, FastZeroUnsupported, Node
from .pluginload import (
    PluginClass,
    PluginError,
    check_arguments,
    check_options,
    describe,
    error_line,
    load_driver,
    load_plugin,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from .node import Data

log = logging.getLogger("pynbd.plugin")

#: the default per-call timeout, in seconds
DEFAULT_TIMEOUT = 60.0
#: threads per node for plain methods (one with ``serialize``)
THREADS = 8
#: zeroes are written in pieces of this size when the plugin has no ``zero``
ZERO_CHUNK = 1 << 20
_ZEROES = bytes(ZERO_CHUNK)
#: the largest size a node may have (NBD's 64-bit sizes, signed as qemu keeps them)
MAX_SIZE = (1 << 63) - 1


class _Workers:
    """Daemon threads that run a plugin's plain methods, started on demand."""

    def __init__(self, name: str, limit: int) -> None:
        self._name = name
        self._limit = limit
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        #: jobs queued or running
        self._pending = 0

    def run(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._pending += 1
            start = self._pending > self._threads and self._threads < self._limit
            if start:
                self._threads += 1
        if start:
            threading.Thread(target=self._work, name=f"pynbd-plugin-{self._name}",
                             daemon=True).start()
        self._jobs.put((loop, future, call))
        return track(future)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, call = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = call()
            except Exception as err:
                error = err
            except BaseException as err:  # SystemExit in a plugin: a failed call
                error = RuntimeError(error_line(err))
            with self._lock:
                self._pending -= 1
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits now
                loop.call_soon_threadsafe(_settle, future, result, error)

    def close(self) -> None:
        """Let every idle thread end (a thread stuck in a call stays, as a daemon)."""
        with self._lock:
            threads, self._threads = self._threads, 0
        for _ in range(threads):
            self._jobs.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # timed out meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Caller:
    """Calls into one plugin object: the threads, the lock, the timeout, the errors."""

    def __init__(self, plugin: PluginClass, timeout: float) -> None:
        self.plugin = plugin
        self.instance: Any = None
        self.timeout = timeout or None
        attrs = plugin.attributes
        self._blocking = bool(attrs["blocking"])
        self._lock = asyncio.Lock() if attrs["serialize"] else None
        self._workers = _Workers(plugin.driver, 1 if attrs["serialize"] else THREADS)
        #: methods whose failure was logged with its traceback
        self._logged: set[str] = set()

    async def _invoke(self, call: Callable[..., Any], is_async: bool,
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if is_async:
            result = call(*args, **kwargs)
        elif self._blocking:
            result = await self._workers.run(functools.partial(call, *args, **kwargs))
        else:
            result = call(*args, **kwargs)
        if inspect.isawaitable(result):  # a plain method that returned a coroutine
            result = await result
        return result

    async def _locked(self, call: Callable[..., Any], is_async: bool,
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._lock is None:
            return await self._invoke(call, is_async, args, kwargs)
        async with self._lock:
            return await self._invoke(call, is_async, args, kwargs)

    async def _guarded(self, method: str, call: Callable[..., Any], is_async: bool,
                       args: tuple[Any, ...], kwargs: dict[str, Any], opening: bool) -> Any:
        scope = asyncio.timeout(self.timeout)
        try:
            async with scope:
                return await self._locked(call, is_async, args, kwargs)
        except TimeoutError as err:
            if scope.expired():
                raise OSError(errno.ETIMEDOUT, f"plugin {method}() timed out after "
                              f"{self.timeout:g} s") from None
            raise OSError(errno.EIO, f"plugin {method}(): {err}") from None
        except OSError as err:
            if err.errno is None:
                raise OSError(errno.EIO, f"plugin {method}(): {err}") from None
            raise
        except Exception as err:
            self.failed(method, err, opening)
            raise OSError(errno.EIO, f"plugin {method}() failed: {error_line(err)}") from None

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` on the plugin object.

        Raises ``OSError`` with the plugin's errno, ETIMEDOUT past the timeout,
        or EIO for anything else (logged).
        """
        return await self._guarded(method, getattr(self.instance, method),
                                   self.plugin.methods[method], args, kwargs, False)

    async def opening(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """``call`` at open, logging nothing (``__init__``: make the plugin object)."""
        if method == "__init__":
            return await self._guarded(method, self.plugin.cls, False, args, kwargs, True)
        return await self._guarded(method, getattr(self.instance, method),
                                   self.plugin.methods[method], args, kwargs, True)

    def failed(self, method: str, err: Exception, opening: bool = False) -> None:
        """Log a plugin's bug: the first of each method with its traceback."""
        if opening:
            return
        if method in self._logged:
            log.debug("plugin %s: %s() failed: %s", self.plugin.source, method,
                      error_line(err))
            return
        self._logged.add(method)
        log.error("plugin %s: %s() failed (further failures of %s() are logged at debug "
                  "level)", self.plugin.source, method, method, exc_info=err)

    def close(self) -> None:
        self._workers.close()


def _as_extents(reply: Any, offset: int, size: int) -> list[Extent]:
    """``block_status``'s reply as extents from ``offset``, cut at the end of the node."""
    extents: list[Extent] = []
    pos = offset
    for item in reply:
        length: object
        flags: object
        length, flags = (item.length, int(item.flags)) if isinstance(item, Extent) else item
        if (not isinstance(length, int) or not isinstance(flags, int) or length <= 0
                or flags & ~3):
            raise ValueError(f"block_status() returned {item!r}: expected (length > 0, "
                             "flags 0-3)")
        length = min(length, size - pos)
        extents.append(Extent(length, ExtentFlags(flags)))
        pos += length
        if pos >= size:
            break
    if not extents:
        raise ValueError("block_status() returned no extent")
    return extents


class PluginNode(Node):
    """A plugin object as a node of ``size`` bytes (made by ``open_plugin``)."""

    driver = "python"

    def __init__(self, caller: _Caller, size: int, *, read_only: bool = False,
                 discard: bool = True) -> None:
        plugin = caller.plugin
        self._caller = caller
        self._call = caller.call
        self.plugin = plugin
        self.driver = plugin.driver
        self.size = size
        has = plugin.methods
        attrs = plugin.attributes
        writable = "write" in has and not read_only
        #: how FUA is kept: passed on (native), a flush after, or not at all
        self._native_fua = bool(attrs["native_fua"])
        self._flush_after = "flush" in has and not self._native_fua
        multi_conn = attrs["multi_conn"]
        self.capabilities = Capabilities(
            can_write=writable,
            can_flush="flush" in has,
            can_fua=writable and (self._native_fua or self._flush_after),
            can_trim=writable and discard and "trim" in has,
            can_fast_zero=writable and "zero" in has and bool(attrs["fast_zero"]),
            can_extents="block_status" in has,
            can_multi_conn=not writable if multi_conn is None else multi_conn,
            sparse_reads=False,
        )
        self._has_zero = "zero" in has
        self._may_trim = discard

    def __repr__(self) -> str:
        return f"PluginNode({self.plugin.name}, size={self.size})"

    @property
    def filename(self) -> str:
        return self.plugin.source

    def _check_writable(self) -> None:
        if not self.capabilities.can_write:
            raise OSError(errno.EROFS, "the plugin node is read-only")

    async def _write_call(self, method: str, *args: Any, fua: bool) -> None:
        if self._native_fua:
            await (self._call(method, *args, fua=True) if fua else self._call(method, *args))
            return
        await self._call(method, *args)
        if fua and self._flush_after:
            await self._call("flush")

    async def pread(self, buf: memoryview, offset: int) -> None:
        if not len(buf):
            return
        data = await self._call("read", offset, len(buf))
        try:
            if len(data) != len(buf):
                raise ValueError(f"read() returned {len(data)} bytes, not {len(buf)}")
            buf[:] = data
        except (TypeError, ValueError) as err:
            self._caller.failed("read", err)
            raise OSError(errno.EIO, f"plugin read() failed: {error_line(err)}") from None

    async def pwrite(self, data: Data, offset: int, *, fua: bool = False) -> None:
        self._check_writable()
        if len(data):
            await self._write_call("write", offset, bytes(data), fua=fua)

    async def flush(self) -> None:
        if self.capabilities.can_flush:
            await self._call("flush")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_writable()
        if self.capabilities.can_trim and length:
            await self._write_call("trim", offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        self._check_writable()
        if fast and not self.capabilities.can_fast_zero:
            raise FastZeroUnsupported()
        if not length:
            return
        if self._has_zero:
            try:
                await self._write_call("zero", offset, length, may_trim and self._may_trim,
                                       fua=fua)
            except OSError as err:
                if fast and err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise FastZeroUnsupported() from None
                raise
            return
        end = offset + length
        while offset < end:
            piece = min(ZERO_CHUNK, end - offset)
            await self._call("write", offset, _ZEROES if piece == ZERO_CHUNK else
                             bytes(piece))
            offset += piece
        if fua and self._flush_after:
            await self._call("flush")

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not self.capabilities.can_extents:
            return [Extent(min(length, self.size - offset), ExtentFlags.DATA)]
        reply = await self._call("block_status", offset, length)
        try:
            return _as_extents(reply, offset, self.size)
        except (TypeError, ValueError) as err:
            self._caller.failed("block_status", err)
            raise OSError(errno.EIO, f"plugin block_status() failed: "
                          f"{error_line(err)}") from None

    async def close(self) -> None:
        try:
            if "close" in self.plugin.methods:
                await self._call("close")
        except OSError as err:
            log.warning("plugin %s: close() failed: %s", self.plugin.source,
                        err.strerror or err)
        finally:
            self._caller.close()


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise PluginError(f"Parameter 'timeout' expects a number of seconds, not {value!r}")
    return float(value)


async def open_plugin(options: dict[str, Any], read_only: bool) -> PluginNode:
    """The plugin node blockdev ``options`` describe (driver ``python`` with ``plugin``,
    or a plugin's own driver name); ``PluginError`` (one line) if it cannot be made."""
    driver = options["driver"]
    if driver == "python":
        if not isinstance(options.get("plugin"), str):
            raise PluginError("Parameter 'plugin' is missing")
        plugin = load_plugin(options["plugin"])
    else:
        plugin = load_driver(driver)
    return await open_loaded(
        plugin, check_options(options.get("options", {})), read_only=read_only,
        call_timeout=_timeout(options.get("timeout", DEFAULT_TIMEOUT)),
        discard=options.get("discard", "ignore") == "unmap")


async def open_class(cls: type, options: dict[str, str] | None = None, *,
                     read_only: bool = False, call_timeout: float = DEFAULT_TIMEOUT,
                     discard: bool = True) -> PluginNode:
    """A node of the plugin class ``cls`` made with ``options`` (tests, the contract)."""
    plugin = describe(cls, "python", f"{cls.__module__}.{cls.__qualname__}")
    return await open_loaded(plugin, check_options(options or {}), read_only=read_only,
                             call_timeout=_timeout(call_timeout), discard=discard)


async def open_loaded(plugin: PluginClass, kwargs: dict[str, str], *, read_only: bool,
                      call_timeout: float, discard: bool) -> PluginNode:
    """Make the plugin object and ask its size: the node."""
    check_arguments(plugin, kwargs)
    caller = _Caller(plugin, call_timeout)
    opened = False
    try:
        caller.instance = await caller.opening("__init__", **kwargs)
        opened = True
        size = await caller.opening("size")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE:
            raise PluginError(f"Could not open plugin '{plugin.source}': size() returned "
                              f"{size!r}, not a number of bytes")
    except BaseException as err:
        if opened and "close" in plugin.methods:
            with contextlib.suppress(OSError):
                await caller.opening("close")
        caller.close()
        if isinstance(err, OSError):
            where = f": '{err.filename}'" if err.filename else ""
            raise PluginError(f"Could not open plugin '{plugin.source}': "
                              f"{err.strerror or err}{where}") from None
        raise
    return PluginNode(caller, size, read_only=read_only, discard=discard)
