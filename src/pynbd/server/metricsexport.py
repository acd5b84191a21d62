"""The Prometheus exporter: ``GET /metrics`` served from the event loop.

This module owns the ``--metrics ADDR:PORT`` address syntax, the collector
that turns ``server.metrics``' counters into Prometheus metric families, and
a small HTTP server on the serving loop (``MetricsServer``) that answers each
scrape with ``prometheus_client``'s text (or OpenMetrics) exposition.

Rules of this module:
- ``prometheus_client`` is optional (``pip install 'pynbd[metrics]'``): it is
  imported only when an exporter starts or an address is checked, and its
  absence is one line (``MetricsError``, ``LIBRARY_MISSING``).
- A scrape reads the counters on the loop that writes them: nothing is
  locked, and no thread reads half-updated state.  The request path never
  sees the exporter.
- The HTTP server answers ``GET``/``HEAD`` of ``/metrics`` and ``/`` and
  nothing else (404, 405, 400); each connection gets one response, a request
  head is bounded in size and time, and ``close`` ends it all (the daemon's
  ``quit``, ``pynbd``'s exit).
- Starting an exporter turns request counting on for servers made from then
  on, and times rbd calls (``server.metrics``); stopping it stops the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from typing import TYPE_CHECKING, Any

from ..proto.constants import Errno
from . import metrics
from .listen import MAX_PORT, listen_tcp
from .metrics import (
    BOUNDS_NS,
    COMMAND_NAMES,
    DATA_COMMANDS,
    HANDSHAKE_FAILURES,
    RBD_CALLS,
    ExportView,
    Histogram,
    export_views,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from .export import Export
    from .metrics import ExportMetrics

log = logging.getLogger("pynbd.metrics")

LIBRARY_MISSING = ("metrics need the Python library prometheus-client "
                   "(pip install 'pynbd[metrics]')")
#: a request head larger than this, or slower than REQUEST_TIMEOUT, is dropped
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
_DIRECTIONS = (("read", COMMAND_NAMES.index("READ")), ("write", COMMAND_NAMES.index("WRITE")))
_REASONS = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


class MetricsError(Exception):
    """The exporter cannot start (one line: a bad address, or no library)."""


class MetricsBindError(MetricsError):
    """The address cannot be listened on (``where``, and why: ``reason``)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot listen on {where} for metrics: {reason}")
        self.where = where
        self.reason = reason


