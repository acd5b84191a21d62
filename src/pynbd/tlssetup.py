"""``pynbd tls-setup DIR``: a private CA and certificates for local TLS use.

Writes qemu's x509 layout, which libnbd's ``tls-certificates=DIR`` also reads:
``ca-cert.pem`` (+ ``ca-key.pem``), ``server-cert.pem``, ``server-key.pem``,
``client-cert.pem``, ``client-key.pem``.  The work is done by the ``openssl``
command (no ASN.1 is written here).  Meant for tests and trials, not for
production PKI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

from .cmdline import Parser, UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_DAYS = 365


class SetupError(Exception):
    """Printed as one line; exit status 1 (openssl failed) unless ``status`` says.

    A bad command line is a ``UsageError`` instead (exit status 2).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SetupError("the openssl command is needed (Debian package openssl)")
    proc = subprocess.run([openssl, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise SetupError(f"openssl {args[0]}: {last}")


def _subject(common_name: str, organization: str) -> str:
    return f"/O={organization}/CN={common_name}"


def issue(directory: str, name: str, *, ca: str, ca_key: str, subject: str,
          extensions: str, days: int) -> None:
    """Create ``NAME-key.pem`` and ``NAME-cert.pem`` signed by the CA."""
    key = os.path.join(directory, f"{name}-key.pem")
    cert = os.path.join(directory, f"{name}-cert.pem")
    with tempfile.TemporaryDirectory() as tmp:
        csr = os.path.join(tmp, "req.csr")
        ext = os.path.join(tmp, "ext.cnf")
        with open(ext, "w") as fh:
            fh.write(extensions)
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", key, "-subj", subject, "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
                 "-CAcreateserial", "-out", cert, "-days", str(days), "-extfile", ext)
    os.chmod(key, 0o600)


def setup(directory: str, *, hostnames: Sequence[str], client_cn: str, days: int,
          organization: str = "pynbd test") -> None:
    """Create a CA, a server certificate for ``hostnames`` and a client certificate."""
    os.makedirs(directory, exist_ok=True)
    ca_key = os.path.join(directory, "ca-key.pem")
    ca = os.path.join(directory, "ca-cert.pem")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", ca_key, "-out", ca, "-days", str(days),
             "-subj", _subject(f"{organization} CA", organization),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    os.chmod(ca_key, 0o600)
    sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hostnames)
    issue(directory, "server", ca=ca, ca_key=ca_key,
          subject=_subject(hostnames[0], organization), days=days,
          extensions=("basicConstraints=critical,CA:FALSE\n"
                      "keyUsage=critical,digitalSignature,keyEncipherment\n"
                      f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n"))
    issue(directory, "client", ca=ca, ca_key=ca_key,
          subject=_subject(client_cn, organization), days=days,
          extensions=("basicConstraints=critical,CA:FALSE\n"
                      "keyUsage=critical,digitalSignature,keyEncipherment\n"
                      "extendedKeyUsage=clientAuth\n"))


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pynbd tls-setup``."""
    parser = Parser(prog="pynbd tls-setup",
                    description="Create a test CA, server and client certificates in DIR.")
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--hostname", action="append", default=[],
                        help="name or address the server certificate is for "
                        "(repeatable; default localhost and 127.0.0.1)")
    parser.add_argument("--client-cn", default="pynbd client",
                        help="common name of the client certificate")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS,
                        help=f"validity in days (default {DEFAULT_DAYS})")
    try:
        ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
        if ns.days < 1:
            raise UsageError("--days must be at least 1")
        setup(ns.directory, hostnames=ns.hostname or ["localhost", "127.0.0.1"],
              client_cn=ns.client_cn, days=ns.days)
    except UsageError as err:
        print(f"pynbd tls-setup: {err}", file=sys.stderr)
        return 2
    except SetupError as err:
        print(f"pynbd tls-setup: {err}", file=sys.stderr)
        return err.status
    except OSError as err:
        print(f"pynbd tls-setup: {err}", file=sys.stderr)
        return 1
    return 0
