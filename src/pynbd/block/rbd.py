"""A Ceph RBD image through Ceph's own Python bindings (``rados``, ``rbd``).

Rules of this module:
- ``rados`` and ``rbd`` are imported lazily, when an image is opened: they
  exist only as Debian's python3-rados/python3-rbd (no wheel), so pynbd runs
  without them and says in one line what is missing when an rbd: image is
  asked for (``RbdUnavailable``).
- One ``rbd.Image`` per node, shared by every connection: a completed
  write is visible to the next read from anyone in this process, and a flush
  covers every completed write.  Across processes (several gateways on one
  image) the same holds only without librbd's client cache, so the image is
  opened with ``rbd_cache=false`` unless the spec sets ``rbd_cache``
  itself; with a client cache on, the node does not offer multi-conn.
- I/O is asynchronous without a thread per request: librbd's ``aio_*`` calls
  complete on librbd's own threads, which hand the result to the event loop
  through an eventfd the loop watches (``_Handoff``: the cheaper equivalent of
  ``call_soon_threadsafe``, measured).  Only calls that librbd offers solely as
  blocking ones (``diff_iterate`` for block status, open and close) run in a
  small thread pool.
- NBD maps onto RBD as: WRITE_ZEROES to ``write_zeroes`` (thin unless the
  client forbids holes, then thick; a small librbd discard does not zero, so
  zeroing never uses discard), TRIM to discard (with ``discard``), FLUSH to
  flush, block status from ``diff_iterate`` (unreported ranges are holes),
  size from the image.  librbd's negative return codes
  become ``OSError`` with that errno (EROFS for a read-only image or
  snapshot, ESHUTDOWN for a blocklisted client).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import importlib
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._pool import off_thread_done, off_thread_started
from .node import Capabilities, Data, Extent, ExtentFlags, FastZeroUnsupported, Node

if TYPE_CHECKING:
    from .node import ReadDone, WriteDone
    from .rbdspec import RbdSpec

#: ``block_status`` looks at most this far ahead per call (``diff_iterate``
#: costs one OSD round trip per object in range).
STATUS_WINDOW = 64 << 20

#: librbd's ``RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`` (librbd.h)
_THICK_PROVISION = 1

#: Seconds to wait for the monitors before giving up at open, unless the spec
#: sets ``client_mount_timeout`` itself (librbd's own default is 300 s).
DEFAULT_MOUNT_TIMEOUT = 15

#: what the loop calls with an aio call's return value and data (reads: the bytes)
_Completion = Callable[[int, tuple[Any, ...]], None]

#: open, close and block status (the blocking librbd calls) run here
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="pynbd-rbd")

#: set by pynbd.server.metrics while metrics are on: gets each aio call's ns (start to loop)
call_timer: Callable[[RbdNode, int], None] | None = None


class RbdUnavailable(RuntimeError):
    """The ``rados``/``rbd`` Python bindings are not installed."""


def _bindings() -> tuple[Any, Any]:
    try:
        rados = importlib.import_module("rados")
        rbd = importlib.import_module("rbd")
    except ImportError as exc:
        raise RbdUnavailable(
            "rbd images need Ceph's Python bindings (Debian: apt install python3-rados "
            f"python3-rbd, and run pynbd with /usr/bin/python3): {exc}") from None
    return rados, rbd


def _oserror(exc: BaseException, what: str) -> OSError:
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code <= 0:
        code = errno.EIO
    return OSError(code, f"{what}: {exc}")


class RbdNode(Node):
    """An RBD image, opened once and shared by every connection.

    ``lock``: ``"auto"`` lets librbd pass an image's exclusive lock between
    writers on demand (the image needs no exclusive-lock feature for several
    writable gateways at all); ``"exclusive"`` takes the lock at open and
    keeps it, so this gateway is the only writer and others must be
    read-only.
    """

    driver = "rbd"

    def __init__(self, spec: RbdSpec, *, read_only: bool = False, lock: str = "auto",
                 discard: bool = True) -> None:
        if lock not in ("auto", "exclusive"):
            raise ValueError(f"rbd lock mode must be 'auto' or 'exclusive', got {lock!r}")
        rados, rbd = _bindings()
        self.spec = spec
        self._rbd = rbd
        self.read_only = read_only or spec.snapshot is not None
        self.discard = discard
        self._cluster: Any = None
        self._ioctx: Any = None
        self._image: Any = None
        try:
            self._image = self._open(rados, rbd, lock)
        except BaseException:
            self._close_now()
            raise
        self.size = int(self._image.size())
        features = int(self._image.features())
        self.lock = lock
        self.exclusive_lock_feature = bool(features & rbd.RBD_FEATURE_EXCLUSIVE_LOCK)
        self.client_cache = spec.cache_requested
        writable = not self.read_only
        self.capabilities = Capabilities(
            can_write=writable, can_flush=writable, can_fua=writable,
            can_trim=writable and discard,
            can_fast_zero=writable, can_extents=True,
            # a client cache private to this process breaks the promise across gateways
            can_multi_conn=not self.client_cache,
            # block status costs a cluster round trip: not before every large read
            sparse_reads=False)
        # with a valid object map, block status is answered from it, per whole object
        self.fast_diff = bool(features & rbd.RBD_FEATURE_FAST_DIFF) and not (
            int(self._image.flags()) & rbd.RBD_FLAG_FAST_DIFF_INVALID)
        self._handoff: _Handoff | None = None
        #: every handoff made (one per event loop), closed after the image
        self._handoffs: list[_Handoff] = []

    @property
    def filename(self) -> str:
        return f"rbd:{self.spec.name}"

    def _open(self, rados: Any, rbd: Any, lock: str) -> Any:
        """Connect, open the pool and the image (and take its lock); return the image."""
        self._cluster = self._connect(rados)
        spec = self.spec
        try:
            self._ioctx = self._cluster.open_ioctx(spec.pool)
        except rados.ObjectNotFound:
            raise OSError(errno.ENOENT, f"rbd: pool {spec.pool!r} does not exist") from None
        except rados.Error as exc:
            raise _oserror(exc, f"rbd: cannot open pool {spec.pool!r}") from None
        if spec.namespace:
            self._ioctx.set_namespace(spec.namespace)
        try:
            image = rbd.Image(self._ioctx, spec.image, snapshot=spec.snapshot,
                              read_only=self.read_only)
        except rbd.ImageNotFound:
            what = (f"image {spec.image!r} or its snapshot {spec.snapshot!r}" if spec.snapshot
                    else f"image {spec.image!r}")
            raise OSError(errno.ENOENT, f"rbd: {what} not found in pool "
                          f"{spec.pool!r}") from None
        except rbd.Error as exc:
            raise _oserror(exc, f"rbd: cannot open image {spec.name}") from None
        self._image = image  # closed by the caller if taking the lock fails
        if lock == "exclusive" and not self.read_only:
            try:
                image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            except rbd.Error as exc:
                raise _oserror(exc, f"rbd: cannot take the exclusive lock of {spec.name} "
                               "(another gateway holds it?)") from None
        return image

    def _connect(self, rados: Any) -> Any:
        """A connected ``rados.Rados`` with the spec's configuration (and pynbd's defaults)."""
        spec = self.spec
        if spec.conf is not None and not os.path.exists(spec.conf):
            raise OSError(errno.ENOENT, f"rbd: Ceph configuration file {spec.conf!r} not found")
        cluster = rados.Rados(rados_id=spec.user)
        self._cluster = cluster  # closed by the caller if anything below fails
        try:
            if spec.conf is not None:
                cluster.conf_read_file(spec.conf)
            else:
                # librados's default search path; having no file there is fine
                with contextlib.suppress(rados.Error):
                    cluster.conf_read_file()
            # pynbd's defaults override the file; the spec overrides both
            spec_keys = {k.replace("-", "_") for k, _ in spec.options}
            if "rbd_cache" not in spec_keys:
                cluster.conf_set("rbd_cache", "false")
            if "client_mount_timeout" not in spec_keys:
                cluster.conf_set("client_mount_timeout", str(DEFAULT_MOUNT_TIMEOUT))
            for key, value in spec.options:
                cluster.conf_set(key, value)
        except rados.Error as exc:
            raise _oserror(exc, f"rbd: bad Ceph configuration for {spec.name}") from None
        try:
            cluster.connect()
        except rados.Error as exc:
            where = f"the Ceph cluster of {spec.conf or 'the default ceph.conf'}"
            timeout = cluster.conf_get("client_mount_timeout")
            raise _oserror(exc, f"rbd: cannot connect to {where} (client_mount_timeout "
                           f"{timeout} s)") from None
        return cluster

    # -- completions -------------------------------------------------------------------------

    def _start(self, call: Callable[[Callable[..., None]], object],
               callback: _Completion) -> None:
        """Start an aio call; ``callback(result, data)`` runs on the loop when it completes."""
        handoff = self._handoff
        if handoff is None or handoff.loop is not asyncio.get_running_loop():
            handoff = self._new_handoff()
        put = handoff.put
        if call_timer is not None:
            callback = _timed(self, callback, call_timer)

        def done(completion: Any, *data: Any) -> None:
            # on a librbd thread: hand over to the loop, nothing else
            put(callback, completion.get_return_value(), data)

        off_thread_started()
        try:
            call(done)
        except BaseException as exc:
            off_thread_done()  # it never started
            if isinstance(exc, self._rbd.Error):
                raise _oserror(exc, "rbd") from None
            raise

    def _new_handoff(self) -> _Handoff:
        """A handoff to the running loop (the first, or the loop changed)."""
        if self._handoff is not None:
            self._handoff.detach()
        self._handoff = _Handoff(asyncio.get_running_loop())
        self._handoffs.append(self._handoff)
        return self._handoff

    def _submit(self, call: Callable[[Callable[..., None]], object]) -> asyncio.Future[Any]:
        """Start an aio call; the future gets ``(result, data)``."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(result: int, data: tuple[Any, ...]) -> None:
            if not future.done():
                future.set_result((result, data))

        self._start(call, settle)
        return future

    def start_read(self, offset: int, length: int, done: ReadDone) -> bool:
        if length == 0:
            return False

        def complete(result: int, data: tuple[Any, ...]) -> None:
            try:
                got = _read_result(result, data, offset, length)
            except OSError as err:
                done(None, err)
            else:
                done(got, None)

        self._start(lambda cb: self._image.aio_read(offset, length, cb), complete)
        return True

    def start_write(self, data: Data, offset: int, fua: bool,
                    done: WriteDone) -> bool:
        if not data or (fua and self.client_cache):
            return False
        payload = data if isinstance(data, bytes | bytearray) else bytes(data)

        def complete(result: int, _: tuple[Any, ...]) -> None:
            done(OSError(-result, f"rbd write at {offset}: {os.strerror(-result)}")
                 if result < 0 else None)

        self._start(lambda cb: self._image.aio_write(payload, offset, cb), complete)
        return True

    async def pread(self, buf: memoryview, offset: int) -> None:
        if buf:
            buf[:] = await self.read(offset, len(buf))

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        if length == 0:
            return b""
        result, data = await self._submit(
            lambda cb: self._image.aio_read(offset, length, cb))
        return _read_result(result, data, offset, length)

    async def pwrite(self, data: Data, offset: int, *,
                     fua: bool = False) -> None:
        payload = data if isinstance(data, bytes | bytearray) else bytes(data)
        if not payload:
            return
        result, _ = await self._submit(lambda cb: self._image.aio_write(payload, offset, cb))
        _check(result, "write", offset)
        if fua and self.client_cache:
            await self.flush()

    async def flush(self) -> None:
        result, _ = await self._submit(self._image.aio_flush)
        _check(result, "flush", 0)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if length == 0 or not self.discard:
            return
        result, _ = await self._submit(lambda cb: self._image.aio_discard(offset, length, cb))
        _check(result, "discard", offset)
        if fua and self.client_cache:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False,
                           fast: bool = False, fua: bool = False) -> None:
        # thin (discard-based, no allocation) whenever the client allows holes, as
        # qemu-nbd does on rbd whatever --discard says; thick only for NO_HOLE
        thin = may_trim
        if fast and not thin:
            # thick zeroing writes every byte: never fast
            raise FastZeroUnsupported("rbd: zeroing without holes writes every byte")
        if length == 0:
            return
        flags = 0 if thin else _THICK_PROVISION
        result, _ = await self._submit(lambda cb: self._image.aio_write_zeroes(
            offset, length, cb, zero_flags=flags))
        _check(result, "write zeroes", offset)
        if fua and self.client_cache:
            await self.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        length = min(length, STATUS_WINDOW, self.size - offset)
        runs: list[tuple[int, int]] = []

        def collect() -> None:
            self._image.diff_iterate(offset, length, None,
                                     lambda off, ln, exists: runs.append((off, ln))
                                     if exists else None,
                                     whole_object=self.fast_diff)

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(_POOL, collect)
        except self._rbd.Error as exc:
            raise _oserror(exc, f"rbd block status at {offset}") from None
        return _extents(offset, length, runs)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(_POOL, self._close_now)
        # the image is closed: no completion can reach a handoff any more
        handoffs, self._handoffs, self._handoff = self._handoffs, [], None
        for handoff in handoffs:
            handoff.close()

    def _close_now(self) -> None:
        image, ioctx, cluster = self._image, self._ioctx, self._cluster
        self._image = self._ioctx = self._cluster = None
        # closing: errors leave nothing to save
        for step in (image, ioctx):
            if step is not None:
                with contextlib.suppress(Exception):
                    step.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.shutdown()


