"""The ``pynbd check`` command line: its options, their checks, and ``main``.

This module owns turning arguments into ``Settings`` (a bad command line is a
``pynbd.cmdline.UsageError``: one line, exit status 2), running the check and
printing the report, and the exit status: 0 pass, 1 violation or the server
failed during the run, 2 usage error, connection failure, or an export that
does not qualify.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import TYPE_CHECKING, Any

from ..block import parse_size
from ..client import parse_uri
from ..cmdline import Parser, UsageError
from .report import report, summary
from .runner import Settings, run_check

if TYPE_CHECKING:
    from collections.abc import Sequence

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value
    return parse


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pynbd check", description="Check that an NBD export shared by several "
               "connections behaves as one consistent disk (the multi-conn promise). "
               "It OVERWRITES the region it checks.")
    p.add_argument("uris", nargs="+", metavar="URI", help="NBD URI(s) of the same export")
    p.add_argument("--write", action="store_true",
                   help="required: allow the check to overwrite the region")
    p.add_argument("--connections", type=_positive(int), default=4, metavar="N",
                   help="connections to open, round-robin over the URIs (default 4)")
    p.add_argument("--seconds", type=_positive(float), default=10.0, metavar="S",
                   help="how long to run (default 10)")
    p.add_argument("--seed", type=int, default=None, metavar="K",
                   help="random seed (default: random, printed)")
    p.add_argument("--region", type=_size, default=None, metavar="BYTES",
                   help="bytes from offset 0 to check (default 64M or the export size)")
    p.add_argument("--block", type=_size, default=4096, metavar="BYTES",
                   help="block size, a multiple of 512 (default 4096)")
    p.add_argument("--inflight", type=_positive(int), default=8, metavar="N",
                   help="requests in flight per connection (default 8)")
    p.add_argument("--force", action="store_true",
                   help="check an export that does not advertise multi-conn anyway")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="TLS certificates for nbds URIs without tls-certificates=")
    return p


def parse_args(argv: Sequence[str]) -> Settings:
    ns = build_parser().parse_args(argv)
    if not ns.write:
        raise UsageError("refusing to run without --write: the check overwrites the region "
                         "it checks (64M or the whole export by default)")
    if ns.block % 512:
        raise UsageError(f"--block {ns.block}: must be a multiple of 512")
    for uri in ns.uris:
        try:
            parse_uri(uri, tls_certificates=ns.tls_certificates)
        except ValueError as err:
            raise UsageError(str(err)) from None
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(1 << 32)
    return Settings(uris=list(ns.uris), connections=ns.connections, seconds=ns.seconds,
                    seed=seed, region=ns.region, block=ns.block, inflight=ns.inflight,
                    force=ns.force, json=ns.json, tls_certificates=ns.tls_certificates)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pynbd check``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_args(args)
        started = time.monotonic()
        checker, region = asyncio.run(run_check(settings))
    except UsageError as err:
        print(f"pynbd check: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    result = summary(settings, checker, region, checker.outcome)
    result["wall_seconds"] = round(time.monotonic() - started, 3)
    if settings.json:
        print(json.dumps(result))
    else:
        print(report(result, checker))
    return EXIT_PASS if result["result"] == "pass" else EXIT_FAIL
