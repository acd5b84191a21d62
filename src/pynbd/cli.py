"""``pynbd``: the entry point, dispatching to a command.

Rules of this module: it only picks the command and imports it when used, so
that each command starts without loading the others.  ``pynbd daemon``,
``pynbd check`` and ``pynbd tls-setup`` are subcommands; ``-L``/``--list``
lists a server's exports (``pynbd.commands.listing``); anything else is the
qemu-nbd compatible ``pynbd [options] IMAGE`` (``pynbd.commands``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pynbd`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = args[:1], args[1:]
    if command == ["daemon"]:
        from .daemon import main as daemon_main

        return daemon_main(rest)
    if command == ["tls-setup"]:
        from .tlssetup import main as tls_setup_main

        return tls_setup_main(rest)
    if command == ["check"]:
        from .check import main as check_main

        return check_main(rest)
    from .commands.listing import main as list_main
    from .commands.listing import wants_listing

    if wants_listing(args):
        return list_main(args)
    from .commands.run import main as serve_main

    return serve_main(args)
