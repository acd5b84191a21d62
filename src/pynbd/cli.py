"""``pynbd``: a qemu-nbd compatible command line.

Rules of this module: argument errors print one line (``pynbd: ...``) and exit
with status 2; the server prints nothing on success unless ``-v`` or
``--print-uri``.  Sockets are bound before any fork so that errors reach the
user's terminal and ``--fork`` returns only once clients can connect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import urllib.parse
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .backends import FileBackend, MemoryBackend, OffsetBackend, parse_size
from .backends.faults import FaultBackend, FaultRule, parse_fault_spec
from .proto.handshake import TlsMode
from .qmp.protocol import QMPError
from .qmp.schema import parse_keyval
from .server import Export, ExportTable, Server
from .server.malloc import tune_malloc
from .server.polling import DEFAULT_POLL_MAX_NS, MAX_POLL_NS, event_loop_factory
from .server.runtime import handle_stop_signals
from .server.tls import TlsCredentials, TlsError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .backends.base import Backend

DEFAULT_PORT = 10809
MEMORY_PREFIX = "memory:"
RBD_PREFIX = "rbd:"


class UsageError(Exception):
    """A bad command line; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Everything the command line decides."""

    image: str
    read_only: bool = False
    shared: int = 1
    persistent: bool = False
    export_name: str = ""
    description: str = ""
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    socket_path: str | None = None
    fmt: str = "raw"
    offset: int = 0
    discard: str = "ignore"
    fork: bool = False
    pid_file: str | None = None
    verbose: int = 0
    print_uri: bool = False
    handshake_limit: float = 10.0
    tls: TlsCredentials | None = None
    tls_mode: TlsMode = TlsMode.OFF
    #: --fault specs, as given (parsed again for each backend: rules keep hit counts)
    faults: tuple[str, ...] = ()
    fault_seed: int | None = None
    #: rbd images: "auto" (librbd passes the exclusive lock on demand) or "exclusive"
    rbd_lock: str = "auto"
    #: the event loop's adaptive polling limit (0: never poll)
    poll_max_ns: int = DEFAULT_POLL_MAX_NS


def _nonneg_int(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


POLL_HELP = ("poll for up to NS nanoseconds before the event loop sleeps, adapting to the "
             "load like qemu's iothread poll-max-ns (default "
             f"{DEFAULT_POLL_MAX_NS}; 0: never poll)")


def poll_max_ns_arg(text: str) -> int:
    """argparse type of ``--poll-max-ns`` (here and in ``pynbd daemon``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of nanoseconds {text!r}") from None
    if not 0 <= value <= MAX_POLL_NS:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and {MAX_POLL_NS}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def _shared(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid shared connection count {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"shared connection count {value} is negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pynbd", description="Export a disk image over NBD "
                "(command line compatible with qemu-nbd).")
    p.add_argument("image", metavar="IMAGE",
                   help="raw image file or block device, memory:SIZE for a RAM disk, or "
                   "rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER] for a Ceph RBD image")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-e", "--shared", type=_shared, default=1, metavar="NUM",
                   help="allow NUM simultaneous clients (default 1, 0 = unlimited)")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-x", "--export-name", default="", metavar="NAME",
                   help='export name (default "")')
    p.add_argument("-D", "--description", default="", metavar="TEXT",
                   help="export description")
    p.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("-b", "--bind", default="0.0.0.0", metavar="ADDR",
                   help="address to listen on (default 0.0.0.0)")
    p.add_argument("-k", "--socket", dest="socket_path", metavar="PATH",
                   help="listen on a Unix socket instead of TCP")
    p.add_argument("-f", "--format", dest="fmt", default="raw", metavar="FORMAT",
                   help="image format (raw)")
    p.add_argument("-o", "--offset", type=_nonneg_int, default=0,
                   help="export the image starting at this byte offset")
    p.add_argument("--discard", choices=("ignore", "unmap", "off", "on"), default="ignore",
                   help="ignore (default) or unmap (pass trims to the image)")
    p.add_argument("--rbd-lock", choices=("auto", "exclusive"), default="auto",
                   help="rbd: images: auto (default; writers share the image, librbd passes "
                   "its exclusive lock on demand) or exclusive (take the lock and keep it: "
                   "the only writer, other gateways read-only)")
    p.add_argument("--fork", action="store_true",
                   help="run in the background once the server is ready")
    p.add_argument("--pid-file", metavar="PATH", help="write the server's pid here")
    p.add_argument("--handshake-limit", type=_seconds, default=10.0, metavar="SECONDS",
                   help="drop clients that take longer to negotiate (0 = never)")
    p.add_argument("--print-uri", action="store_true",
                   help="print the NBD URI of the export once listening")
    p.add_argument("--object", action="append", default=[], metavar="SPEC",
                   help="tls-creds-x509,id=ID,dir=DIR[,verify-peer=on] or "
                   "authz-simple,id=ID,identity=DN (as qemu-nbd)")
    p.add_argument("--tls-creds", metavar="ID|DIR",
                   help="TLS credentials: an --object id, or a directory with ca-cert.pem, "
                   "server-cert.pem and server-key.pem")
    p.add_argument("--tls-authz", metavar="ID",
                   help="only allow client certificates named by this authz-simple object")
    p.add_argument("--tls", choices=("off", "on", "require"), dest="tls_mode",
                   help="TLS off, optional (on) or required (default with --tls-creds)")
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by the CA")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject faults (testing): cmd=read|write|flush|trim|zero|"
                   "block-status|cache|all (join several with +), errno=NAME, rate=0..1, "
                   "range=START-END, count=N, delay=SECONDS, seed=N; e.g. "
                   "cmd=read,errno=EIO,rate=0.5; may be repeated")
    p.add_argument("--fault-seed", type=int, metavar="N",
                   help="seed for the --fault rates (default: random, shown with -v)")
    p.add_argument("--poll-max-ns", type=poll_max_ns_arg, default=DEFAULT_POLL_MAX_NS,
                   metavar="NS", help=POLL_HELP)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr")
    p.add_argument("-V", "--version", action="version", version=f"pynbd {__version__}")
    return p


