"""X.509 credentials for STARTTLS, in qemu's directory layout.

Rules of this module: a credentials directory holds ``ca-cert.pem``,
``server-cert.pem`` and ``server-key.pem`` (qemu's ``tls-creds-x509`` with
``endpoint=server``).  TLS 1.2 is the oldest version offered.  With peer
verification the client must present a certificate signed by that CA; an
allow list further restricts which certificate subjects (distinguished names,
RFC 4514 order) are accepted.  ``credentials_from_objects`` reads qemu's
``tls-creds-x509`` and ``authz-simple`` objects (given with ``--object`` or
QMP ``object-add``) into ``TlsCredentials``; each front end words its errors.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

#: qemu's object types (qom-type) for server credentials and an allow list
TLS_CREDS_X509 = "tls-creds-x509"
AUTHZ_SIMPLE = "authz-simple"

#: the words qemu takes for a boolean property given as text
_FLAG_WORDS = {"on": True, "yes": True, "true": True, "off": False, "no": False,
               "false": False}

#: attribute names as RFC 4514 (and gnutls) print them
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "domainComponent": "DC", "userId": "UID", "emailAddress": "emailAddress",
}


class TlsError(Exception):
    """The credentials cannot be used; the message says why, in one line."""


@dataclasses.dataclass(frozen=True)
class TlsCredentials:
    """Server-side TLS settings.

    Args:
        directory: holds ca-cert.pem, server-cert.pem, server-key.pem.
        verify_peer: require a client certificate signed by the CA.
        allowed_dns: if set, only client certificates whose subject is one
            of these distinguished names are accepted (implies verify_peer).
    """

    directory: str
    verify_peer: bool = False
    allowed_dns: frozenset[str] | None = None

    def server_context(self) -> ssl.SSLContext:
        """An ``SSLContext`` for the server side; ``TlsError`` if files are unusable."""
        cert = os.path.join(self.directory, SERVER_CERT)
        key = os.path.join(self.directory, SERVER_KEY)
        ca = os.path.join(self.directory, CA_CERT)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(cert, key)
        except FileNotFoundError as err:
            # ssl leaves err.filename unset: name the file that is not there
            missing = err.filename or next(
                (path for path in (cert, key) if not os.path.exists(path)), f"{cert} / {key}")
            raise TlsError(f"missing {missing}") from None
        except (ssl.SSLError, OSError) as err:
            raise TlsError(f"cannot load {cert} / {key}: {err}") from None
        if self.verify_peer or self.allowed_dns is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_verify_locations(cafile=ca)
            except FileNotFoundError:
                raise TlsError(f"missing {ca} (needed to verify clients)") from None
            except (ssl.SSLError, OSError) as err:
                raise TlsError(f"cannot load {ca}: {err}") from None
        return ctx

    def authorize(self, peercert: dict[str, Any] | None) -> str | None:
        """``None`` if the peer may continue, else why it may not."""
        if self.allowed_dns is None:
            return None
        if not peercert:
            return "no client certificate"
        dn = subject_dn(peercert)
        if normalize_dn(dn) not in {normalize_dn(a) for a in self.allowed_dns}:
            return f"client certificate {dn!r} is not allowed"
        return None


class TlsObjectProblem(enum.Enum):
    """Which check of ``credentials_from_objects`` failed."""

    #: no tls-creds-x509 object has that id
    NOT_CREDENTIALS = "not-credentials"
    #: the credentials are not ``endpoint=server``
    NOT_SERVER = "not-server"
    #: the credentials have no ``dir=DIR``
    NO_DIR = "no-dir"
    #: ``verify-peer`` is neither on nor off
    BAD_VERIFY_PEER = "bad-verify-peer"
    #: no authz-simple object with an ``identity`` has that id
    NOT_AUTHZ = "not-authz"


class TlsObjectError(ValueError):
    """Objects that do not make server credentials.

    ``problem`` says which check failed and ``object_id`` names the object, so
    that a front end can word the error its own way; the message is QMP's.
    """

    def __init__(self, problem: TlsObjectProblem, object_id: str, message: str) -> None:
        super().__init__(message)
        self.problem = problem
        self.object_id = object_id


def credentials_from_objects(objects: Mapping[str, tuple[str, Mapping[str, Any]]],
                             creds_id: str, authz_id: str | None = None, *,
                             verify_peer: bool = False) -> TlsCredentials:
    """The server credentials that object ``creds_id`` (tls-creds-x509) describes.

    ``authz_id`` names an authz-simple object whose identity becomes the only
    allowed client; ``verify_peer`` turns peer verification on whatever the
    object says.  The files are not read here (``server_context`` does).
    Raises ``TlsObjectError``.
    """
    kind, props = objects.get(creds_id, ("", {}))
    if kind != TLS_CREDS_X509:
        raise TlsObjectError(TlsObjectProblem.NOT_CREDENTIALS, creds_id,
                             f"No TLS credentials with id '{creds_id}'")
    if props.get("endpoint", "server") != "server":
        raise TlsObjectError(TlsObjectProblem.NOT_SERVER, creds_id,
                             f"TLS credentials '{creds_id}' are not for a server")
    directory = props.get("dir")
    if not isinstance(directory, str):
        raise TlsObjectError(TlsObjectProblem.NO_DIR, creds_id,
                             f"TLS credentials '{creds_id}' need dir=DIR")
    flag = props.get("verify-peer", False)
    if not isinstance(flag, bool):  # text from a command line
        word = str(flag).lower()
        if word not in _FLAG_WORDS:
            raise TlsObjectError(TlsObjectProblem.BAD_VERIFY_PEER, creds_id,
                                 f"verify-peer={word!r}: expected on or off")
        flag = _FLAG_WORDS[word]
    allowed = None if authz_id is None else allowed_identities(objects, authz_id)
    return TlsCredentials(directory, verify_peer=verify_peer or flag, allowed_dns=allowed)


def allowed_identities(objects: Mapping[str, tuple[str, Mapping[str, Any]]],
                       authz_id: str) -> frozenset[str]:
    """The client identities that object ``authz_id`` (authz-simple) allows.

    Raises ``TlsObjectError`` (``NOT_AUTHZ``).
    """
    kind, props = objects.get(authz_id, ("", {}))
    identity = props.get("identity")
    if kind != AUTHZ_SIMPLE or not isinstance(identity, str):
        raise TlsObjectError(TlsObjectProblem.NOT_AUTHZ, authz_id,
                             f"No authorization object with id '{authz_id}'")
    return frozenset({identity})


def subject_dn(peercert: dict[str, Any]) -> str:
    """The subject of a certificate from ``getpeercert()`` as an RFC 4514 string."""
    parts = []
    for rdn in reversed(peercert.get("subject", ())):
        parts.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def normalize_dn(dn: str) -> str:
    """Compare DNs without caring about spaces after commas or attribute case."""
    out = []
    for part in _split_dn(dn):
        key, _, value = part.partition("=")
        out.append(f"{key.strip().upper()}={value.strip()}")
    return ",".join(out)


def _split_dn(dn: str) -> list[str]:
    parts, current, escaped = [], "", False
    for ch in dn:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == ",":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in parts if p.strip()]


def _escape(value: str) -> str:
    out = "".join("\\" + ch if ch in ',+"\\<>;=' else ch for ch in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out
