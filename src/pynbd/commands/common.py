"""What the server commands (``pynbd IMAGE`` and ``pynbd daemon``) share.

Rules of this module: option types raise ``argparse.ArgumentTypeError`` (the
parser turns it into a usage error); ``prepare_process`` runs once, before the
event loop, in the process that will serve.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

from ..server.malloc import tune_malloc
from ..server.polling import DEFAULT_POLL_MAX_NS, MAX_POLL_NS

POLL_HELP = ("poll for up to NS nanoseconds before the event loop sleeps, adapting to the "
             "load like qemu's iothread poll-max-ns (default "
             f"{DEFAULT_POLL_MAX_NS}; 0: never poll)")


def poll_max_ns_arg(text: str) -> int:
    """argparse type of ``--poll-max-ns``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of nanoseconds {text!r}") from None
    if not 0 <= value <= MAX_POLL_NS:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and {MAX_POLL_NS}")
    return value


def setup_logging(verbose: int, prefix: str) -> None:
    """Log to stderr as ``PREFIX: message``: warnings, ``-v`` info, ``-vv`` debug."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format=f"{prefix}: %(message)s")


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


def prepare_process() -> None:
    """Set a serving process up: the fd limit raised, the allocator tuned."""
    raise_fd_limit()
    tune_malloc()


def write_pid_file(path: str) -> None:
    """Write this process's pid, one line."""
    with open(path, "w") as fh:
        fh.write(f"{os.getpid()}\n")
