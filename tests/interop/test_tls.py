"""TLS seen by real clients: libnbd (Python, nbdinfo, nbdcopy), qemu-img, qemu-io.

Certificates come from ``pynbd tls-setup`` (once per session); the odd ones
(a client certificate from another CA, an expired one, one with another
common name) are made with ``cryptography``, signed by the test CA.  The
STARTTLS injection tests (the CVE-2021-3716 class) speak NBD over a raw socket
and Python's ``ssl`` module, since no well-behaved client sends such bytes.
Every protocol number in the raw tests is written out from the NBD spec, not
taken from pynbd.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import nbd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from qemu.qmp import ExecuteError, QMPClient
from tests.support.interop import require_tool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1 << 20
#: bound for one client tool run
T = 30.0
#: bound for one raw socket read
SOCK_T = 10.0
#: bound for the server to exit after SIGTERM
EXIT_BOUND = 15.0
#: bound for retrying while the server has not yet seen a client leave
SETTLE = 10.0
#: the subject tls-setup gives the client certificate (RFC 4514 order)
CLIENT_DN = "CN=pynbd client,O=pynbd test"

# -- NBD numbers, from the protocol document --------------------------------------------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_STARTTLS = 5
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
FLAG_HAS_FLAGS = 1
FLAG_SEND_DF = 0x80
CMD_READ = 0
CMD_DISC = 2


# -- the shapes of conftest's servers (test modules cannot import conftest) --------------


class Endpoint(Protocol):
    """Where a pynbd server listens, and its process."""

    @property
    def uri(self) -> str: ...

    @property
    def socket(self) -> str | None: ...

    @property
    def proc(self) -> subprocess.Popen[Any]: ...


class RunningServer(Endpoint, Protocol):
    """conftest's ``RunningServer``."""

    def stop(self, sig: int = ..., timeout: float = ...) -> int: ...


if TYPE_CHECKING:
    ServerFactory = Callable[..., RunningServer]


# -- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Certificate directories, each in qemu's / libnbd's x509 layout."""

    #: pynbd tls-setup: CA, server (localhost, 127.0.0.1) and client certificates
    main: Path
    #: only the CA: a client with no certificate of its own
    ca_only: Path
    #: the main CA, with a client certificate from another CA
    foreign: Path
    #: the main CA, with an expired client certificate it signed
    expired: Path
    #: the main CA, with a valid client certificate for another common name
    other_cn: Path
    #: another tls-setup whose server certificate is for otherhost.example only
    wrong_host: Path
    #: the CA and the server key but no server-cert.pem: an unusable server dir
    no_server_cert: Path
    #: the CA and the server certificate but no server-key.pem
    no_server_key: Path


def tls_setup(directory: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pynbd", "tls-setup", str(directory), *args],
                          capture_output=True, text=True, timeout=T, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def client_dir(ca_dir: Path, dest: Path, *, cn: str = "pynbd client",
               expired: bool = False) -> Path:
    """``dest`` with ca-cert.pem from ``ca_dir`` and a client certificate it signed."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=2)
    else:
        start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pynbd test"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()))
    dest.mkdir()
    shutil.copy(ca_dir / "ca-cert.pem", dest / "ca-cert.pem")
    (dest / "client-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (dest / "client-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return dest


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    main, other, wrong_host = base / "main", base / "other", base / "wrong-host"
    tls_setup(main)
    tls_setup(other)
    tls_setup(wrong_host, "--hostname", "otherhost.example")
    for name in ("ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem",
                 "client-cert.pem", "client-key.pem"):
        assert (main / name).is_file(), name
    ca_only = base / "ca-only"
    ca_only.mkdir()
    shutil.copy(main / "ca-cert.pem", ca_only)
    foreign = base / "foreign"
    foreign.mkdir()
    shutil.copy(main / "ca-cert.pem", foreign)
    shutil.copy(other / "client-cert.pem", foreign)
    shutil.copy(other / "client-key.pem", foreign)
    no_server_cert = base / "no-server-cert"
    no_server_cert.mkdir()
    shutil.copy(main / "ca-cert.pem", no_server_cert)
    shutil.copy(main / "server-key.pem", no_server_cert)
    no_server_key = base / "no-server-key"
    no_server_key.mkdir()
    shutil.copy(main / "ca-cert.pem", no_server_key)
    shutil.copy(main / "server-cert.pem", no_server_key)
    return Pki(main=main, ca_only=ca_only, foreign=foreign, no_server_key=no_server_key,
               expired=client_dir(main, base / "expired", expired=True),
               other_cn=client_dir(main, base / "other-cn", cn="other client"),
               wrong_host=wrong_host, no_server_cert=no_server_cert)


# -- servers and clients ---------------------------------------------------------------------


def tls_server(pynbd_server: ServerFactory, creds: Path, *args: str, tcp: bool = False,
               shared: int = 0) -> RunningServer:
    """``pynbd -v -e SHARED --tls-creds DIR ARGS...`` (TLS required unless ARGS say
    otherwise).  Unlimited clients by default, so that a client that follows
    another never races the server's noticing that the first one left."""
    return pynbd_server("-v", "-e", str(shared), "--tls-creds", str(creds), *args, tcp=tcp)


def stop_and_log(srv: RunningServer) -> str:
    """Stop the server (it must still be running) and return its log."""
    assert srv.proc.poll() is None, "the server died"
    assert srv.stop() == 0
    assert srv.proc.stderr is not None
    return str(srv.proc.stderr.read())


def tcp_port(srv: Endpoint) -> int:
    port = urllib.parse.urlsplit(srv.uri).port
    assert port is not None
    return port


def with_certs(uri: str, certs: Path) -> str:
    """Add libnbd's ``tls-certificates=DIR`` to an NBD URI."""
    sep = "&" if "?" in uri else "?"
    return f"{uri}{sep}tls-certificates={certs}"


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    require_tool(cmd[0])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=T, check=False)