def _parse_objects(specs: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """qemu's ``--object TYPE,id=ID,key=value,...`` (",," is a literal comma)."""
    objects: dict[str, tuple[str, dict[str, Any]]] = {}
    for spec in specs:
        kind, _, rest = spec.partition(",")
        if kind.startswith("qom-type="):
            kind = kind[len("qom-type="):]
        try:
            props = parse_keyval(rest)
        except QMPError as err:
            raise UsageError(f"--object {spec}: {err.desc}") from None
        object_id = props.pop("id", None)
        if not isinstance(object_id, str) or not object_id:
            raise UsageError(f"--object {spec}: parameter 'id' is missing")
        if kind not in ("tls-creds-x509", "authz-simple"):
            raise UsageError(f"--object {spec}: unsupported object type {kind!r}")
        if object_id in objects:
            raise UsageError(f"--object {spec}: duplicate id {object_id!r}")
        objects[object_id] = (kind, props)
    return objects


def _tls_settings(ns: argparse.Namespace) -> tuple[TlsCredentials | None, TlsMode]:
    objects = _parse_objects(ns.object)
    creds: TlsCredentials | None = None
    verify = bool(ns.tls_verify_peer)
    if ns.tls_creds is not None:
        kind, props = objects.get(ns.tls_creds, ("", {}))
        if kind == "tls-creds-x509":
            if props.get("endpoint", "server") != "server":
                raise UsageError(f"TLS credentials {ns.tls_creds!r} are not for a server "
                                 "(endpoint must be server)")
            directory = props.get("dir")
            if not isinstance(directory, str):
                raise UsageError(f"TLS credentials {ns.tls_creds!r} need dir=DIR")
            flag = str(props.get("verify-peer", "off")).lower()
            if flag not in ("on", "off", "yes", "no", "true", "false"):
                raise UsageError(f"verify-peer={flag!r}: expected on or off")
            verify = verify or flag in ("on", "yes", "true")
        elif kind:
            raise UsageError(f"object {ns.tls_creds!r} is not tls-creds-x509")
        elif os.path.isdir(ns.tls_creds):
            directory = ns.tls_creds
        else:
            raise UsageError(f"--tls-creds {ns.tls_creds!r} is neither an --object id nor "
                             "a directory")
        allowed: frozenset[str] | None = None
        if ns.tls_authz is not None:
            kind, props = objects.get(ns.tls_authz, ("", {}))
            if kind != "authz-simple" or not isinstance(props.get("identity"), str):
                raise UsageError(f"--tls-authz {ns.tls_authz!r} must name an authz-simple "
                                 "object with identity=DN")
            allowed = frozenset({props["identity"]})
        creds = TlsCredentials(directory, verify_peer=verify, allowed_dns=allowed)
        try:
            creds.server_context()
        except TlsError as err:
            raise UsageError(f"TLS credentials: {err}") from None
    elif ns.tls_authz is not None or ns.tls_verify_peer:
        raise UsageError("--tls-authz and --tls-verify-peer need --tls-creds")
    mode = TlsMode(ns.tls_mode) if ns.tls_mode else (
        TlsMode.REQUIRE if creds else TlsMode.OFF)
    if mode is not TlsMode.OFF and creds is None:
        raise UsageError(f"--tls={mode.value} needs --tls-creds")
    if mode is TlsMode.OFF:
        creds = None
    return creds, mode


def parse_args(argv: Sequence[str]) -> Config:
    """Turn the command line into a ``Config``; raise ``UsageError`` on bad input."""
    ns = build_parser().parse_args(argv)
    if ns.fmt != "raw":
        raise UsageError(f"unsupported image format {ns.fmt!r} (only raw is supported)")
    if ns.socket_path is not None and not ns.socket_path:
        raise UsageError("socket path must not be empty")
    discard = {"off": "ignore", "on": "unmap"}.get(ns.discard, ns.discard)
    tls, tls_mode = _tls_settings(ns)
    for label, text in (("export name", ns.export_name), ("description", ns.description)):
        if len(text.encode("utf-8")) > 4096:
            raise UsageError(f"{label} is longer than 4096 bytes")
    _fault_rules(ns.fault)
    if ns.fault_seed is not None and not ns.fault:
        raise UsageError("--fault-seed needs --fault")
    return Config(
        image=ns.image, read_only=ns.read_only, shared=ns.shared, persistent=ns.persistent,
        export_name=ns.export_name, description=ns.description, port=ns.port,
        bind=ns.bind, socket_path=ns.socket_path, fmt=ns.fmt, offset=ns.offset,
        rbd_lock=ns.rbd_lock, discard=discard, fork=ns.fork, pid_file=ns.pid_file,
        verbose=ns.verbose,
        print_uri=ns.print_uri, handshake_limit=ns.handshake_limit, tls=tls,
        tls_mode=tls_mode, faults=tuple(ns.fault), fault_seed=ns.fault_seed,
        poll_max_ns=ns.poll_max_ns)


def _fault_rules(specs: Sequence[str]) -> list[FaultRule]:
    rules = []
    for spec in specs:
        try:
            rules.append(parse_fault_spec(spec))
        except ValueError as err:
            raise UsageError(f"--fault {spec}: {err}") from None
    return rules


def _open_rbd(config: Config) -> Backend:
    from .backends.rbd import RbdBackend, RbdSpecError, RbdUnavailable, parse_rbd_filename

    try:
        spec = parse_rbd_filename(config.image)
        return RbdBackend(spec, read_only=config.read_only, lock=config.rbd_lock,
                          discard=config.discard == "unmap")
    except (RbdSpecError, RbdUnavailable) as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(str(err.strerror)) from None


def open_backend(config: Config) -> Backend:
    """Open the image the config names; ``UsageError`` for a bad spec."""
    backend: Backend
    if config.image.startswith(MEMORY_PREFIX):
        try:
            backend = MemoryBackend(parse_size(config.image[len(MEMORY_PREFIX):]))
        except ValueError as err:
            raise UsageError(f"bad memory disk size: {err}") from None
    elif config.image.startswith(RBD_PREFIX):
        backend = _open_rbd(config)
    else:
        try:
            backend = FileBackend(config.image, read_only=config.read_only,
                                  discard=config.discard == "unmap")
        except OSError as err:
            raise UsageError(f"cannot open {config.image!r}: {err.strerror}") from None
    if config.offset:
        try:
            backend = OffsetBackend(backend, config.offset)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if config.faults:
        backend = FaultBackend(backend, _fault_rules(config.faults), seed=config.fault_seed)
        logging.getLogger("pynbd").info("fault injection: %d rule(s), seed %d",
                                        len(config.faults), backend.seed)
    return backend


def bind_socket(config: Config) -> socket.socket:
    """Bind and listen on the configured address; ``UsageError`` if impossible."""
    try:
        if config.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                if _is_socket(config.socket_path):
                    os.unlink(config.socket_path)
            sock.bind(config.socket_path)
        else:
            infos = socket.getaddrinfo(config.bind, config.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as err:
        where = config.socket_path or f"{config.bind}:{config.port}"
        raise UsageError(f"cannot listen on {where}: {err.strerror or err}") from None
    return sock


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.stat(path).st_mode)


def export_uri(config: Config, sock: socket.socket) -> str:
    """The NBD URI a client uses to reach the export."""
    name = urllib.parse.quote(config.export_name, safe="")
    scheme = "nbds" if config.tls_mode is TlsMode.REQUIRE else "nbd"
    if config.socket_path is not None:
        path = urllib.parse.quote(os.path.abspath(config.socket_path), safe="/")
        return f"{scheme}+unix:///{name}?socket={path}"
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{name}"


async def _serve(config: Config, backend: Backend, sock: socket.socket) -> None:
    exports = ExportTable()
    exports.add(Export(config.export_name, backend, description=config.description,
                       read_only=config.read_only, multi_conn=config.shared != 1))
    server = Server(exports, max_connections=config.shared, persistent=config.persistent,
                    handshake_limit=config.handshake_limit, tls=config.tls,
                    tls_mode=config.tls_mode)
    # the first signal: drain, flush, exit 0
    handle_stop_signals(lambda: server.stopping, server.request_stop)
    await server.start([sock])
    await server.serve_until_stopped()


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
        os.write(_ready_fd, b"error:" + message.encode()[:4000])
        os.close(_ready_fd)
        _ready_fd = None


def raise_fd_limit() -> None:
    """Let the server hold as many connections as the hard limit allows.

    The usual soft limit (1024 descriptors) would cap a server with ``-e 0``
    at about a thousand clients; servers commonly lift it to the hard limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def run(config: Config) -> int:
    """Serve until stopped; return the exit status."""
    logging.basicConfig(
        level=logging.DEBUG if config.verbose > 1 else
        logging.INFO if config.verbose else logging.WARNING,
        format="pynbd: %(message)s")
    raise_fd_limit()
    tune_malloc()
    # librados's threads do not survive fork(): with --fork, the child opens rbd images
    defer_open = config.fork and config.image.startswith(RBD_PREFIX)
    backend = None if defer_open else open_backend(config)
    sock = bind_socket(config)
    if config.print_uri:
        print(export_uri(config, sock), flush=True)
    if config.fork:
        ready = _fork()
        if ready is not None:  # the parent: wait for the child, leave everything to it
            answer = os.read(ready, 4096)
            if answer.startswith(b"error:"):
                print(f"pynbd: {answer[6:].decode(errors='replace')}", file=sys.stderr)
                os._exit(2)
            os._exit(0 if answer == b"ok" else 1)
    if backend is None:
        try:
            backend = open_backend(config)
        except UsageError as err:
            _signal_failed(str(err))
            raise
    try:
        if config.pid_file:
            with open(config.pid_file, "w") as fh:
                fh.write(f"{os.getpid()}\n")
        _signal_ready()
        with asyncio.Runner(loop_factory=event_loop_factory(config.poll_max_ns)) as runner:
            runner.run(_serve(config, backend, sock))
    finally:
        sock.close()
        if config.socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(config.socket_path)
        if config.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pynbd`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["daemon"]:
        from .daemon import main as daemon_main

        return daemon_main(args[1:])
    if args[:1] == ["tls-setup"]:
        from .tlssetup import main as tls_setup_main

        return tls_setup_main(args[1:])
    if args[:1] == ["check"]:
        from .check import main as check_main

        return check_main(args[1:])
    try:
        config = parse_args(args)
        return run(config)
    except UsageError as err:
        print(f"pynbd: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
