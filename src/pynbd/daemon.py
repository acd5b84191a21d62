"""``pynbd daemon``: a storage daemon driven by QMP, like qemu-storage-daemon.

Start-up options mirror the QMP commands and run through the same engine:
``--blockdev`` is ``blockdev-add``, ``--nbd-server`` is ``nbd-server-start``
(with qemu-storage-daemon's flat ``addr.type=unix,addr.path=...`` form) and
``--export`` is ``block-export-add``.  A bad option prints one line and exits
with status 2.  The daemon runs until QMP ``quit``, SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

from . import __version__
from .cmdline import Parser, UsageError
from .commands.common import (
    POLL_HELP,
    poll_max_ns_arg,
    prepare_process,
    setup_logging,
    write_pid_file,
)
from .qmp import schema as s
from .qmp.commands.stats import metrics_start_arguments
from .qmp.engine import BLOCK_EXPORT_ADD, BLOCKDEV_ADD, OBJECT_ADD, Engine
from .qmp.protocol import QMPError
from .qmp.server import QMPServer
from .server.metrics import set_counting
from .server.polling import DEFAULT_POLL_MAX_NS, event_loop_factory
from .server.runtime import handle_stop_signals

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

#: qemu-storage-daemon's --nbd-server takes a flat SocketAddress
_NBD_SERVER_OPTS = s.Struct(
    {"addr": s.Union_("type", {
        "unix": s.Struct({"path": str}),
        "inet": s.Struct({"host": str, "port": str, "ipv4": bool, "ipv6": bool},
                         frozenset({"ipv4", "ipv6"}))}),
     "max-connections": int, "handshake-max-seconds": int, "tls-creds": str,
     "tls-authz": str},
    frozenset({"max-connections", "handshake-max-seconds", "tls-creds", "tls-authz"}))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pynbd daemon", description="Serve NBD exports managed over QMP "
               "(in the style of qemu-storage-daemon).")
    p.add_argument("--qmp", metavar="PATH", help="QMP server on this Unix socket")
    p.add_argument("--blockdev", action="append", default=[], metavar="OPTS",
                   help="add a block node, e.g. driver=file,node-name=n0,filename=disk.img")
    p.add_argument("--object", action="append", default=[], metavar="OPTS",
                   help="add an object, e.g. tls-creds-x509,id=tls0,dir=DIR,endpoint=server")
    p.add_argument("--nbd-server", metavar="OPTS",
                   help="start the NBD server, e.g. addr.type=unix,addr.path=/run/nbd.sock")
    p.add_argument("--export", action="append", default=[], metavar="OPTS",
                   help="add an export, e.g. type=nbd,id=e0,node-name=n0,writable=on")
    p.add_argument("--pid-file", metavar="PATH", help="write the daemon's pid here")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (needs "
                   "pip install 'pynbd[metrics]'; docs/metrics.md)")
    p.add_argument("--poll-max-ns", type=poll_max_ns_arg, default=DEFAULT_POLL_MAX_NS,
                   metavar="NS", help=POLL_HELP)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr")
    p.add_argument("-V", "--version", action="version", version=f"pynbd {__version__}")
    return p


def _blockdev_arguments(opts: dict[str, Any]) -> dict[str, Any]:
    opts = s.coerce(BLOCKDEV_ADD, opts)
    if isinstance(opts.get("file"), dict):  # a child given inline: file.driver=...
        opts["file"] = _blockdev_arguments(opts["file"])
    return opts


def _object_arguments(text: str) -> dict[str, Any]:
    """``TYPE,id=...`` (qemu's implied qom-type) as object-add arguments."""
    kind, _, rest = text.partition(",")
    args = s.parse_keyval(rest) if "=" not in kind else s.parse_keyval(text)
    if "=" not in kind:
        args["qom-type"] = kind
    coerced: dict[str, Any] = s.coerce(OBJECT_ADD, args)
    return coerced


def _nbd_server_arguments(text: str) -> dict[str, Any]:
    opts = s.check(_NBD_SERVER_OPTS, s.coerce(_NBD_SERVER_OPTS, s.parse_keyval(text)))
    addr = opts.pop("addr")
    kind = addr.pop("type")
    opts["addr"] = {"type": kind, "data": addr}
    return opts


async def _setup(engine: Engine, ns: argparse.Namespace) -> None:
    """Run the start-up options as QMP commands; ``UsageError`` on failure."""
    steps: list[tuple[str, str, Any]] = []
    if ns.metrics:
        steps.append(("--metrics", ns.metrics, metrics_start_arguments))
    steps += [("--object", text, _object_arguments) for text in ns.object]
    steps += [("--blockdev", text, lambda t: _blockdev_arguments(s.parse_keyval(t)))
              for text in ns.blockdev]
    if ns.nbd_server:
        steps.append(("--nbd-server", ns.nbd_server, _nbd_server_arguments))
    steps += [("--export", text, lambda t: s.coerce(BLOCK_EXPORT_ADD, s.parse_keyval(t)))
              for text in ns.export]
    commands = {"--object": "object-add", "--blockdev": "blockdev-add",
                "--nbd-server": "nbd-server-start", "--export": "block-export-add",
                "--metrics": "x-pynbd-metrics-start"}
    for option, text, convert in steps:
        try:
            await engine.execute(commands[option], convert(text))
        except QMPError as err:
            raise UsageError(f"{option} {text}: {err.desc}") from None


async def _run(ns: argparse.Namespace) -> None:
    set_counting(True)  # every request, for query-blockstats (and --metrics)
    engine = Engine()
    qmp: QMPServer | None = None
    # before any socket exists: a signal sent as soon as one appears must stop
    # the daemon in order, not kill it
    # the first signal stops in order, as ``quit`` does
    handle_stop_signals(engine.quit_requested.is_set, engine.quit_requested.set)
    try:
        await _setup(engine, ns)
        if ns.qmp:
            qmp = QMPServer(engine, ns.qmp)
            try:
                await qmp.start()
            except OSError as err:
                raise UsageError(f"cannot listen on {ns.qmp}: "
                                 f"{err.strerror or err}") from None
        if ns.pid_file:
            write_pid_file(ns.pid_file)
        await engine.quit_requested.wait()
    finally:
        if qmp is not None:
            qmp.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        await engine.close()
        if qmp is not None:
            await qmp.close()
        if ns.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(ns.pid_file)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pynbd daemon``."""
    try:
        ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if not (ns.qmp or ns.export):
            raise UsageError("nothing to do: give --qmp PATH and/or --export")
        setup_logging(ns.verbose, "pynbd daemon")
        prepare_process()
        with asyncio.Runner(loop_factory=event_loop_factory(ns.poll_max_ns)) as runner:
            runner.run(_run(ns))
    except UsageError as err:
        print(f"pynbd daemon: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
