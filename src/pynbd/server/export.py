"""Exports: the shared object every connection to one name goes through.

Rules of this module: an ``Export`` owns no per-connection state.  All
connections of an export (and every export of the same backend) call the same
backend object, so a completed write is visible to every other connection and
one flush covers every connection's completed writes.  That is the whole basis
of ``NBD_FLAG_CAN_MULTI_CONN``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pynbd.proto.constants import MAX_STRING, TransmissionFlag
from pynbd.proto.negotiated import transmission_flags

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pynbd.backends.base import Backend


class Export:
    """One named export of a backend.

    Args:
        name: the export name clients ask for ("" is the default export).
        backend: the storage; shared, never copied per connection.
        description: text for NBD_INFO_DESCRIPTION and LIST.
        read_only: refuse write-type commands even if the backend can write.
        multi_conn: the server lets more than one client connect, so the
            export may advertise CAN_MULTI_CONN (if the backend is consistent).
    """

    def __init__(self, name: str, backend: Backend, *, description: str = "",
                 read_only: bool = False, multi_conn: bool = False) -> None:
        for label, text in (("export name", name), ("description", description)):
            if len(text.encode("utf-8")) > MAX_STRING:
                raise ValueError(f"{label} is longer than {MAX_STRING} bytes")
            if "\0" in text:
                raise ValueError(f"{label} contains a NUL character")
        self._name = name
        self._description = description
        self.backend = backend
        self.read_only = read_only or not backend.capabilities.can_write
        self.multi_conn = multi_conn
        #: connections currently in the transmission phase on this export
        self.clients = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def size(self) -> int:
        return self.backend.size

    def transmission_flags(self, *, structured: bool) -> TransmissionFlag:
        caps = self.backend.capabilities
        return transmission_flags(
            read_only=self.read_only,
            can_flush=caps.can_flush,
            can_fua=caps.can_fua,
            can_fast_zero=caps.can_fast_zero,
            multi_conn=self.multi_conn and caps.can_multi_conn,
            structured=structured,
        )


class ExportTable:
    """The exports of one server, by name (the handshake's catalog)."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"export {export.name!r} already exists")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        return self._exports.pop(name)

    def lookup(self, name: str) -> Export | None:
        return self._exports.get(name)

    def list_exports(self) -> list[Export]:
        return list(self._exports.values())

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def backends(self) -> list[Backend]:
        """Each distinct backend once."""
        seen: dict[int, Backend] = {}
        for export in self._exports.values():
            seen.setdefault(id(export.backend), export.backend)
        return list(seen.values())
