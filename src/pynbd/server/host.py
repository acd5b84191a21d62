"""What a connection needs from the server that accepted it: ``ConnectionHost``.

Rules of this module: the connection modules know the server only through
this interface, so they import nothing from ``server.runtime`` (which builds
connections); ``runtime.Server`` satisfies it, and a test may pass any object
that does.  Four bookkeeping calls, made once each per connection, never on
the request path, and the few settings the handshake reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import ssl

    from ..proto.handshake import TlsMode
    from .connection import Connection
    from .export import ExportTable
    from .tls import TlsCredentials


class ConnectionHost(Protocol):
    """The server side of a ``Connection``: its exports, its handshake settings,
    and the connection limit's and lifetime's bookkeeping."""

    @property
    def exports(self) -> ExportTable:
        """The exports on offer (the handshake's catalog; looked up again at GO)."""

    @property
    def tls_mode(self) -> TlsMode:
        """Whether STARTTLS is offered, and whether it is required."""

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context (set whenever ``tls_mode`` is not off)."""

    @property
    def tls(self) -> TlsCredentials | None:
        """The credentials, which authorize a client's certificate after TLS starts."""

    @property
    def handshake_limit(self) -> float:
        """Seconds a client may take to negotiate; 0 = no limit."""

    @property
    def max_payload(self) -> int:
        """The largest READ/WRITE payload, advertised as the maximum block size."""

    def admit(self, conn: Connection) -> str | None:
        """A new connection: ``None`` to serve it, or why it is refused."""

    def connection_gone(self, conn: Connection) -> None:
        """The connection's socket is gone (whether it was admitted or not)."""

    def client_started(self, conn: Connection) -> None:
        """The connection finished negotiating and entered transmission."""

    def client_finished(self, conn: Connection) -> None:
        """A connection that had entered transmission is gone."""
