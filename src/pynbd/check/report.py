"""The checker's report: the result as one JSON-ready dict, and as text.

This module owns what ``pynbd check`` tells the user once a run is over:
``summary`` (the verdict, the settings, counts, ops/s and the checker's own
CPU use, the first violations in full) and ``report`` (the same for people:
each violation with its reason and the block's history, then the verdict).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import Violation, describe, saw

if TYPE_CHECKING:
    from .runner import Checker, Outcome, Settings

#: history lines printed per violation
HISTORY_LINES = 40
#: violations printed in full
MAX_VIOLATIONS = 3


def summary(settings: Settings, checker: Checker, region: int,
            outcome: Outcome) -> dict[str, Any]:
    """The result of a run, as ``--json`` prints it."""
    ops = sum(outcome.counts.values())
    passed = not outcome.violations and not outcome.errors
    return {
        "result": "pass" if passed else "fail",
        "uris": settings.uris, "connections": settings.connections,
        "inflight": settings.inflight, "seed": settings.seed, "region": region,
        "block": settings.block, "seconds": round(outcome.elapsed, 3), "ops": ops,
        "ops_per_second": round(ops / outcome.elapsed, 1) if outcome.elapsed else 0.0,
        # the checker may set the pace: its CPU time, and what it needs per operation
        "checker_cpu_seconds": round(outcome.cpu, 3),
        "checker_cpu_share": round(outcome.cpu / outcome.elapsed, 3) if outcome.elapsed
        else 0.0,
        "checker_ops_per_cpu_second": round(ops / outcome.cpu, 1) if outcome.cpu else 0.0,
        "counts": dict(outcome.counts), "blocks_verified": checker.model.verified,
        "torn_reads": checker.model.torn,
        "violations": [v.as_dict() for v in outcome.violations[:MAX_VIOLATIONS]],
        "violation_count": len(outcome.violations), "errors": outcome.errors,
    }


def _history_lines(violation: Violation) -> list[str]:
    history = violation.history
    lines = [f"  history of block {violation.block} (logical clock; done '-' = no reply):",
             f"  {'op':>8} {'conn':>4} {'sent':>7} {'done':>7}  {'operation':<24} read"]
    hidden = violation.earlier + max(0, len(history) - HISTORY_LINES)
    if hidden:
        lines.append(f"  ... {hidden} earlier operations not shown")
        history = history[-HISTORY_LINES:]
    for op in history:
        done = "-" if op.done is None else str(op.done)
        mark = "   <== violation" if op is violation.read else ""
        lines.append(f"  {'#' + str(op.id):>8} {op.conn:>4} {op.send:>7} {done:>7}  "
                     f"{op.label():<24} {saw(op, violation.block) or ''}{mark}".rstrip())
    return lines


def report(result: dict[str, Any], checker: Checker) -> str:
    """The result of a run (``summary``'s dict) as text."""
    lines = []
    for violation in checker.outcome.violations[:MAX_VIOLATIONS]:
        read = violation.read
        allowed = ", ".join(describe(v) for v in violation.expected) or "nothing"
        lines.append(f"VIOLATION at block {violation.block} (offset {violation.offset}): "
                     f"READ #{read.id} on connection {read.conn} (sent t={read.send}, "
                     f"done t={read.done}) saw {describe(violation.seen)} "
                     f"(first bytes {violation.head.hex()})")
        lines.append(f"  {violation.reason}")
        lines.append(f"  allowed: {allowed}")
        lines += _history_lines(violation)
    lines += [f"ERROR: {error}" for error in result["errors"]]
    counts = result["counts"]
    verdict = "PASS" if result["result"] == "pass" else (
        f"FAIL: {result['violation_count']} violation(s), {len(result['errors'])} error(s)")
    lines += [
        f"pynbd check: {verdict}",
        f"  {result['connections']} connections over {len(result['uris'])} URI(s), "
        f"{result['inflight']} requests in flight each, seed {result['seed']}",
        f"  region {result['region']} bytes in {result['region'] // result['block']} "
        f"blocks of {result['block']}",
        f"  {result['ops']} operations in {result['seconds']:.2f} s: "
        f"{result['ops_per_second']:.0f} ops/s",
        f"  checker CPU {result['checker_cpu_seconds']:.2f} s "
        f"({result['checker_cpu_share']:.0%} of one core): "
        f"{result['checker_ops_per_cpu_second']:.0f} ops per CPU second",
        f"  read {counts['read']}, write {counts['write']}, write FUA {counts['write_fua']}, "
        f"write-zeroes {counts['zero']}, trim {counts['trim']}, flush {counts['flush']}",
        f"  blocks verified {result['blocks_verified']} (torn reads accepted "
        f"{result['torn_reads']})",
    ]
    return "\n".join(lines)
