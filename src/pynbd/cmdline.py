"""What every pynbd command line shares: one usage error and the parser that raises it.

Rules of this module:
- A bad command line is a ``UsageError``: the command prints its message as one
  line naming the problem and exits with status 2.
- ``Parser`` is ``argparse.ArgumentParser`` that raises ``UsageError`` instead
  of printing usage and exiting, so each command decides how to report it.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class UsageError(Exception):
    """A bad command line; printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are ``UsageError``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)
