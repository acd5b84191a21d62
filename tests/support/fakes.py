"""Test doubles for the protocol core: exports and a catalog, no backend behind them.

Import as ``from tests.support.fakes import FakeCatalog, FakeExport``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pynbd.proto.constants import BASE_ALLOCATION
from pynbd.proto.negotiated import transmission_flags

if TYPE_CHECKING:
    from pynbd.proto.constants import TransmissionFlag


@dataclasses.dataclass(frozen=True)
class FakeExport:
    """An ExportView with qemu's flag policy, or fixed flags if ``fixed`` is set."""

    name: str
    size: int = 1 << 20
    description: str = ""
    read_only: bool = False
    multi_conn: bool = True
    fixed: TransmissionFlag | None = None
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)

    def transmission_flags(self, *, structured: bool) -> TransmissionFlag:
        if self.fixed is not None:
            return self.fixed
        return transmission_flags(read_only=self.read_only, can_flush=True, can_fua=True,
                                  can_fast_zero=True, multi_conn=self.multi_conn,
                                  structured=structured)


class FakeCatalog:
    """The ExportCatalog protocol over a fixed set of exports."""

    def __init__(self, *exports: FakeExport) -> None:
        self._exports = {export.name: export for export in exports}

    def lookup(self, name: str) -> FakeExport | None:
        return self._exports.get(name)

    def list_exports(self) -> list[FakeExport]:
        return list(self._exports.values())
