"""The contract every block node keeps: it lives in ``pynbd.testing.contract`` (which
the storage plugins' contract builds on) and is re-exported here under its old
names."""

from __future__ import annotations

from pynbd.testing.contract import ROUNDTRIP_CASES, NodeContract, _offered

__all__ = ["ROUNDTRIP_CASES", "NodeContract", "_offered"]
