"""The node contract's state machine: it lives in ``pynbd.testing.machine`` and is
re-exported here under its old names."""

from __future__ import annotations

from pynbd.testing.machine import NodeMachine, ranges

__all__ = ["NodeMachine", "ranges"]
