"""Statistics commands: query-blockstats, and the Prometheus exporter's
x-pynbd-metrics-start, x-pynbd-metrics-stop and x-pynbd-query-metrics.

Rules of this module:
- ``query-blockstats`` answers as qemu 7.2 does (``BlockStats`` with
  ``BlockDeviceStats``) from the exports' counters (``pynbd.server.metrics``;
  the daemon counts every request from its start): one entry per node that
  has an export, ``device`` "" and the node's name as ``node-name``, no
  ``qdev`` (qemu's answer for a node used only by exports), the counts of
  all its exports added up.  With ``query-nodes`` every named node has an
  entry (no ``device``), with its exports' counts or zeroes.
- NBD commands map onto qemu's accounting as: READ is ``rd``; WRITE and
  WRITE_ZEROES are ``wr`` (``wr_bytes``: WRITE payloads only); FLUSH is
  ``flush``; TRIM is ``unmap``; CACHE and BLOCK_STATUS are not shown.
  ``failed_*`` count requests the node failed, ``invalid_*`` requests
  refused without reaching it (out of range, read-only export, shutdown);
  ``*_operations`` count only the successful ones; ``*_total_time_ns``
  include the failed ones (``account_failed`` is true).
- The exporter is the engine's (``Engine.metrics_exporter``): one at a time,
  stopped by ``close``; it exports every block export the engine has.
"""

from __future__ import annotations

from time import perf_counter_ns
from typing import TYPE_CHECKING

from ...proto.constants import Cmd
from ...server.listen import MAX_PORT
from ...server.metricsexport import (
    MetricsBindError,
    MetricsError,
    parse_address,
    start_exporter,
    stop_exporter,
)
from .. import schema as s
from ..protocol import generic_error
from . import JSON, NO_ARGS, Command

if TYPE_CHECKING:
    from ...block.node import Node
    from ...server import Export
    from ...server.metrics import ExportMetrics
    from ..engine import Engine

QUERY_BLOCKSTATS = s.Struct({"query-nodes": bool}, frozenset({"query-nodes"}))
METRICS_START = s.Struct({"addr": s.Union_("type", {
    "inet": s.Struct({"host": str, "port": str})})})

#: qemu's accounting classes and the NBD commands counted in each
_CLASSES = (("rd", (Cmd.READ,)), ("wr", (Cmd.WRITE, Cmd.WRITE_ZEROES)),
            ("flush", (Cmd.FLUSH,)), ("unmap", (Cmd.TRIM,)))
_BYTES = {"rd": Cmd.READ, "wr": Cmd.WRITE, "unmap": Cmd.TRIM}


def device_stats(counters: list[ExportMetrics]) -> dict[str, JSON]:
    """qemu's ``BlockDeviceStats`` of one node, from its exports' counters."""
    def total(field: str, cmds: tuple[Cmd, ...]) -> int:
        if field in ("requests", "byte_count", "time_ns"):  # methods, by command
            return sum(getattr(m, field)(cmd) for m in counters for cmd in cmds)
        return sum(getattr(m, field)[cmd] for m in counters for cmd in cmds)

    stats: dict[str, JSON] = {}
    for name, cmd in _BYTES.items():
        stats[f"{name}_bytes"] = total("byte_count", (cmd,))
    for name, cmds in _CLASSES:
        stats[f"{name}_operations"] = (total("requests", cmds) - total("failed", cmds)
                                       - total("invalid", cmds))
    for name, cmds in _CLASSES:
        stats[f"{name}_total_time_ns"] = total("time_ns", cmds)
    stats["wr_highest_offset"] = max((m.wr_highest_offset for m in counters), default=0)
    stats.update({"rd_merged": 0, "wr_merged": 0, "unmap_merged": 0})
    last = max((m.last_activity_ns() for m in counters), default=0)
    if last:
        stats["idle_time_ns"] = max(perf_counter_ns() - last, 0)
    for kind in ("failed", "invalid"):
        for name, cmds in _CLASSES:
            stats[f"{kind}_{name}_operations"] = total(kind, cmds)
    stats.update({"account_invalid": True, "account_failed": True, "timed_stats": []})
    return stats


def _exports_by_node(engine: Engine) -> list[tuple[Node, list[Export]]]:
    """The exported nodes, in the order their first export was added."""
    found: dict[int, tuple[Node, list[Export]]] = {}
    for entry in engine.exports.values():
        found.setdefault(id(entry.node), (entry.node, []))[1].append(entry.export)
    return list(found.values())


async def _query_blockstats(engine: Engine, args: dict[str, JSON]) -> JSON:
    exported = _exports_by_node(engine)
    if not args.get("query-nodes", False):
        return [{"device": "", "node-name": node.node_name,
                 "stats": device_stats([e.metrics for e in exports])}
                for node, exports in exported]
    by_node = {id(node): exports for node, exports in exported}
    return [{"node-name": node.node_name,
             "stats": device_stats([e.metrics for e in by_node.get(id(node), [])])}
            for node in engine.graph]


def _address(addr: dict[str, JSON]) -> tuple[str, int]:
    host, port = addr["host"], addr["port"]
    if not port.isdecimal() or int(port) > MAX_PORT:
        raise generic_error(f"Parameter 'addr.port' expects a port number 0-{MAX_PORT}")
    return host, int(port)


def metrics_start_arguments(text: str) -> dict[str, JSON]:
    """The daemon's ``--metrics ADDR:PORT`` as x-pynbd-metrics-start arguments."""
    try:
        host, port = parse_address(text)
    except ValueError as err:
        raise generic_error(str(err)) from None
    return {"addr": {"type": "inet", "host": host, "port": str(port)}}


async def _metrics_start(engine: Engine, args: dict[str, JSON]) -> JSON:
    if engine.metrics_exporter is not None:
        raise generic_error("The metrics exporter is already running")
    address = _address(args["addr"])
    try:
        engine.metrics_exporter = await start_exporter(
            address, lambda: [entry.export for entry in engine.exports.values()])
    except MetricsBindError as err:  # worded as nbd-server-start words it
        raise generic_error(f"Failed to bind socket to {err.where}: {err.reason}") from None
    except MetricsError as err:
        raise generic_error(str(err)) from None
    return {}


async def _metrics_stop(engine: Engine, args: dict[str, JSON]) -> JSON:
    exporter, engine.metrics_exporter = engine.metrics_exporter, None
    if exporter is None:
        raise generic_error("The metrics exporter is not running")
    await stop_exporter(exporter)
    return {}


async def _query_metrics(engine: Engine, args: dict[str, JSON]) -> JSON:
    exporter = engine.metrics_exporter
    if exporter is None:
        return {"active": False}
    host, port = exporter.address
    return {"active": True, "addr": {"type": "inet", "host": host, "port": str(port)}}


COMMANDS = (
    Command("query-blockstats", QUERY_BLOCKSTATS, _query_blockstats),
    Command("x-pynbd-metrics-start", METRICS_START, _metrics_start),
    Command("x-pynbd-metrics-stop", NO_ARGS, _metrics_stop),
    Command("x-pynbd-query-metrics", NO_ARGS, _query_metrics),
)
