"""A bounded LRU cache of metadata tables (L2 tables, refcount blocks), write-through.

Owns loading a table from the file once (concurrent loads of one table share
one read), keeping it in memory, and evicting the least recently used tables
beyond the byte budget.  Callers change a cached table in memory and write
the changed bytes to the file themselves (write-through), so evicting never
writes.  A table a writer holds across an ``await`` is pinned: it is never
evicted meanwhile, so every writer and reader of it shares one object.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..node import Node


class TableCache:
    """Cluster-sized tables of ``file``, by host offset, up to ``budget`` bytes."""

    def __init__(self, file: Node, table_size: int, budget: int) -> None:
        self.file = file
        self.table_size = table_size
        self.capacity = max(2, budget // table_size)
        self._tables: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self._loading: dict[int, asyncio.Future[bytearray]] = {}
        self._pins: collections.Counter[int] = collections.Counter()

    def cached(self, offset: int) -> bytearray | None:
        """The table at ``offset`` if it is in memory (no I/O)."""
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    async def get(self, offset: int) -> bytearray:
        """The table at ``offset``, read from the file if it is not in memory."""
        table = self.cached(offset)
        if table is not None:
            return table
        loading = self._loading.get(offset)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[bytearray] = asyncio.get_running_loop().create_future()
        self._loading[offset] = future
        try:
            table = bytearray(self.table_size)
            await self.file.pread(memoryview(table), offset)
        except BaseException as err:
            del self._loading[offset]
            future.set_exception(err if isinstance(err, Exception) else OSError("cancelled"))
            future.exception()  # retrieved: no "never retrieved" warning
            raise
        del self._loading[offset]
        self.put(offset, table)
        future.set_result(table)
        return table

    def put(self, offset: int, table: bytearray) -> None:
        """Cache ``table`` as the one at ``offset`` (a new table, or one just read)."""
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        self._evict()

    def drop(self, offset: int) -> None:
        """Forget the table at ``offset`` (its cluster was freed)."""
        self._tables.pop(offset, None)

    def pin(self, offset: int) -> None:
        self._pins[offset] += 1

    def unpin(self, offset: int) -> None:
        self._pins[offset] -= 1
        if self._pins[offset] <= 0:
            del self._pins[offset]
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used unpinned tables beyond the capacity; never the
        most recent one (just put: its caller is about to use it)."""
        excess = len(self._tables) - self.capacity
        if excess <= 0:
            return
        for offset in list(self._tables)[:-1]:
            if excess <= 0:
                break
            if offset not in self._pins:
                del self._tables[offset]
                excess -= 1