def libnbd(srv: Endpoint, certs: Path | None, *, name: str = "") -> Any:
    """A libnbd handle connected with TLS required (``certs``) or without TLS (None)."""
    h = nbd.NBD()
    if certs is None:
        h.set_tls(nbd.TLS_DISABLE)
    else:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certs))
    h.set_export_name(name)
    try:
        if srv.socket is not None:
            h.connect_unix(srv.socket)
        else:
            h.connect_tcp("127.0.0.1", str(tcp_port(srv)))
    except BaseException:
        close(h)
        raise
    return h


def close(h: Any) -> None:
    """Disconnect cleanly if connected (libnbd 1.14 handles have no close())."""
    with contextlib.suppress(nbd.Error):
        h.shutdown()


def connect_and_read(srv: Endpoint, certs: Path | None, *, name: str = "") -> None:
    h = libnbd(srv, certs, name=name)
    # a client whose certificate the server refuses may only see that when it
    # first reads after the TLS handshake: make it talk
    try:
        h.pread(512, 0)
    finally:
        close(h)


def libnbd_fails(srv: Endpoint, certs: Path | None, *, name: str = "") -> Any:
    """Connect with libnbd and read; it must fail.  Returns the nbd.Error."""
    with pytest.raises(nbd.Error) as info:
        connect_and_read(srv, certs, name=name)
    return info.value


def assert_good_client(srv: Endpoint, certs: Path, offset: int = 0, *,
                       name: str = "") -> None:
    """A TLS client with good credentials can write and read back."""
    h = libnbd(srv, certs, name=name)
    try:
        assert h.get_tls_negotiated() is True
        data = os.urandom(4 * KiB)
        h.pwrite(data, offset)
        assert h.pread(len(data), offset) == data
        h.shutdown()
    finally:
        close(h)
    assert srv.proc.poll() is None


