"""``pynbd [options] IMAGE``, the qemu-nbd compatible command: its options.

Rules of this module: ``parse_args`` turns the command line into a frozen
``Config`` or raises ``UsageError`` (one line, exit status 2) without touching
the image or the network; only the TLS files are loaded, so that unusable
credentials are a usage error.  ``pynbd.commands.run`` acts on the ``Config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..block.faults import FaultRule, parse_fault_spec
from ..block.filterspec import FilterSpec, parse_filters
from ..block.sizes import parse_size
from ..cmdline import Parser, UsageError
from ..proto.constants import MAX_PAYLOAD, MAX_PAYLOAD_LIMIT, MAX_STRING
from ..proto.handshake import TlsMode
from ..qmp.protocol import QMPError
from ..qmp.schema import parse_keyval
from ..server.metricsexport import address_argument
from ..server.polling import DEFAULT_POLL_MAX_NS
from ..server.tls import (
    AUTHZ_SIMPLE,
    TLS_CREDS_X509,
    TlsCredentials,
    TlsError,
    TlsObjectError,
    TlsObjectProblem,
    allowed_identities,
    credentials_from_objects,
)
from .common import POLL_HELP, poll_max_ns_arg

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..block.qcow2.snapshots import SnapshotRef
    from ..block.throttlemath import ThrottleLimits

DEFAULT_PORT = 10809
MEMORY_PREFIX = "memory:"
RBD_PREFIX = "rbd:"

#: how this command words the TLS object errors (``{id}``: the object's id)
_TLS_OBJECT_ERRORS = {
    TlsObjectProblem.NOT_CREDENTIALS: "object {id!r} is not tls-creds-x509",
    TlsObjectProblem.NOT_SERVER: "TLS credentials {id!r} are not for a server "
                                 "(endpoint must be server)",
    TlsObjectProblem.NO_DIR: "TLS credentials {id!r} need dir=DIR",
    TlsObjectProblem.NOT_AUTHZ: "--tls-authz {id!r} must name an authz-simple object "
                                "with identity=DN",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Everything the command line decides."""

    image: str
    read_only: bool = False
    #: -l: the internal snapshot of a qcow2 image to export (read-only), or None
    load_snapshot: SnapshotRef | None = None
    shared: int = 1
    persistent: bool = False
    export_name: str = ""
    description: str = ""
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    socket_path: str | None = None
    #: the image format (raw, qcow2); None: probed, as qemu-nbd does without -f
    fmt: str | None = None
    offset: int = 0
    #: -s: serve through a temporary qcow2 overlay, so that the image is never written
    snapshot: bool = False
    discard: str = "ignore"
    #: --cache: none, writeback, writethrough, directsync or unsafe (qemu-nbd's modes)
    cache: str = "writeback"
    #: --aio: only "threads" (file I/O in the shared thread pool)
    aio: str = "threads"
    #: --detect-zeroes: off, on (zero writes become write-zeroes) or unmap (that may trim)
    detect_zeroes: str = "off"
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
    #: which of -k, -b, -p were given (socket activation refuses them)
    listen_options: tuple[str, ...] = ()
    #: serve one client on standard input/output (--inetd)
    inetd: bool = False
    #: the largest request payload accepted, advertised as the maximum block size
    max_payload: int = MAX_PAYLOAD
    #: offer the qemu:allocation-depth metadata context (-A)
    allocation_depth: bool = False
    #: -B: dirty bitmaps to offer as qemu:dirty-bitmap:NAME contexts (found on the
    #: image's format node or down its backing chain)
    bitmaps: tuple[str, ...] = ()
    #: --metrics: serve Prometheus metrics on (host, port), counting every request
    metrics: tuple[str, int] | None = None
    #: --filter's filters, nearest the image first, and --object throttle-group's limits
    filters: tuple[FilterSpec, ...] = ()
    throttle_groups: tuple[tuple[str, ThrottleLimits], ...] = ()


