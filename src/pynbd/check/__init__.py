"""``pynbd check``: a multi-connection consistency checker for any NBD server.

It opens several connections to one export (spread round-robin over the
URIs given), zeroes a region, then runs a seeded random mix of reads,
writes (some FUA), trims, write-zeroes and flushes over whole blocks of that
region, several requests in flight per connection, and checks every block
every read returns.

The model (what a server advertising NBD_FLAG_CAN_MULTI_CONN promises:
connections share one view of the data, so a completed write is visible to
later reads on every connection):

- A logical clock ticks at each request sent and each reply received; every
  write-type operation on a block is kept with its send and completion times
  for as long as a read can still be judged against it.
- Every written block is tagged: its first 16 bytes are the 64-bit write id and
  the block number, the rest is derived from the id (and the seed), so every
  block read is traced to the write that produced it, to zeroes, or to neither.
- The region is zeroed (and flushed) on one connection first: zeroes are the
  block's "version 0", before the clock starts.
- A read R of a block may return the content left by any operation that is not
  superseded when R is sent (it completed before R was sent and no other write
  or zero to the block was sent after it completed and completed before R was
  sent), or by any operation concurrent with R (sent before R completed, not
  completed before R was sent).  A trim never supersedes anything and may
  leave zeroes.  When several contents are possible, a mix of them byte by
  byte (a torn read) is accepted too: NBD promises no atomicity.
- Anything else is a violation: the block's recent history is printed, exit 1.

FLUSH and FUA durability cannot be observed by reads: only visibility is
checked.  Exit status: 0 pass, 1 violation or the server failed during the run
(error reply, lost connection), 2 usage error, connection failure, or an export
that does not qualify (read-only, no multi-conn without ``--force``).

The package: ``model`` (operations, contents, the acceptance rule; pure),
``runner`` (connections and the workload), ``report`` (JSON and text) and
``command`` (the command line and ``main``).  This module re-exports their
public names.
"""

from __future__ import annotations

from .command import EXIT_FAIL, EXIT_PASS, EXIT_USAGE, build_parser, main, parse_args
from .model import GARBAGE, Model, Op, Violation, describe, saw
from .report import report, summary
from .runner import Checker, Outcome, Settings, run_check

__all__ = [
    "EXIT_FAIL",
    "EXIT_PASS",
    "EXIT_USAGE",
    "GARBAGE",
    "Checker",
    "Model",
    "Op",
    "Outcome",
    "Settings",
    "Violation",
    "build_parser",
    "describe",
    "main",
    "parse_args",
    "report",
    "run_check",
    "saw",
    "summary",
]