class _Handoff:
    """Completions from librbd's threads to the event loop, one wakeup per batch.

    ``put`` runs on a librbd thread: it queues ``(callback, result, data)``
    and, only if no wakeup is pending, writes to an eventfd the loop watches:
    one syscall, where ``call_soon_threadsafe`` would first build a handle and
    copy the context on the thread every queue-depth-1 read waits for, and the
    loop would then read its self-pipe twice.  The loop calls each
    ``callback(result, data)``, counting each as back from another thread
    (``off_thread_done``; ``RbdNode._start`` counted it out).  ``put`` also
    pins a Python thread state to the calling thread: otherwise the binding
    creates and destroys one for every callback (an mmap/munmap pair and a
    page fault per I/O, measured).

    The eventfd stays open until ``close``, which the node calls only after
    the image is closed: a late ``put`` must never write to a descriptor
    number that has been reused.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[_Completion, int, tuple[Any, ...]]] = []
        self._scheduled = False
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        loop.add_reader(self._fd, self._drain)

    def put(self, callback: _Completion, result: int, data: tuple[Any, ...]) -> None:
        if not getattr(_pinned, "done", False):
            _pin_thread_state()
        with self._lock:
            self._items.append((callback, result, data))
            if self._scheduled:
                return
            self._scheduled = True
        os.eventfd_write(self._fd, 1)

    def _drain(self) -> None:
        # the wakeup first, then the items: a put in between is either taken
        # below or writes the eventfd again
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for callback, result, data in items:
            off_thread_done()  # counted by ``RbdNode._start``
            callback(result, data)

    def detach(self) -> None:
        """Stop watching the eventfd (on the loop's thread; again, or on a closed
        loop, it does nothing)."""
        self.loop.remove_reader(self._fd)

    def close(self) -> None:
        self.detach()
        os.close(self._fd)


#: per-thread flag: this librbd thread keeps its Python thread state
_pinned = threading.local()


def _pin_thread_state() -> None:
    """Keep the calling (foreign, librbd) thread's Python thread state alive.

    One extra ``PyGILState_Ensure`` that is never released: the binding's own
    Ensure/Release around each callback then reuses the state instead of
    creating and freeing one.  The state goes when librbd ends the thread.
    """
    ctypes.pythonapi.PyGILState_Ensure()
    _pinned.done = True


def _timed(node: RbdNode, callback: _Completion, timer: Callable[[RbdNode, int], None],
           ) -> _Completion:
    start = time.perf_counter_ns()

    def timed(result: int, data: tuple[Any, ...]) -> None:
        timer(node, time.perf_counter_ns() - start)
        callback(result, data)

    return timed


def _read_result(result: int, data: tuple[Any, ...], offset: int, length: int) -> bytes:
    """An ``aio_read``'s outcome: librbd's own buffer (no copy), or ``OSError``."""
    if result < 0:
        raise OSError(-result, f"rbd read at {offset}: {os.strerror(-result)}")
    got: bytes = data[0] if data else b""
    # past a shrunk image's end: zeroes
    return got if len(got) == length else got + bytes(length - len(got))


def _check(result: int, what: str, offset: int) -> None:
    if result < 0:
        raise OSError(-result, f"rbd {what} at {offset}: {os.strerror(-result)}")


def _extents(offset: int, length: int, runs: list[tuple[int, int]]) -> list[Extent]:
    """Turn ``diff_iterate``'s allocated runs into consecutive extents from ``offset``."""
    extents: list[Extent] = []
    pos, end = offset, offset + length
    for start, run in sorted(runs):
        start, stop = max(start, pos), min(start + run, end)
        if stop <= start:
            continue
        if start > pos:
            extents.append(Extent(start - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
        if extents and extents[-1].flags == ExtentFlags.DATA:
            extents[-1] = Extent(extents[-1].length + stop - start, ExtentFlags.DATA)
        else:
            extents.append(Extent(stop - start, ExtentFlags.DATA))
        pos = stop
    if pos < end:
        extents.append(Extent(end - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
    return extents
