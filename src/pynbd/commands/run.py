"""``pynbd [options] IMAGE``, the qemu-nbd compatible command: running it.

Rules of this module: argument errors print one line (``pynbd: ...``) and exit
with status 2; the server prints nothing on success unless ``-v`` or
``--print-uri``.  Sockets are bound before any fork so that errors reach the
user's terminal and ``--fork`` returns only once clients can connect: the
child reports over a pipe whether it started (``ok``) or why not
(``error:MESSAGE``), and the parent exits with the matching status.  The
sockets are the configured address, or the one systemd passed (socket
activation, ``server.activation``), or with ``--inetd`` the one client's
connection on standard input; systemd hears ``READY=1`` once the image is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import urllib.parse
from typing import TYPE_CHECKING, Any

from ..block.blockdev import BlockdevError, add_all, build
from ..block.cachemode import WritethroughFilter
from ..block.detectzeroes import DetectZeroesFilter
from ..block.faults import FaultFilter
from ..block.file import FileNode
from ..block.filterspec import stack_filters
from ..block.graph import BlockGraph
from ..block.pluginload import PLUGIN_PREFIX, PluginError, cli_options
from ..block.probe import probe_format
from ..block.sizes import parse_size
from ..block.tracking import TrackingFilter
from ..cmdline import UsageError
from ..proto.handshake import TlsMode
from ..server import Export, ExportTable, Server
from ..server.activation import (
    ActivationError,
    activation_count,
    inherited_sockets,
    notify_ready,
)
from ..server.listen import listen_tcp, listen_unix
from ..server.metricsexport import MetricsError, MetricsServer, start_exporter, stop_exporter
from ..server.polling import event_loop_factory
from ..server.runtime import handle_stop_signals, wait_at_stop
from .common import prepare_process, setup_logging, write_pid_file
from .serve import MEMORY_PREFIX, RBD_PREFIX, Config, fault_rules, parse_args

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..block.bitmap import DirtyBitmap
    from ..block.node import Node

#: the parent reads the child's answer (b"ok" or b"error:" MESSAGE) in one read of
#: this size; a pipe write up to this size (PIPE_BUF) is atomic
READY_ANSWER_MAX = 4096
#: a failure message is cut to this many bytes so that its answer fits
_FAILURE_MESSAGE_MAX = 4000


def _protocol_options(config: Config) -> tuple[dict[str, Any], bool]:
    """The image's protocol node as blockdev options, and whether it is read-only."""
    read_only = config.read_only
    # --cache's part that is the storage's (qemu's cache.direct and cache.no-flush)
    cache = {"direct": config.cache in ("none", "directsync"),
             "no-flush": config.cache == "unsafe"}
    if config.image.startswith(MEMORY_PREFIX):
        try:
            size = parse_size(config.image[len(MEMORY_PREFIX):])
        except ValueError as err:
            raise UsageError(f"bad memory disk size: {err}") from None
        return {"driver": "memory", "size": size, "read-only": read_only,
                "cache": cache}, read_only
    if config.image.startswith(RBD_PREFIX):
        from ..block.rbdspec import RbdSpecError, parse_rbd_filename

        try:
            spec = parse_rbd_filename(config.image)
        except RbdSpecError as err:
            raise UsageError(str(err)) from None
        read_only = read_only or spec.snapshot is not None  # a snapshot is served read-only
        return {"driver": "rbd", "x-spec": spec, "x-lock": config.rbd_lock,
                "discard": config.discard, "read-only": read_only, "cache": cache}, read_only
    if config.image.startswith(PLUGIN_PREFIX):  # a Python plugin: a protocol node
        try:
            options, writable = cli_options(config.image[len(PLUGIN_PREFIX):])
        except PluginError as err:
            raise UsageError(str(err)) from None
        read_only = read_only or not writable  # a plugin without write() is read-only
        return {**options, "discard": config.discard, "read-only": read_only,
                "cache": cache}, read_only
    return {"driver": "file", "filename": config.image, "discard": config.discard,
            "read-only": read_only, "cache": cache}, read_only


async def _probe(config: Config) -> str:
    """The format of an image file given without -f, as qemu-nbd probes it."""
    try:
        probe = FileNode(config.image, read_only=True)
    except OSError as err:
        raise UsageError(f"Could not open '{config.image}': {err.strerror or err}") from None
    try:
        fmt = await probe_format(probe)
    finally:
        await probe.close()
    return fmt