def qemu_object(certs: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"]


def qemu_image_opts(srv: Endpoint, *, hostname: str | None = None,
                    tls: bool = True) -> str:
    """qemu's ``driver=nbd`` options; over a Unix socket the certificate is checked
    against ``hostname`` (default localhost), over TCP against the address unless
    ``hostname`` is given."""
    if srv.socket is not None:
        opts = f"driver=nbd,path={srv.socket}"
        hostname = hostname or "localhost"
    else:
        opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={tcp_port(srv)}"
    if tls:
        opts += ",tls-creds=tls0"
        if hostname:
            opts += f",tls-hostname={hostname}"
    return opts


def qemu_io(srv: Endpoint, certs: Path | None, *commands: str,
            hostname: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [a for c in commands for a in ("-c", c)]
    objects = qemu_object(certs) if certs is not None else []
    return run("qemu-io", *objects, "--image-opts",
               qemu_image_opts(srv, hostname=hostname, tls=certs is not None), *args)


# -- raw NBD over a socket -------------------------------------------------------------------

Conn = socket.socket | ssl.SSLSocket


def raw_connect(srv: Endpoint) -> socket.socket:
    if srv.socket is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(SOCK_T)
        sock.connect(srv.socket)
    else:
        sock = socket.create_connection(("127.0.0.1", tcp_port(srv)), timeout=SOCK_T)
    return sock


def recv_exact(sock: Conn, n: int) -> bytes:
    buf = b""
    for _ in range(n + 1):
        if len(buf) == n:
            return buf
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    raise AssertionError("unreachable")


def recv_until_eof(sock: Conn, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (bounded in size and time)."""
    buf = b""
    for _ in range(10_000):
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return buf
        if not chunk:
            return buf
        buf += chunk
        assert len(buf) < limit, "the server kept talking"
    raise AssertionError("the server never closed the connection")


def greet(sock: Conn) -> None:
    """Read the greeting; the client flags are sent by the caller."""
    greeting = recv_exact(sock, 18)
    assert greeting[:8] == NBDMAGIC
    assert struct.unpack(">Q", greeting[8:16])[0] == IHAVEOPT


CLIENT_FLAGS = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go_data(name: str = "") -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


def read_reply(sock: Conn) -> tuple[int, int, bytes]:
    magic, code, rep, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == REPLY_MAGIC
    return code, rep, recv_exact(sock, length)


def parse_replies(data: bytes) -> list[tuple[int, int]]:
    """(option, reply type) of each complete option reply in ``data``."""
    out = []
    pos = 0
    for _ in range(len(data)):
        if pos >= len(data):
            break
        assert len(data) - pos >= 20, f"partial reply: {data[pos:]!r}"
        magic, code, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REPLY_MAGIC, f"not an option reply: {data[pos:]!r}"
        out.append((code, rep))
        pos += 20 + length
    return out


def go_flags(sock: Conn) -> int:
    """Send GO for "" and return the export flags from its NBD_INFO_EXPORT."""
    sock.sendall(opt(OPT_GO, go_data()))
    flags = None
    for _ in range(10):
        code, rep, data = read_reply(sock)
        assert code == OPT_GO
        if rep == REP_ACK:
            assert flags is not None, "GO acknowledged without NBD_INFO_EXPORT"
            return flags
        assert rep == REP_INFO, f"GO failed: {rep:#x} {data!r}"
        if struct.unpack_from(">H", data)[0] == INFO_EXPORT:
            flags = int(struct.unpack(">HQH", data)[2])
    raise AssertionError("GO sent too many replies")


def read_request(cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, offset, length)


def disconnect(sock: Conn) -> None:
    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 99, 0, 0))


def client_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.main / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki.main / "client-cert.pem"), str(pki.main / "client-key.pem"))
    return ctx


def starttls(sock: socket.socket, pki: Pki) -> ssl.SSLSocket:
    sock.sendall(opt(OPT_STARTTLS))
    assert read_reply(sock) == (OPT_STARTTLS, REP_ACK, b"")
    return client_context(pki).wrap_socket(sock, server_hostname="localhost")


@pytest.fixture
def pattern_image(tmp_path: Path) -> Path:
    """4 MiB: 0x01 over the first 2 MiB, 0x02 over the rest."""
    path = tmp_path / "pattern.img"
    path.write_bytes(b"\x01" * (2 * MiB) + b"\x02" * (2 * MiB))
    return path


# -- URIs and the libnbd tools --------------------------------------------------------------


def test_print_uri_schemes(pynbd_server: ServerFactory, pki: Pki) -> None:
    unix = tls_server(pynbd_server, pki.main, "-x", "disk", "memory:1M")
    assert unix.uri == f"nbds+unix:///disk?socket={unix.socket}"
    tcp = tls_server(pynbd_server, pki.main, "memory:1M", tcp=True)
    assert tcp.uri == f"nbds://127.0.0.1:{tcp_port(tcp)}/"
    optional = tls_server(pynbd_server, pki.main, "--tls", "on", "memory:1M")
    assert optional.uri == f"nbd+unix:///?socket={optional.socket}"
    plain = pynbd_server("memory:1M")
    assert plain.uri.startswith("nbd+unix:///?socket=")


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdinfo_over_tls(pynbd_server: ServerFactory, pki: Pki, tcp: bool) -> None:
    srv = tls_server(pynbd_server, pki.main, "-x", "disk", "memory:3M", tcp=tcp)
    proc = run("nbdinfo", "--json", with_certs(srv.uri, pki.main))
    assert proc.returncode == 0, proc.stderr
    assert '"TLS": true' in proc.stdout
    assert '"export-name": "disk"' in proc.stdout
    assert '"export-size": 3145728' in proc.stdout
    listed = run("nbdinfo", "--list", with_certs(srv.uri, pki.main))
    assert listed.returncode == 0, listed.stderr
    assert 'export="disk"' in listed.stdout


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdcopy_in_and_out_over_tls(pynbd_server: ServerFactory, pki: Pki, tmp_path: Path,
                                     tcp: bool) -> None:
    srv = tls_server(pynbd_server, pki.main, "memory:2M", tcp=tcp)
    uri = with_certs(srv.uri, pki.main)
    data = os.urandom(2 * MiB)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    proc = run("nbdcopy", str(src), uri)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out.img"
    proc = run("nbdcopy", uri, str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == data
    # and a third client, libnbd's Python API, sees the same bytes
    h = libnbd(srv, pki.main)
    try:
        assert h.pread(4096, MiB) == data[MiB:MiB + 4096]
    finally:
        close(h)


# -- qemu ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_img_info_and_convert_over_tls(pynbd_server: ServerFactory, pki: Pki,
                                            tmp_path: Path, tcp: bool) -> None:
    srv = tls_server(pynbd_server, pki.main, "memory:1M", tcp=tcp)
    opts = qemu_image_opts(srv)
    info = run("qemu-img", "info", "--output=json", *qemu_object(pki.main), "--image-opts", opts)
    assert info.returncode == 0, info.stderr
    assert '"virtual-size": 1048576' in info.stdout
    data = os.urandom(MiB)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    proc = run("qemu-img", "convert", "-n", *qemu_object(pki.main), "-f", "raw", str(src),
               "--target-image-opts", opts)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out.img"
    proc = run("qemu-img", "convert", *qemu_object(pki.main), "--image-opts", opts,
               "-O", "raw", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == data


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_io_patterns_over_tls(pynbd_server: ServerFactory, pki: Pki, tcp: bool) -> None:
    srv = tls_server(pynbd_server, pki.main, "memory:4M", tcp=tcp)
    proc = qemu_io(srv, pki.main, "write -P 0x5a 0 64k", "write -P 0xa5 1M 128k",
                   "read -P 0x5a 0 64k")
    assert proc.returncode == 0, proc.stderr
    assert "Pattern verification failed" not in proc.stdout
    assert proc.stdout.count("wrote ") == 2
    # a second qemu-io connection reads what the first wrote
    proc = qemu_io(srv, pki.main, "read -P 0xa5 1M 128k", "read -P 0 64k 64k")
    assert proc.returncode == 0, proc.stderr
    assert "Pattern verification failed" not in proc.stdout
    assert "read 131072/131072 bytes at offset 1048576" in proc.stdout
    # the check really checks: a wrong pattern is noticed
    proc = qemu_io(srv, pki.main, "read -P 0x11 0 512")
    assert "Pattern verification failed" in proc.stdout + proc.stderr
    h = libnbd(srv, pki.main)
    try:
        assert h.pread(64 * KiB, 0) == b"\x5a" * (64 * KiB)
    finally:
        close(h)


# -- libnbd's Python API ------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_libnbd_python_tls_require(pynbd_server: ServerFactory, pki: Pki, tcp: bool) -> None:
    srv = tls_server(pynbd_server, pki.main, "memory:1M", tcp=tcp)
    h = libnbd(srv, pki.main)
    try:
        assert h.get_tls_negotiated() is True
        assert h.get_size() == MiB
        assert h.get_structured_replies_negotiated() is True
        h.pwrite(b"\xc3" * 8192, 4096)
        h.flush()
        assert h.pread(8192 + 2, 4095) == b"\0" + b"\xc3" * 8192 + b"\0"
        h.shutdown()
    finally:
        close(h)


def test_sigterm_with_an_idle_tls_client_connected_stops_the_server(
        pynbd_server: ServerFactory, pki: Pki) -> None:
    """The server does not wait long for a close_notify that an idle client never sends.

    (asyncio waits 30 s by default; the bound here is a liveness bound, half that.)
    """
    srv = tls_server(pynbd_server, pki.main, "memory:1M")
    h = libnbd(srv, pki.main)
    try:
        h.pwrite(b"\x44" * 512, 0)
        srv.proc.send_signal(signal.SIGTERM)
        try:
            status = srv.proc.wait(EXIT_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pynbd still running {EXIT_BOUND} s after SIGTERM")
        assert status == 0
        with pytest.raises(nbd.Error):
            h.pread(512, 0)
    finally:
        close(h)


# -- TLS required: plaintext clients get nothing ----------------------------------------------


def test_required_refuses_plaintext_libnbd(pynbd_server: ServerFactory, pki: Pki) -> None:
    srv = tls_server(pynbd_server, pki.main, "-x", "disk", "memory:1M")
    h = nbd.NBD()
    messages: list[str] = []
    h.set_debug(True)
    h.set_debug_callback(lambda _ctx, msg: messages.append(msg))
    h.set_tls(nbd.TLS_DISABLE)
    h.set_export_name("disk")
    sock = srv.socket
    assert sock is not None
    try:
        with pytest.raises(nbd.Error) as info:
            h.connect_unix(sock)
    finally:
        close(h)
    # libnbd 1.14 names the cause: ERR_TLS_REQD, reported as ENOTSUP
    assert info.value.errnum == errno.ENOTSUP
    assert "server requires TLS encryption first" in info.value.string
    assert any("TLS is required" in m for m in messages), messages
    assert_good_client(srv, pki.main, name="disk")


def test_required_refuses_plaintext_qemu_io(pynbd_server: ServerFactory, pki: Pki) -> None:
    srv = tls_server(pynbd_server, pki.main, "memory:1M")
    proc = qemu_io(srv, None, "read 0 512")
    assert proc.returncode != 0
    assert "read 512/512" not in proc.stdout
    assert "TLS negotiation required before option 7 (go)" in proc.stderr
    proc = qemu_io(srv, pki.main, "read 0 512")
    assert proc.returncode == 0, proc.stderr


def test_required_plaintext_list_reveals_no_names(pynbd_server: ServerFactory,
                                                  pki: Pki) -> None:
    srv = tls_server(pynbd_server, pki.main, "-x", "secret-export", "-D", "secret text",
                     "memory:1M")
    assert srv.socket is not None
    proc = run("nbdinfo", "--list", f"nbd+unix:///?socket={srv.socket}")
    assert proc.returncode != 0
    assert "secret" not in proc.stdout + proc.stderr
    # the same listing over TLS does show it
    proc = run("nbdinfo", "--list", with_certs(srv.uri, pki.main))
    assert proc.returncode == 0, proc.stderr
    assert 'export="secret-export"' in proc.stdout
    assert "secret text" in proc.stdout


def test_optional_tls_serves_plaintext_and_tls_at_once(pynbd_server: ServerFactory,
                                                       pki: Pki) -> None:
    srv = tls_server(pynbd_server, pki.main, "--tls", "on", "memory:1M")
    plain = libnbd(srv, None)
    secure = libnbd(srv, pki.main)
    try:
        assert plain.get_tls_negotiated() is False
        assert secure.get_tls_negotiated() is True
        plain.pwrite(b"\x11" * 4096, 0)
        secure.pwrite(b"\x22" * 4096, 4096)
        assert secure.pread(8192, 0) == b"\x11" * 4096 + b"\x22" * 4096
        assert plain.pread(8192, 0) == b"\x11" * 4096 + b"\x22" * 4096
    finally:
        close(plain)
        close(secure)
    proc = qemu_io(srv, None, "read -P 0x11 0 4k")
    assert proc.returncode == 0, proc.stderr
    proc = qemu_io(srv, pki.main, "read -P 0x22 4k 4k")
    assert proc.returncode == 0, proc.stderr


# -- client certificates ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["flag", "object"])
def test_verify_peer_accepts_the_right_client(pynbd_server: ServerFactory, pki: Pki,
                                              form: str) -> None:
    if form == "flag":
        srv = tls_server(pynbd_server, pki.main, "--tls-verify-peer", "memory:1M")
    else:
        srv = pynbd_server(
            "-v", "-e", "0", "--object",
            f"tls-creds-x509,id=tls0,dir={pki.main},endpoint=server,verify-peer=on",
            "--tls-creds", "tls0", "memory:1M")
    assert srv.uri.startswith("nbds+unix://")
    assert_good_client(srv, pki.main)
    proc = qemu_io(srv, pki.main, "read 0 512")
    assert proc.returncode == 0, proc.stderr
    # and one without a certificate is turned away: verification is on
    libnbd_fails(srv, pki.ca_only)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in stop_and_log(srv)


BAD_CLIENTS = [
    pytest.param("ca_only", "PEER_DID_NOT_RETURN_A_CERTIFICATE", id="no-client-cert"),
    pytest.param("foreign", "unable to get local issuer certificate", id="other-ca"),
    pytest.param("expired", "certificate has expired", id="expired"),
]


@pytest.mark.parametrize(("which", "reason"), BAD_CLIENTS)
def test_verify_peer_refuses_bad_clients(pynbd_server: ServerFactory, pki: Pki,
                                         which: str, reason: str) -> None:
    srv = tls_server(pynbd_server, pki.main, "--tls-verify-peer", "memory:1M")
    certs: Path = getattr(pki, which)
    libnbd_fails(srv, certs)
    assert_good_client(srv, pki.main)
    proc = qemu_io(srv, certs, "read 0 512")
    assert proc.returncode != 0
    assert "read 512/512" not in proc.stdout
    assert_good_client(srv, pki.main, offset=8192)
    log = stop_and_log(srv)
    assert log.count(reason) >= 2, log


def test_without_verify_peer_any_client_certificate_is_fine(pynbd_server: ServerFactory,
                                                            pki: Pki) -> None:
    """The control for the refusals above: they come from --tls-verify-peer."""
    srv = tls_server(pynbd_server, pki.main, "memory:1M")
    for certs in (pki.ca_only, pki.foreign, pki.expired):
        assert_good_client(srv, certs)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_wrong_server_hostname_fails_cleanly(pynbd_server: ServerFactory, pki: Pki,
                                             tcp: bool) -> None:
    srv = tls_server(pynbd_server, pki.wrong_host, "memory:1M", tcp=tcp)
    # over TCP qemu checks the address it connected to, over Unix tls-hostname
    proc = qemu_io(srv, pki.wrong_host, "read 0 512")
    assert proc.returncode == 1
    expected = "127.0.0.1" if tcp else "localhost"
    assert f"Certificate does not match the hostname {expected}" in proc.stderr
    assert "read 512/512" not in proc.stdout
    # the same certificate is fine for the name it was made for
    proc = qemu_io(srv, pki.wrong_host, "write -P 0x33 0 4k", hostname="otherhost.example")
    assert proc.returncode == 0, proc.stderr
    if tcp:
        # libnbd checks the address it connected to as well
        proc = run("nbdinfo", "--size", with_certs(srv.uri, pki.wrong_host))
        assert proc.returncode != 0
        assert proc.stdout == ""
        assert "certificate" in proc.stderr.lower()
    else:
        # libnbd 1.14 checks no name over a Unix socket
        assert_good_client(srv, pki.wrong_host, offset=8192)
    proc = qemu_io(srv, pki.wrong_host, "read -P 0x33 0 4k", hostname="otherhost.example")
    assert proc.returncode == 0, proc.stderr
    assert srv.proc.poll() is None


def test_tls_authz_allows_only_the_named_client(pynbd_server: ServerFactory,
                                                pki: Pki) -> None:
    identity = CLIENT_DN.replace(",", ",,")  # qemu's option syntax: ",," is a comma
    srv = pynbd_server(
        "-v", "-e", "0",
        "--object", f"tls-creds-x509,id=tls0,dir={pki.main},endpoint=server,verify-peer=on",
        "--tls-creds", "tls0",
        "--object", f"authz-simple,id=auth0,identity={identity}", "--tls-authz", "auth0",
        "memory:1M")
    assert_good_client(srv, pki.main)
    libnbd_fails(srv, pki.other_cn)
    proc = qemu_io(srv, pki.other_cn, "read 0 512")
    assert proc.returncode != 0
    assert "read 512/512" not in proc.stdout
    assert_good_client(srv, pki.main)
    proc = qemu_io(srv, pki.main, "read 0 512")
    assert proc.returncode == 0, proc.stderr
    log = stop_and_log(srv)
    assert log.count("client certificate 'CN=other client,O=pynbd test' is not allowed") \
        == 2, log


# -- STARTTLS injection (CVE-2021-3716 class) ---------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_plaintext_after_starttls_is_never_answered(pynbd_server: ServerFactory, pki: Pki,
                                                    tcp: bool) -> None:
    """A man in the middle appends STRUCTURED_REPLY and GO to the client's STARTTLS.

    The server must act on none of it: neither in plaintext nor, had it gone on
    with TLS, as if those bytes had come through TLS.
    """
    srv = tls_server(pynbd_server, pki.main, "memory:1M", tcp=tcp)
    with raw_connect(srv) as sock:
        greet(sock)
        sock.sendall(CLIENT_FLAGS + opt(OPT_STARTTLS) + opt(OPT_STRUCTURED_REPLY)
                     + opt(OPT_GO, go_data()))
        first = sock.recv(20)
        if first:
            # at most the STARTTLS ACK; then whatever comes through TLS must
            # not answer the injected options either
            assert parse_replies(first + recv_exact(sock, 20 - len(first))) == [
                (OPT_STARTTLS, REP_ACK)]
            with client_context(pki).wrap_socket(sock, server_hostname="localhost") as tls:
                tls.settimeout(2.0)
                after = b""
                with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError):
                    for _ in range(100):
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        after += chunk
            assert after == b"", f"injected options answered over TLS: {after!r}"
            pytest.fail("the server acknowledged a STARTTLS with data behind it")
        assert recv_until_eof(sock) == b""
    assert_good_client(srv, pki.main)
    assert "client sent data after NBD_OPT_STARTTLS" in stop_and_log(srv)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_structured_replies_negotiated_before_starttls_are_forgotten(
        pynbd_server: ServerFactory, pki: Pki, pattern_image: Path, tcp: bool) -> None:
    srv = tls_server(pynbd_server, pki.main, "--tls", "on", str(pattern_image),
                     tcp=tcp)
    # the attack: STRUCTURED_REPLY in plaintext, then STARTTLS, then GO over TLS
    with raw_connect(srv) as plain:
        greet(plain)
        plain.sendall(CLIENT_FLAGS + opt(OPT_STRUCTURED_REPLY))
        assert read_reply(plain) == (OPT_STRUCTURED_REPLY, REP_ACK, b"")
        with starttls(plain, pki) as sock:
            flags = go_flags(sock)
            assert flags & FLAG_HAS_FLAGS
            assert not flags & FLAG_SEND_DF
            sock.sendall(read_request(7, 0, 4096))
            magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
            assert (magic, error, cookie) == (SIMPLE_REPLY_MAGIC, 0, 7)
            assert recv_exact(sock, 4096) == b"\x01" * 4096
            disconnect(sock)
    # the control: negotiated over TLS, structured replies are on
    with raw_connect(srv) as plain:
        greet(plain)
        plain.sendall(CLIENT_FLAGS)
        with starttls(plain, pki) as sock:
            sock.sendall(opt(OPT_STRUCTURED_REPLY))
            assert read_reply(sock) == (OPT_STRUCTURED_REPLY, REP_ACK, b"")
            assert go_flags(sock) & FLAG_SEND_DF
            sock.sendall(read_request(8, 0, 4096))
            magic, _flags, _type, cookie = struct.unpack(">IHHQ", recv_exact(sock, 16))
            assert (magic, cookie) == (STRUCTURED_REPLY_MAGIC, 8)
            disconnect(sock)
    assert srv.proc.poll() is None


def test_failed_tls_handshake_ends_only_that_connection(pynbd_server: ServerFactory,
                                                        pki: Pki) -> None:
    srv = tls_server(pynbd_server, pki.main, "memory:1M")
    with raw_connect(srv) as stalled, raw_connect(srv) as broken:
        # one client asks for TLS and then says nothing: it must not hold up others
        greet(stalled)
        stalled.sendall(CLIENT_FLAGS + opt(OPT_STARTTLS))
        assert read_reply(stalled) == (OPT_STARTTLS, REP_ACK, b"")
        # another sends garbage where its ClientHello should be
        greet(broken)
        broken.sendall(CLIENT_FLAGS + opt(OPT_STARTTLS))
        assert read_reply(broken) == (OPT_STARTTLS, REP_ACK, b"")
        broken.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" + bytes(512))
        rest = recv_until_eof(broken)
        # at most a TLS alert record (content type 21), never an NBD reply
        assert rest == b"" or rest[0] == 21, rest
        assert struct.pack(">Q", REPLY_MAGIC) not in rest
        assert_good_client(srv, pki.main)
    assert_good_client(srv, pki.main)
    assert "TLS handshake failed" in stop_and_log(srv)


class Refused(Exception):
    """A client tool could not get in."""


def eventually_good_client(srv: Endpoint, certs: Path) -> None:
    """A good TLS client, retried while the server may not yet have seen the
    previous client leave (it allows one client at a time).  The wrong-host
    certificates name otherhost.example, which only qemu can be told to expect."""
    deadline = time.monotonic() + SETTLE
    for _ in range(1000):
        try:
            if srv.socket is not None:
                assert_good_client(srv, certs)
            else:
                proc = qemu_io(srv, certs, "write -P 0x66 0 4k", "read -P 0x66 0 4k",
                               hostname="otherhost.example")
                if proc.returncode != 0:
                    raise Refused(proc.stderr)
                assert "Pattern verification failed" not in proc.stdout
            return
        except (nbd.Error, Refused):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    pytest.fail("no good client got in")


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_clients_leaving_mid_handshake_free_the_only_slot(pynbd_server: ServerFactory,
                                                          pki: Pki, tcp: bool) -> None:
    """With the default -e 1, a TLS handshake that ends early must not keep the slot."""
    srv = tls_server(pynbd_server, pki.wrong_host, "memory:1M", tcp=tcp, shared=1)
    # a client that closes right after the STARTTLS ACK
    with raw_connect(srv) as sock:
        greet(sock)
        sock.sendall(CLIENT_FLAGS + opt(OPT_STARTTLS))
        assert read_reply(sock) == (OPT_STARTTLS, REP_ACK, b"")
    eventually_good_client(srv, pki.wrong_host)
    # a client that does not trust the server's CA and hangs up mid-handshake
    with raw_connect(srv) as plain:
        greet(plain)
        plain.sendall(CLIENT_FLAGS + opt(OPT_STARTTLS))
        assert read_reply(plain) == (OPT_STARTTLS, REP_ACK, b"")
        with pytest.raises(ssl.SSLCertVerificationError):
            client_context(pki).wrap_socket(plain, server_hostname="localhost")
    eventually_good_client(srv, pki.wrong_host)
    # a client that rejects the server's certificate (wrong name) and hangs up
    proc = qemu_io(srv, pki.wrong_host, "read 0 512")
    assert "Certificate does not match the hostname" in proc.stderr
    eventually_good_client(srv, pki.wrong_host)
    if tcp:
        # libnbd checks the certificate against the address it connected to
        proc = run("nbdinfo", "--size", with_certs(srv.uri, pki.wrong_host))
        assert proc.returncode != 0
        assert "certificate" in proc.stderr.lower()
        eventually_good_client(srv, pki.wrong_host)
    # and a client that does not trust the server's CA
    proc = qemu_io(srv, pki.main, "read 0 512", hostname="otherhost.example")
    assert proc.returncode != 0
    assert "read 512/512" not in proc.stdout
    eventually_good_client(srv, pki.wrong_host)
    assert srv.stop() == 0


# -- multi-conn over TLS --------------------------------------------------------------------------


def test_multi_conn_over_tls(pynbd_server: ServerFactory, pki: Pki,
                             pattern_image: Path) -> None:
    srv = tls_server(pynbd_server, pki.main, str(pattern_image))
    handles = [libnbd(srv, pki.main) for _ in range(3)]
    try:
        h0, h1, h2 = handles
        for h in handles:
            assert h.get_tls_negotiated() is True
            assert h.can_multi_conn() is True
        assert h0.pread(MiB, 0) == b"\x01" * MiB
        h1.pwrite(b"\x03" * MiB, 0)
        h2.flush()
        assert h0.pread(MiB, 0) == b"\x03" * MiB
    finally:
        for h in handles:
            close(h)
    assert pattern_image.read_bytes()[:MiB] == b"\x03" * MiB


def test_single_client_export_over_tls_is_not_multi_conn(pynbd_server: ServerFactory,
                                                         pki: Pki) -> None:
    srv = tls_server(pynbd_server, pki.main, "memory:1M", shared=1)
    h = libnbd(srv, pki.main)
    try:
        assert h.get_tls_negotiated() is True
        assert h.can_multi_conn() is False
    finally:
        close(h)


# -- the daemon ----------------------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    qmp: str
    nbd_sock: str


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``daemon(*args)`` runs ``pynbd daemon --qmp Q --pid-file P *args``."""
    started: list[Daemon] = []

    def factory(*args: str) -> Daemon:
        qmp_path = str(tmp_path / f"q{len(started)}.sock")
        pid_file = tmp_path / f"d{len(started)}.pid"
        err = tmp_path / f"d{len(started)}.err"
        with open(err, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pynbd", "daemon", "--qmp", qmp_path,
                 "--pid-file", str(pid_file), *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh)
        d = Daemon(proc, qmp_path, str(tmp_path / f"n{len(started)}.sock"))
        started.append(d)
        deadline = time.monotonic() + T
        for _ in range(100_000):
            if pid_file.exists():
                return d
            if proc.poll() is not None:
                pytest.fail(f"daemon exited with {proc.returncode}: {err.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("daemon did not start")
            time.sleep(0.02)
        pytest.fail("daemon did not start")

    yield factory
    for d in started:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(T)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()


@dataclass
class DaemonEndpoint:
    uri: str
    socket: str | None
    proc: subprocess.Popen[Any]


def daemon_server(d: Daemon, sock: str | None = None) -> Endpoint:
    """The daemon's NBD socket, in the shape the client helpers take."""
    path = sock or d.nbd_sock
    return DaemonEndpoint(f"nbds+unix:///disk?socket={path}", path, d.proc)


def test_daemon_serves_tls_from_the_command_line(daemon: Callable[..., Daemon], pki: Pki,
                                                 pattern_image: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "n0.sock")
    d = daemon("--object", f"tls-creds-x509,id=tls0,dir={pki.main},endpoint=server",
               "--blockdev", f"driver=file,node-name=n0,filename={pattern_image}",
               "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
               "--export", "type=nbd,id=e0,node-name=n0,name=disk,writable=on")
    srv = daemon_server(d)
    h = libnbd(srv, pki.main, name="disk")
    try:
        assert h.get_tls_negotiated() is True
        assert h.pread(4096, 2 * MiB) == b"\x02" * 4096
        h.pwrite(b"\x07" * 4096, 0)
        h.flush()
    finally:
        close(h)
    assert pattern_image.read_bytes()[:4096] == b"\x07" * 4096
    with pytest.raises(nbd.Error) as info:
        libnbd(srv, None, name="disk")
    assert info.value.errnum == errno.ENOTSUP
    proc = run("nbdinfo", "--list", f"nbd+unix:///?socket={sock}")
    assert proc.returncode != 0
    assert "disk" not in proc.stdout
    proc = run("nbdinfo", "--list", with_certs(f"nbds+unix:///?socket={sock}", pki.main))
    assert proc.returncode == 0, proc.stderr
    assert 'export="disk"' in proc.stdout


def test_daemon_tls_authz(daemon: Callable[..., Daemon], pki: Pki, pattern_image: Path,
                          tmp_path: Path) -> None:
    sock = str(tmp_path / "n0.sock")
    d = daemon("--object",
               f"tls-creds-x509,id=tls0,dir={pki.main},endpoint=server,verify-peer=on",
               "--object", f"authz-simple,id=auth0,identity={CLIENT_DN.replace(',', ',,')}",
               "--blockdev", f"driver=file,node-name=n0,filename={pattern_image}",
               "--nbd-server",
               f"addr.type=unix,addr.path={sock},tls-creds=tls0,tls-authz=auth0",
               "--export", "type=nbd,id=e0,node-name=n0,name=disk")
    srv = daemon_server(d)
    libnbd_fails(srv, pki.other_cn, name="disk")
    libnbd_fails(srv, pki.ca_only, name="disk")
    h = libnbd(srv, pki.main, name="disk")
    try:
        assert h.pread(512, 0) == b"\x01" * 512
    finally:
        close(h)
    assert d.proc.poll() is None


def test_qmp_nbd_server_start_with_tls(daemon: Callable[..., Daemon], pki: Pki,
                                       pattern_image: Path) -> None:
    d = daemon()

    async def main() -> None:
        client = QMPClient("pynbd-tls-test")
        async with asyncio.timeout(T):
            await client.connect(d.qmp)
        try:
            async with asyncio.timeout(T):
                addr = {"type": "unix", "data": {"path": d.nbd_sock}}
                with pytest.raises(ExecuteError) as info:
                    await client.execute("nbd-server-start",
                                         {"addr": addr, "tls-creds": "tls0"})
                assert info.value.error_class == "GenericError"
                assert "No TLS credentials with id 'tls0'" in str(info.value)
                assert not await asyncio.to_thread(os.path.exists, d.nbd_sock)
                await client.execute("object-add", {
                    "qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki.main),
                    "endpoint": "server"})
                await client.execute("blockdev-add", {
                    "driver": "file", "node-name": "n0", "filename": str(pattern_image)})
                await client.execute("nbd-server-start", {"addr": addr, "tls-creds": "tls0"})
                await client.execute("block-export-add", {
                    "type": "nbd", "id": "e0", "node-name": "n0", "name": "disk"})
        finally:
            async with asyncio.timeout(T):
                await client.disconnect()

    asyncio.run(main())
    srv = daemon_server(d)
    h = libnbd(srv, pki.main, name="disk")
    try:
        assert h.get_tls_negotiated() is True
        assert h.pread(512, 0) == b"\x01" * 512
    finally:
        close(h)
    with pytest.raises(nbd.Error):
        libnbd(srv, None, name="disk")


# -- bad command lines -------------------------------------------------------------------------

BAD_LINES: list[tuple[str, list[str], str]] = [
    ("creds-dir-without-server-cert", ["--tls-creds", "{no_server_cert}"],
     "server-cert.pem"),
    ("creds-dir-without-server-key", ["--tls-creds", "{no_server_key}"],
     "server-key.pem"),
    ("creds-dir-missing", ["--tls-creds", "{main}/nonexistent"], "nonexistent"),
    ("tls-require-without-creds", ["--tls", "require"], "--tls-creds"),
    ("tls-on-without-creds", ["--tls", "on"], "--tls-creds"),
    ("authz-naming-nothing", ["--tls-creds", "{main}", "--tls-authz", "auth0"], "auth0"),
    ("authz-without-creds", ["--object", "authz-simple,id=auth0,identity=CN=x",
                             "--tls-authz", "auth0"], "--tls-creds"),
    ("verify-peer-without-creds", ["--tls-verify-peer"], "--tls-creds"),
    ("creds-naming-nothing", ["--tls-creds", "tls0"], "tls0"),
    ("client-endpoint", ["--object", "tls-creds-x509,id=tls0,dir={main},endpoint=client",
                         "--tls-creds", "tls0"], "endpoint"),
    ("creds-object-missing-dir", ["--object", "tls-creds-x509,id=tls0,endpoint=server",
                                  "--tls-creds", "tls0"], "dir"),
    ("authz-names-creds", ["--object", "tls-creds-x509,id=tls0,dir={main},endpoint=server",
                           "--tls-creds", "tls0", "--tls-authz", "tls0"], "authz-simple"),
]


@pytest.mark.parametrize(("args", "needle"),
                         [pytest.param(a, n, id=i) for i, a, n in BAD_LINES])
def test_bad_tls_command_lines(pki: Pki, tmp_path: Path, args: list[str],
                               needle: str) -> None:
    sock = tmp_path / "never.sock"
    argv = [a.format(main=pki.main, no_server_cert=pki.no_server_cert,
                     no_server_key=pki.no_server_key) for a in args]
    proc = subprocess.run([sys.executable, "-m", "pynbd", "--print-uri", "-k", str(sock),
                           *argv, "memory:1M"],
                          capture_output=True, text=True, timeout=T, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pynbd: ")
    assert needle in lines[0]
    assert not sock.exists()


#: a TLS object problem on the command line and the whole line it prints; {main} is
#: the certificates' directory
TLS_OBJECT_LINES: list[tuple[str, list[str], str]] = [
    ("creds-names-authz", ["--object", "authz-simple,id=tls0,identity=CN=x",
                           "--tls-creds", "tls0"],
     "object 'tls0' is not tls-creds-x509"),
    ("client-endpoint", ["--object", "tls-creds-x509,id=tls0,dir={main},endpoint=client",
                         "--tls-creds", "tls0"],
     "TLS credentials 'tls0' are not for a server (endpoint must be server)"),
    ("no-dir", ["--object", "tls-creds-x509,id=tls0", "--tls-creds", "tls0"],
     "TLS credentials 'tls0' need dir=DIR"),
    ("bad-verify-peer", ["--object", "tls-creds-x509,id=tls0,dir={main},verify-peer=maybe",
                         "--tls-creds", "tls0"],
     "verify-peer='maybe': expected on or off"),
    ("authz-names-nothing", ["--object", "tls-creds-x509,id=tls0,dir={main}",
                             "--tls-creds", "tls0", "--tls-authz", "auth0"],
     "--tls-authz 'auth0' must name an authz-simple object with identity=DN"),
    ("authz-without-identity", ["--tls-creds", "{main}", "--object", "authz-simple,id=auth0",
                                "--tls-authz", "auth0"],
     "--tls-authz 'auth0' must name an authz-simple object with identity=DN"),
    ("creds-name-nothing", ["--tls-creds", "tls0"],
     "--tls-creds 'tls0' is neither an --object id nor a directory"),
]


@pytest.mark.parametrize(("args", "line"),
                         [pytest.param(a, n, id=i) for i, a, n in TLS_OBJECT_LINES])
def test_tls_object_errors_keep_their_wording(pki: Pki, tmp_path: Path, args: list[str],
                                              line: str) -> None:
    sock = tmp_path / "never.sock"
    proc = subprocess.run([sys.executable, "-m", "pynbd", "-k", str(sock),
                           *(a.format(main=pki.main) for a in args), "memory:1M"],
                          capture_output=True, text=True, timeout=T, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"pynbd: {line}\n")
    assert not sock.exists()


def test_credentials_from_objects_reads_qemu_objects(pki: Pki) -> None:
    """The reader the command line and QMP share: a problem, the object it is about and
    QMP's wording; credentials with what the objects say."""
    from pynbd.server.tls import (
        TlsCredentials,
        TlsObjectError,
        TlsObjectProblem,
        credentials_from_objects,
    )

    creds = ("tls-creds-x509", {"dir": str(pki.main), "endpoint": "server"})
    objects: dict[str, tuple[str, dict[str, Any]]] = {
        "tls0": creds,
        "peer": ("tls-creds-x509", {"dir": str(pki.main), "verify-peer": "on"}),
        "peer-bool": ("tls-creds-x509", {"dir": str(pki.main), "verify-peer": True}),
        "client": ("tls-creds-x509", {"dir": str(pki.main), "endpoint": "client"}),
        "no-dir": ("tls-creds-x509", {}),
        "odd-flag": ("tls-creds-x509", {"dir": str(pki.main), "verify-peer": "Maybe"}),
        "auth0": ("authz-simple", {"identity": CLIENT_DN}),
        "auth-empty": ("authz-simple", {}),
    }
    assert credentials_from_objects(objects, "tls0") == TlsCredentials(str(pki.main))
    assert credentials_from_objects(objects, "tls0", verify_peer=True).verify_peer
    assert credentials_from_objects(objects, "peer").verify_peer
    assert credentials_from_objects(objects, "peer-bool").verify_peer
    assert credentials_from_objects(objects, "tls0", "auth0").allowed_dns == frozenset({CLIENT_DN})
    failures = [
        (("missing",), TlsObjectProblem.NOT_CREDENTIALS, "missing",
         "No TLS credentials with id 'missing'"),
        (("auth0",), TlsObjectProblem.NOT_CREDENTIALS, "auth0",
         "No TLS credentials with id 'auth0'"),
        (("client",), TlsObjectProblem.NOT_SERVER, "client",
         "TLS credentials 'client' are not for a server"),
        (("no-dir",), TlsObjectProblem.NO_DIR, "no-dir",
         "TLS credentials 'no-dir' need dir=DIR"),
        (("odd-flag",), TlsObjectProblem.BAD_VERIFY_PEER, "odd-flag",
         "verify-peer='maybe': expected on or off"),
        (("tls0", "nothing"), TlsObjectProblem.NOT_AUTHZ, "nothing",
         "No authorization object with id 'nothing'"),
        (("tls0", "tls0"), TlsObjectProblem.NOT_AUTHZ, "tls0",
         "No authorization object with id 'tls0'"),
        (("tls0", "auth-empty"), TlsObjectProblem.NOT_AUTHZ, "auth-empty",
         "No authorization object with id 'auth-empty'"),
    ]
    for ids, problem, object_id, message in failures:
        with pytest.raises(TlsObjectError) as caught:
            credentials_from_objects(objects, *ids)
        assert isinstance(caught.value, ValueError)
        assert (caught.value.problem, caught.value.object_id, str(caught.value)) == (
            problem, object_id, message)