def _nonneg_int(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
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


def _max_payload(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None
    if not 4096 <= value <= MAX_PAYLOAD_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be between 4K and {MAX_PAYLOAD_LIMIT >> 20}M")
    return value


def _snapshot_ref(text: str | None) -> SnapshotRef | None:
    """``-l``, as qemu-nbd reads it: ``snapshot.id=ID,snapshot.name=NAME`` (either or
    both; ``,,`` is a comma; the last of a key counts; a key alone means ``on``), or
    anything else as an ID or NAME (tried as an id first)."""
    if text is None:
        return None
    from ..block.qcow2.snapshots import SnapshotRef

    if not text.startswith("snapshot."):
        return SnapshotRef(either=text)
    values: dict[str, str] = {}
    for item in text.replace(",,", "\0").split(","):
        if not item:
            continue
        key, sep, value = item.replace("\0", ",").partition("=")
        if key not in ("snapshot.id", "snapshot.name"):
            raise UsageError(f"Failed in parsing snapshot param `{text}': "
                             f"Invalid parameter '{key}'")
        values[key] = value if sep else "on"
    return SnapshotRef(id=values.get("snapshot.id"), name=values.get("snapshot.name"))


#: --cache's modes as qemu-nbd takes them ("off" is qemu's other name for "none")
CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")


def _cache_mode(ns: argparse.Namespace, discard: str) -> str:
    """--cache (or -n), checked with --aio and --detect-zeroes as qemu-nbd checks them."""
    if ns.nocache and ns.cache is not None:
        raise UsageError("-n and --cache can only be specified once")
    cache = "none" if ns.nocache or ns.cache == "off" else ns.cache or "writeback"
    if ns.aio != "threads":
        raise UsageError(f"--aio={ns.aio} is not supported: pynbd does its file I/O in a "
                         "thread pool (--aio=threads, the default)")
    if ns.detect_zeroes == "unmap" and discard != "unmap":
        raise UsageError("setting detect-zeroes to unmap is not allowed without setting "
                         "discard operation to unmap")
    return str(cache)


def _listen_options(ns: argparse.Namespace) -> tuple[str, ...]:
    """Which of -k, -b, -p were given, refused with --inetd."""
    given = tuple(flag for flag, value in (("-k", ns.socket_path), ("-b", ns.bind),
                                          ("-p", ns.port)) if value is not None)
    if ns.inetd:
        clash = given + tuple(flag for flag, on in (("--fork", ns.fork), ("-t", ns.persistent),
                                                   ("--print-uri", ns.print_uri)) if on)
        if clash:
            raise UsageError(f"--inetd serves standard input: {clash[0]} does not apply")
    return given


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pynbd", description="Export a disk image over NBD "
               "(command line compatible with qemu-nbd).")
    p.add_argument("image", metavar="IMAGE",
                   help="raw image file or block device, memory:SIZE for a RAM disk, "
                   "rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER] for a Ceph RBD image, or "
                   "plugin:FILE_MODULE_OR_NAME[:CLASS][:KEY=VALUE...] for a Python storage "
                   "plugin (docs/plugins.md)")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-l", "--load-snapshot", metavar="SNAPSHOT",
                   help="export an internal snapshot of a qcow2 image, read-only: "
                   "snapshot.id=ID,snapshot.name=NAME (either or both) or ID_OR_NAME")
    p.add_argument("-s", "--snapshot", action="store_true",
                   help="serve through a temporary qcow2 overlay: writes go to it, never "
                   "to IMAGE, and are gone when the server exits")
    p.add_argument("-e", "--shared", type=_shared, default=1, metavar="NUM",
                   help="allow NUM simultaneous clients (default 1, 0 = unlimited)")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="keep serving after the last client disconnects")
    p.add_argument("-x", "--export-name", default="", metavar="NAME",
                   help='export name (default "")')
    p.add_argument("-D", "--description", default="", metavar="TEXT",
                   help="export description")
    p.add_argument("-p", "--port", type=_port, default=None,
                   help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("-b", "--bind", default=None, metavar="ADDR",
                   help="address to listen on (default 0.0.0.0)")
    p.add_argument("-k", "--socket", dest="socket_path", metavar="PATH",
                   help="listen on a Unix socket instead of TCP")
    p.add_argument("-f", "--format", dest="fmt", default=None, metavar="FORMAT",
                   help="image format: raw or qcow2 (default: probed from the image)")
    p.add_argument("-o", "--offset", type=_nonneg_int, default=0,
                   help="export the image starting at this byte offset")
    p.add_argument("-A", "--allocation-depth", action="store_true",
                   help="offer the qemu:allocation-depth metadata context")
    p.add_argument("-B", "--bitmap", dest="bitmaps", action="append", default=[],
                   metavar="NAME", help="offer the persistent dirty bitmap NAME of a qcow2 "
                   "image (or of its backing chain) as qemu:dirty-bitmap:NAME; may be "
                   "repeated")
    p.add_argument("--discard", choices=("ignore", "unmap", "off", "on"), default="ignore",
                   help="ignore (default) or unmap (pass trims to the image)")
    p.add_argument("--cache", choices=CACHE_MODES, metavar="MODE",
                   help="writeback (default), writethrough (each write durable before its "
                   "reply), none (O_DIRECT: bypass the host page cache), directsync (both) "
                   "or unsafe (flushes ignored)")
    p.add_argument("-n", "--nocache", action="store_true", help="the same as --cache=none")
    p.add_argument("--aio", choices=("threads", "native", "io_uring"), default="threads",
                   help="threads (default, the only mode: file I/O runs in a thread pool)")
    p.add_argument("--detect-zeroes", choices=("off", "on", "unmap"), default="off",
                   help="off (default), on (writes of zeroes become write-zeroes) or unmap "
                   "(and may punch holes; needs --discard=unmap)")
    p.add_argument("--rbd-lock", choices=("auto", "exclusive"), default="auto",
                   help="rbd: images: auto (default; writers share the image, librbd passes "
                   "its exclusive lock on demand) or exclusive (take the lock and keep it: "
                   "the only writer, other gateways read-only)")
    p.add_argument("--inetd", action="store_true",
                   help="serve one client on standard input/output (a connected socket, "
                   "as inetd or nbdkit -s) and exit when it leaves")
    p.add_argument("--max-payload", type=_max_payload, default=MAX_PAYLOAD, metavar="SIZE",
                   help="largest request accepted, advertised as the maximum block size "
                   f"(default 32M, at most {MAX_PAYLOAD_LIMIT >> 20}M)")
    p.add_argument("--fork", action="store_true",
                   help="run in the background once the server is ready")
    p.add_argument("--pid-file", metavar="PATH", help="write the server's pid here")
    p.add_argument("--handshake-limit", type=_seconds, default=10.0, metavar="SECONDS",
                   help="drop clients that take longer to negotiate (0 = never)")
    p.add_argument("--print-uri", action="store_true",
                   help="print the NBD URI of the export once listening")
    p.add_argument("--object", action="append", default=[], metavar="SPEC",
                   help="tls-creds-x509,id=ID,dir=DIR[,verify-peer=on] or "
                   "authz-simple,id=ID,identity=DN (as qemu-nbd), or "
                   "throttle-group,id=ID,limits.iops-total=N,limits.bps-total=SIZE,...")
    p.add_argument("--filter", action="append", default=[], metavar="SPEC",
                   help="a filter over the export (repeatable, the first nearest the image): "
                   "throttle,throttle-group=ID or throttle,iops-total=N,bps-total=SIZE,... "
                   "or log,logfile=PATH[,logappend=on] (docs/filters.md)")
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
    p.add_argument("--metrics", type=address_argument, metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (needs "
                   "pip install 'pynbd[metrics]'; docs/metrics.md)")
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
        if kind not in (TLS_CREDS_X509, AUTHZ_SIMPLE, "throttle-group"):
            raise UsageError(f"--object {spec}: unsupported object type {kind!r}")
        if object_id in objects:
            raise UsageError(f"--object {spec}: duplicate id {object_id!r}")
        objects[object_id] = (kind, props)
    return objects


def _tls_credentials(ns: argparse.Namespace) -> TlsCredentials:
    """``--tls-creds`` (an object id or a directory) with ``--tls-authz``."""
    objects = _parse_objects(ns.object)
    verify = bool(ns.tls_verify_peer)
    try:
        if ns.tls_creds in objects:
            creds = credentials_from_objects(objects, ns.tls_creds, ns.tls_authz,
                                             verify_peer=verify)
        elif os.path.isdir(ns.tls_creds):
            allowed = (None if ns.tls_authz is None
                       else allowed_identities(objects, ns.tls_authz))
            creds = TlsCredentials(ns.tls_creds, verify_peer=verify, allowed_dns=allowed)
        else:
            raise UsageError(f"--tls-creds {ns.tls_creds!r} is neither an --object id nor "
                             "a directory")
    except TlsObjectError as err:
        wording = _TLS_OBJECT_ERRORS.get(err.problem)  # None: worded as the error is
        message = str(err) if wording is None else wording.format(id=err.object_id)
        raise UsageError(message) from None
    try:
        creds.server_context()
    except TlsError as err:
        raise UsageError(f"TLS credentials: {err}") from None
    return creds


def _tls_settings(ns: argparse.Namespace) -> tuple[TlsCredentials | None, TlsMode]:
    creds: TlsCredentials | None = None
    if ns.tls_creds is not None:
        creds = _tls_credentials(ns)
    else:
        _parse_objects(ns.object)
        if ns.tls_authz is not None or ns.tls_verify_peer:
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
    if argv and argv[-1] == "--":  # ends the options, as getopt takes it (qemu-nbd)
        argv = argv[:-1]
    ns = build_parser().parse_args(argv)
    if ns.fmt not in (None, "raw", "qcow2"):
        raise UsageError(f"unsupported image format {ns.fmt!r} (raw or qcow2)")
    if ns.fmt == "qcow2" and (ns.image.startswith(MEMORY_PREFIX)):
        raise UsageError("a memory: disk is raw (-f qcow2 needs an image file)")
    if ns.socket_path is not None and not ns.socket_path:
        raise UsageError("socket path must not be empty")
    discard = {"off": "ignore", "on": "unmap"}.get(ns.discard, ns.discard)
    cache = _cache_mode(ns, discard)
    tls, tls_mode = _tls_settings(ns)
    for label, text in (("export name", ns.export_name), ("description", ns.description)):
        if len(text.encode("utf-8")) > MAX_STRING:
            raise UsageError(f"{label} is longer than {MAX_STRING} bytes")
    fault_rules(ns.fault)
    try:
        groups, filters = parse_filters(_parse_objects(ns.object), ns.filter)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if ns.fault_seed is not None and not ns.fault:
        raise UsageError("--fault-seed needs --fault")
    if ns.snapshot and ns.load_snapshot is not None:
        raise UsageError("-s/--snapshot and -l/--load-snapshot cannot be used together "
                         "(the temporary overlay has no internal snapshots to load)")
    return Config(
        image=ns.image, read_only=ns.read_only or ns.load_snapshot is not None,
        load_snapshot=_snapshot_ref(ns.load_snapshot),
        shared=ns.shared, persistent=ns.persistent,
        snapshot=ns.snapshot,
        export_name=ns.export_name, description=ns.description,
        port=DEFAULT_PORT if ns.port is None else ns.port,
        bind="0.0.0.0" if ns.bind is None else ns.bind,
        socket_path=ns.socket_path, fmt=ns.fmt, offset=ns.offset,
        rbd_lock=ns.rbd_lock, discard=discard, fork=ns.fork, pid_file=ns.pid_file,
        cache=cache, aio=ns.aio, detect_zeroes=ns.detect_zeroes,
        verbose=ns.verbose, metrics=ns.metrics,
        print_uri=ns.print_uri, handshake_limit=ns.handshake_limit, tls=tls,
        tls_mode=tls_mode, faults=tuple(ns.fault), fault_seed=ns.fault_seed,
        poll_max_ns=ns.poll_max_ns, listen_options=_listen_options(ns), inetd=ns.inetd,
        max_payload=ns.max_payload, allocation_depth=ns.allocation_depth,
        bitmaps=tuple(ns.bitmaps), filters=filters, throttle_groups=tuple(groups.items()))


def fault_rules(specs: Sequence[str]) -> list[FaultRule]:
    """The ``--fault`` specs as rules; ``UsageError`` names a bad one."""
    rules = []
    for spec in specs:
        try:
            rules.append(parse_fault_spec(spec))
        except ValueError as err:
            raise UsageError(f"--fault {spec}: {err}") from None
    return rules