async def blockdev_options(config: Config) -> dict[str, Any]:
    """The nodes qemu-nbd would build for IMAGE, as blockdev options: a format node
    (raw, with ``-o``'s window, or qcow2, which opens its backing chain) over the
    image's protocol node.  Without -f an image file's format is probed."""
    protocol, read_only = _protocol_options(config)
    if config.snapshot:  # -s: the image is the overlay's backing, never written
        protocol["read-only"] = read_only = True
    fmt, probed = config.fmt, False
    if fmt is None and protocol["driver"] == "file":
        fmt = await _probe(config)
        probed = fmt == "raw"
    options: dict[str, Any] = {"driver": fmt or "raw", "read-only": read_only,
                               "file": protocol}
    if config.offset:
        if options["driver"] != "raw":
            raise UsageError(f"-o/--offset is for raw images; '{config.image}' is "
                             f"{options['driver']}")
        options["offset"] = config.offset
    if probed:
        options["x-probed"] = True
    if config.load_snapshot is not None:  # -l: the format node loads it (or refuses)
        options["x-snapshot"] = config.load_snapshot
    return options


def _top_filters(config: Config, graph: BlockGraph, node: Node) -> Node:
    """``--detect-zeroes`` and ``--cache``'s writethrough over the node exported, where
    qemu-nbd sets them (its top node, and the BlockBackend's write cache)."""
    if config.detect_zeroes != "off":
        node = DetectZeroesFilter(node, unmap=config.detect_zeroes == "unmap")
        graph.add(node, graph.generated_name())
    if config.cache in ("writethrough", "directsync"):
        node = WritethroughFilter(node)
        graph.add(node, graph.generated_name())
    return node


def _tracked(config: Config, graph: BlockGraph, node: Node) -> Node:
    """A tracking filter right over the image's format node when the export writes to
    it and the node has dirty bitmaps (persistent ones loaded, or -B's): as in
    qemu-nbd, every write is recorded in the node's enabled bitmaps."""
    if config.read_only or config.snapshot or not node.bitmaps:
        return node
    tracking = TrackingFilter(node)
    graph.add(tracking, graph.generated_name())
    return tracking


def export_bitmaps(config: Config, image: Node) -> list[DirtyBitmap]:
    """-B's bitmaps, found as qemu-nbd finds them (``nbd_export_create``): on the
    image's format node, else down its backing chain; ``UsageError`` in its words."""
    found: list[DirtyBitmap] = []
    for name in config.bitmaps:
        node: Node | None = image
        while node is not None:
            bitmap = node.bitmaps.get(name) if node.bitmaps is not None else None
            if bitmap is not None:
                break
            node = node.children.get("backing")
        if node is None or bitmap is None:
            raise UsageError(f"Bitmap '{name}' is not found")
        if config.read_only and node.capabilities.can_write and bitmap.enabled:
            raise UsageError(f"Enabled bitmap '{name}' incompatible with readonly export")
        if bitmap.inconsistent:
            raise UsageError(f"Bitmap '{name}' is inconsistent and cannot be used")
        found.append(bitmap)
    return found


async def open_graph(config: Config) -> tuple[BlockGraph, Node]:
    """``open_export`` without the bitmaps: the graph and the node to export."""
    graph, node, _ = await open_export(config)
    return graph, node


