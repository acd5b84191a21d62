"""The asyncio shell: exports, connections, listeners and the server runtime."""

from __future__ import annotations

from .export import Export, ExportTable
from .runtime import Server

__all__ = ["Export", "ExportTable", "Server"]