def require_prometheus(module: str = "") -> Any:
    """``prometheus_client`` (or its ``module``); ``MetricsError`` if it cannot be
    imported."""
    try:
        return importlib.import_module(f"prometheus_client{module and '.'}{module}")
    except ImportError:
        raise MetricsError(LIBRARY_MISSING) from None


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[V6ADDR]:PORT``; an empty ADDR is every IPv4 address) as
    (host, port); ``ValueError`` with a one-line message."""
    host, sep, port = text.rpartition(":")
    if not sep or not port:
        raise ValueError(f"expected ADDR:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port}")
    if not port.isdecimal():
        raise ValueError(f"invalid port {port!r}")
    if int(port) > MAX_PORT:
        raise ValueError(f"port {int(port)} is out of range 0-{MAX_PORT}")
    return host or "0.0.0.0", int(port)


def address_argument(text: str) -> tuple[str, int]:
    """``--metrics``' argparse type: the address, once the library is known present."""
    import argparse

    try:
        address = parse_address(text)
        require_prometheus()
    except (ValueError, MetricsError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return address


# -- the collector --------------------------------------------------------------------------


def _seconds(ns: int) -> float:
    return ns / 1e9


def _bucket_bounds() -> list[str]:
    go = require_prometheus("utils").floatToGoString
    return [go(_seconds(bound)) for bound in BOUNDS_NS] + ["+Inf"]


def _cumulative(bounds: list[str], counts: list[int]) -> list[tuple[str, float]]:
    total, out = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        out.append((bound, float(total)))
    return out


class Collector:
    """A ``prometheus_client`` collector reading ``server.metrics`` when scraped."""

    def __init__(self, source: Callable[[], list[ExportView]]) -> None:
        self.core = require_prometheus("core")
        self.source = source
        self.bounds = _bucket_bounds()

    def describe(self) -> list[Any]:
        return []  # registering must not scrape

    def collect(self) -> Iterator[Any]:
        core = self.core
        views = self.source()
        requests = core.CounterMetricFamily(
            "pynbd_requests", "NBD requests answered, by export and command",
            labels=["export", "command"])
        errors = core.CounterMetricFamily(
            "pynbd_request_errors", "NBD requests answered with an error, by errno",
            labels=["export", "command", "errno"])
        nbytes = core.CounterMetricFamily(
            "pynbd_bytes", "Payload bytes of successful READs (read) and WRITEs (write)",
            labels=["export", "direction"])
        durations = core.HistogramMetricFamily(
            "pynbd_request_duration_seconds",
            "Time from taking an NBD request to handing its reply to the socket",
            labels=["export", "command"])
        connections = core.GaugeMetricFamily(
            "pynbd_connections", "Clients in the transmission phase", labels=["export"])
        in_flight = core.GaugeMetricFamily(
            "pynbd_in_flight_requests", "Requests started and not yet answered",
            labels=["export"])
        for view in views:
            self._export(view, requests, errors, nbytes, durations)
            connections.add_metric([view.name], view.connections)
            in_flight.add_metric([view.name], view.in_flight)
        yield from (requests, errors, nbytes, durations, connections, in_flight)
        failures = core.CounterMetricFamily(
            "pynbd_handshake_failures", "Handshakes that ended without transmission",
            labels=["reason"])
        for reason, count in dict(HANDSHAKE_FAILURES).items():
            failures.add_metric([reason], count)
        yield failures
        rbd = core.HistogramMetricFamily(
            "pynbd_rbd_call_duration_seconds",
            "librbd aio calls, from their start to their completion reaching the loop",
            labels=["node"])
        for node, histogram in dict(RBD_CALLS).items():
            self._histogram(rbd, [node], histogram)
        yield rbd

    def _export(self, view: ExportView, requests: Any, errors: Any, nbytes: Any,
                durations: Any) -> None:
        m: ExportMetrics = view.metrics
        for cmd, name in enumerate(COMMAND_NAMES):
            count = m.requests(cmd)
            if count or cmd in DATA_COMMANDS:
                requests.add_metric([view.name, name], count)
            if count:
                durations.add_metric([view.name, name],
                                     _cumulative(self.bounds, m.histogram(cmd)),
                                     _seconds(m.time_ns(cmd)))
        for (cmd, errno), count in sorted(dict(m.errors).items()):
            errors.add_metric([view.name, COMMAND_NAMES[cmd], _errno_name(errno)], count)
        for direction, cmd in _DIRECTIONS:
            nbytes.add_metric([view.name, direction], m.byte_count(cmd))

    def _histogram(self, family: Any, labels: list[str], histogram: Histogram) -> None:
        family.add_metric(labels, _cumulative(self.bounds, histogram.buckets),
                          _seconds(histogram.sum_ns))


def _errno_name(errno: int) -> str:
    try:
        return Errno(errno).name
    except ValueError:
        return f"E{errno}"


# -- the HTTP server -----------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` on one TCP address, served by the running loop, for the
    exports ``exports()`` returns at each scrape (settable: none at first)."""

    def __init__(self, exports: Callable[[], Iterable[Export]] = tuple) -> None:
        prometheus = require_prometheus()
        self.exports = exports
        self.registry = prometheus.CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(lambda: export_views(self.exports())))
        with contextlib.suppress(Exception):  # process_*: best effort (Linux /proc)
            prometheus.ProcessCollector(registry=self.registry)
        self._encoder = require_prometheus("exposition").choose_encoder
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        #: where it listens (host, port), once started
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port`` (0: any free port); ``MetricsError`` if impossible."""
        try:
            sock = listen_tcp(host, port)
        except OSError as err:
            raise MetricsBindError(_where(host, port), str(err.strerror or err)) from None
        self.address = sock.getsockname()[:2]
        self._server = await asyncio.start_server(self._handle, sock=sock,
                                                  limit=MAX_REQUEST_HEAD)
        log.info("metrics: serving http://%s/metrics", _where(*self.address))

    async def close(self) -> None:
        """Stop listening and drop any scrape still connected."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                try:
                    method, status, headers, body = self._respond(head)
                except Exception:  # a collector bug must not end the exporter
                    log.exception("metrics: scrape failed")
                    method, status, headers, body = "", 500, {}, b"scrape failed\n"
                writer.write(_response(status, headers, body, send_body=method != "HEAD"))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass  # a client that went away or never sent a whole request head
        finally:
            self._writers.discard(writer)
            writer.close()

    def _respond(self, head: bytes) -> tuple[str, int, dict[str, str], bytes]:
        """The method, and the response's status, headers and body."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "", 400, {}, b"bad request\n"
        method, target = parts[0], parts[1]
        path = target.partition("?")[0]
        if path not in ("/metrics", "/"):
            return method, 404, {}, b"not found: try /metrics\n"
        if method not in ("GET", "HEAD"):
            return method, 405, {"Allow": "GET, HEAD"}, b"method not allowed\n"
        if path == "/":
            body = b"pynbd metrics: /metrics\n"
            headers = {"Content-Type": "text/plain; charset=utf-8"}
        else:
            fields = {name.strip().lower(): value.strip() for name, _, value in
                      (line.partition(":") for line in lines[1:] if line)}
            encoder, content_type = self._encoder(fields.get("accept", ""))
            body = encoder(self.registry)
            headers = {"Content-Type": content_type}
        return method, 200, headers, body


def _response(status: int, headers: dict[str, str], body: bytes, *, send_body: bool) -> bytes:
    reason = _REASONS.get(status, "OK")
    head = [f"HTTP/1.1 {status} {reason}", "Connection: close",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items())]
    if "Content-Type" not in headers:
        head.append("Content-Type: text/plain; charset=utf-8")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body if send_body else b"")


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_exporter(address: tuple[str, int],
                         exports: Callable[[], Iterable[Export]] = tuple) -> MetricsServer:
    """Turn counting on (for servers made from now on) and rbd call timing, and serve
    the counters of ``exports()`` (``MetricsServer.exports``, settable later) at
    ``http://ADDR:PORT/metrics``; ``MetricsError`` (one line) if it cannot."""
    exporter = MetricsServer(exports)
    await exporter.start(*address)
    metrics.set_counting(True)
    metrics.time_rbd_calls(True)
    return exporter


async def stop_exporter(exporter: MetricsServer | None) -> None:
    """Stop serving and timing rbd calls (requests are still counted); None: nothing."""
    if exporter is not None:
        metrics.time_rbd_calls(False)
        await exporter.close()