async def open_export(config: Config) -> tuple[BlockGraph, Node, list[DirtyBitmap]]:
    """Build the image's nodes (a tracking filter, ``-s``'s overlay and the filters of
    --detect-zeroes, --cache and --fault over them); the graph, the node to export
    and -B's bitmaps.  ``UsageError`` (one line) if the image cannot be opened."""
    graph = BlockGraph()
    opened: list[Node] = []
    options = await blockdev_options(config)
    try:
        node = add_all(graph, await build(graph, options, opened))
    except BlockdevError as err:
        for each in reversed(opened):
            await each.close()
        if config.image.startswith(MEMORY_PREFIX):
            raise UsageError(f"bad memory disk size: {err}") from None
        raise UsageError(str(err)) from None
    try:
        bitmaps = export_bitmaps(config, node)
    except UsageError:
        await graph.close()
        raise
    node = _tracked(config, graph, node)
    if options.get("x-probed") and not config.snapshot:  # one line, once it opens
        print(f"pynbd: no format given for '{config.image}': probed raw; writes to its "
              "first sector are restricted (give -f raw to lift this)", file=sys.stderr)
    if config.snapshot:  # writes go to a temporary overlay (never to the image)
        from ..block.overlay import OverlayError, open_overlay

        try:
            node = await open_overlay(graph, node,
                                      direct=config.cache in ("none", "directsync"))
        except OverlayError as err:
            await graph.close()
            raise UsageError(str(err)) from None
    node = _top_filters(config, graph, node)
    try:  # --filter's, in the order given
        node = await stack_filters(graph, node, config.filters, dict(config.throttle_groups))
    except BlockdevError as err:
        await graph.close()
        raise UsageError(str(err)) from None
    if config.faults:
        faults = FaultFilter(node, fault_rules(config.faults), seed=config.fault_seed)
        graph.add(faults, graph.generated_name())
        node = faults
        logging.getLogger("pynbd").info("fault injection: %d rule(s), seed %d",
                                        len(config.faults), faults.seed)
    return graph, node, bitmaps


def bind_socket(config: Config) -> socket.socket:
    """Bind and listen on the configured address; ``UsageError`` if impossible."""
    try:
        if config.socket_path is not None:
            return listen_unix(config.socket_path, replace_stale=True)
        return listen_tcp(config.bind, config.port)
    except OSError as err:
        where = config.socket_path or f"{config.bind}:{config.port}"
        raise UsageError(f"cannot listen on {where}: {err.strerror or err}") from None


#: qemu-nbd's words for an address option given to a socket-activated server
_ACTIVATION_CLASHES = {
    "-k": "Unix socket can't be set when using socket activation",
    "-b": "The interface can't be set when using socket activation",
    "-p": "TCP port number can't be set when using socket activation",
}


def listening_sockets(config: Config) -> list[socket.socket]:
    """The sockets to serve on: the one systemd passed (socket activation, as
    qemu-nbd: ``LISTEN_PID``/``LISTEN_FDS`` name this process, and none of
    -k, -b, -p is given), or the configured address, bound here."""
    count = activation_count()
    if not count:
        return [bind_socket(config)]
    if config.listen_options:
        raise UsageError(_ACTIVATION_CLASHES[config.listen_options[0]])
    if count > 1:
        raise UsageError("pynbd does not support socket activation with LISTEN_FDS > 1")
    try:
        return inherited_sockets()
    except ActivationError as err:
        raise UsageError(str(err)) from None


def inetd_socket() -> socket.socket:
    """``--inetd``: the client's connection, given as standard input (and output).

    Standard input and output are pointed at /dev/null afterwards, so that the
    returned socket is the only hold on the connection and closing it ends it.
    """
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        raise UsageError("--inetd: standard input is not a socket") from None
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        raise UsageError("--inetd: standard input is not a stream socket")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    sock.setblocking(False)
    return sock


def export_uri(config: Config, sock: socket.socket) -> str:
    """The NBD URI a client uses to reach the export."""
    name = urllib.parse.quote(config.export_name, safe="")
    scheme = "nbds" if config.tls_mode is TlsMode.REQUIRE else "nbd"
    if config.socket_path is not None or sock.family == socket.AF_UNIX:
        where = config.socket_path or sock.getsockname()
        path = urllib.parse.quote(os.path.abspath(where), safe="/")
        return f"{scheme}+unix:///{name}?socket={path}"
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{name}"


async def _main(config: Config, sockets: list[socket.socket],
                opened: tuple[BlockGraph, Node, list[DirtyBitmap]] | None = None) -> None:
    """Open the storage in the serving loop (unless ``opened``), say so, serve, then
    close it.  With ``--inetd`` ``sockets`` is the one client's connection."""
    graph, node, bitmaps = opened or await open_export(config)
    exporter = None
    if config.metrics is not None:  # before "ready": a bad address fails the start
        try:
            exporter = await start_exporter(config.metrics)
        except MetricsError as err:
            await graph.close(wait_at_stop)
            raise UsageError(str(err)) from None
    if config.pid_file:
        write_pid_file(config.pid_file)
    _signal_ready()
    notify_ready()  # systemd's Type=notify: clients can connect now
    await _serve(config, graph, node, bitmaps, sockets, exporter)


