"""pynbd: a Network Block Device server with shared writable multi-conn exports."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