async def _serve(config: Config, graph: BlockGraph, node: Node, bitmaps: list[DirtyBitmap],
                 sockets: list[socket.socket], exporter: MetricsServer | None = None) -> None:
    exports = ExportTable()
    exports.add(Export(config.export_name, node, description=config.description,
                       read_only=config.read_only, multi_conn=config.shared != 1,
                       allocation_depth=config.allocation_depth, bitmaps=bitmaps))
    if exporter is not None:  # counting is on: the server made next counts every request
        exporter.exports = exports.list_exports
    server = Server(exports, max_connections=config.shared, persistent=config.persistent,
                    handshake_limit=config.handshake_limit, max_payload=config.max_payload,
                    tls=config.tls, tls_mode=config.tls_mode)
    # the first signal: drain, flush, exit 0
    handle_stop_signals(lambda: server.stopping, server.request_stop)
    if config.inetd:
        # one connection, already accepted: the server ends when it is gone,
        # whether or not the client got as far as negotiating
        conn = server.connection_class(server)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: conn,
                                                                 sock=sockets[0])
        conn.closed.add_done_callback(lambda _: server.request_stop())
    else:
        await server.start(sockets)
    await server.serve_until_stopped()
    await stop_exporter(exporter)
    # the connections are gone: flush and close the storage, saying what keeps it waiting
    await graph.close(wait_at_stop)


def _fork() -> int | None:
    """Fork; the parent gets the read end of a readiness pipe, the child ``None``."""
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        return read_fd
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    global _ready_fd
    _ready_fd = write_fd
    return None


#: the child's end of the readiness pipe, until it has answered
_ready_fd: int | None = None


def _signal_ready() -> None:
    global _ready_fd
    if _ready_fd is not None:
        os.write(_ready_fd, b"ok")
        os.close(_ready_fd)
        _ready_fd = None


def _signal_failed(message: str) -> None:
    global _ready_fd
    if _ready_fd is not None:
        os.write(_ready_fd, b"error:" + message.encode()[:_FAILURE_MESSAGE_MAX])
        os.close(_ready_fd)
        _ready_fd = None


def run(config: Config) -> int:
    """Serve until stopped; return the exit status."""
    setup_logging(config.verbose, "pynbd")
    prepare_process()
    if not config.fork:
        return _run_here(config)
    sockets = [inetd_socket()] if config.inetd else listening_sockets(config)
    if config.print_uri:
        print(export_uri(config, sockets[0]), flush=True)
    ready = _fork()
    if ready is not None:  # the parent: wait for the child, leave everything to it
        answer = os.read(ready, READY_ANSWER_MAX)
        if answer.startswith(b"error:"):
            print(f"pynbd: {answer[6:].decode(errors='replace')}", file=sys.stderr)
            os._exit(2)
        os._exit(0 if answer == b"ok" else 1)
    # the child opens the storage in its serving loop: neither librados's threads
    # nor the I/O pool's survive fork()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(config.poll_max_ns)) as runner:
            runner.run(_main(config, sockets))
    except UsageError as err:
        _signal_failed(str(err))
        raise
    finally:
        _clean_up(config, sockets)
    return 0


def _run_here(config: Config) -> int:
    """Serve without forking: the image is opened first, as qemu-nbd does, so a bad
    image is reported whatever the address, then the sockets are bound."""
    sockets: list[socket.socket] = []
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(config.poll_max_ns)) as runner:
            opened = runner.run(open_export(config))
            try:
                sockets = [inetd_socket()] if config.inetd else listening_sockets(config)
            except UsageError:
                runner.run(opened[0].close())
                raise
            if config.print_uri:
                print(export_uri(config, sockets[0]), flush=True)
            runner.run(_main(config, sockets, opened))
    finally:
        _clean_up(config, sockets)
    return 0


def _clean_up(config: Config, sockets: list[socket.socket]) -> None:
    """Close the sockets and remove the files the server made."""
    for sock in sockets:
        sock.close()
    if config.socket_path is not None and sockets:
        with contextlib.suppress(OSError):
            os.unlink(config.socket_path)
    if config.pid_file:
        with contextlib.suppress(OSError):
            os.unlink(config.pid_file)


def main(argv: Sequence[str]) -> int:
    """``pynbd [options] IMAGE``: parse, serve, and return the exit status."""
    try:
        return run(parse_args(argv))
    except UsageError as err:
        print(f"pynbd: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
