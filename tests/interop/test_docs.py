"""The documentation's worked examples, run as a user would type them.

A block of README.md or of a page in docs/ is taken as it stands, only its
fixed ports and paths moved to free ports and a temporary directory, and run
with bash; the test fails when the block fails, so the documentation cannot
drift from what works.  Every block is found by the text just before it, in
the same section of its page: a walkthrough that is moved, renamed away or
deleted fails ``test_walkthrough_present`` (which needs no tools), not only
the test that runs it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import RunningServer, launch
from tests.support.ceph import require_ceph
from tests.support.interop import require_tool

ROOT = Path(__file__).resolve().parents[2]
#: the block is a handful of commands plus a 10 s check; the cluster starts in seconds
TIMEOUT = 180.0


#: every walkthrough the tests run: the page it lives on, the text just before
#: it (line breaks and runs of spaces in it match any whitespace) and its fence
WALKTHROUGHS: dict[str, tuple[str, str, str]] = {
    "quick start: serve": ("README.md", "Install and serve a 1 GiB RAM disk", "sh"),
    "quick start: clients": ("README.md", "From another shell:", "sh"),
    "tls": ("docs/tls.md", "pynbd speaks `NBD_OPT_STARTTLS`", "sh"),
    "daemon: start-up options": ("docs/daemon.md", "commands and go through the same engine",
                                 "sh"),
    "daemon: started bare": ("docs/daemon.md", "against a daemon started bare", "sh"),
    "daemon: qemu.qmp session": ("docs/daemon.md", "against a daemon started bare", "python"),
    "scaling out": ("docs/ceph.md", "A worked example on one machine", "sh"),
    "backup: the disk": ("docs/backup.md", "A 64 MiB qcow2 disk with 16 MiB of data", "sh"),
    "backup: qmp helper": ("docs/backup.md", "a small function that sends one command",
                           "sh"),
    "backup: full": ("docs/backup.md", "the backup is copied: the backup does not see it",
                     "sh"),
    "backup: incremental": ("docs/backup.md", "compared with the backup at the end", "sh"),
}


def section_end(text: str, start: int) -> int:
    """Where the section holding ``start`` ends: the next heading outside a
    fenced block (a ``# comment`` inside a shell block is no heading)."""
    in_fence = False
    pos = text.rfind("\n", 0, start) + 1
    for line in text[pos:].splitlines(keepends=True):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#") and pos > start:
            return pos
        pos += len(line)
    return len(text)


def walkthrough(name: str) -> str:
    """The walkthrough ``name`` of ``WALKTHROUGHS``: the first block with its
    fence after its text, in the same section of its page."""
    page, after, fence = WALKTHROUGHS[name]
    path = ROOT / page
    assert path.is_file(), f"{name}: {page} is missing"
    text = path.read_text()
    marker = re.compile(r"\s+".join(re.escape(word) for word in after.split()))
    found = marker.search(text)
    assert found is not None, f"{name}: {page} no longer says {after!r}"
    end = section_end(text, found.end())
    block = re.compile(rf"^```{fence}\n(.*?)^```$", re.S | re.M).search(text, found.end(), end)
    assert block is not None, f"{name}: no ```{fence} block after {after!r} in that section"
    assert block.group(1).strip(), f"{name}: the block after {after!r} in {page} is empty"
    return block.group(1)


@pytest.mark.parametrize("name", list(WALKTHROUGHS))
def test_walkthrough_present(name: str) -> None:
    """Each walkthrough the tests below run is where they look for it."""
    walkthrough(name)


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def moved(block: str, moves: dict[str, str]) -> str:
    """``block`` with each fixed path or port replaced; none may be left."""
    for fixed, where in moves.items():
        block = block.replace(fixed, where)
    for fixed in moves:
        assert fixed not in block, block
    return block


def installed_env() -> dict[str, str]:
    """`pynbd` as installed: the virtualenv's console script first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def shell(script: str, timeout: float = TIMEOUT) -> str:
    """Run ``script`` with bash (stop at the first failing command); its output."""
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False,
                            cwd=ROOT, env=installed_env(), capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script}\n---\n{output}"
    assert "Pattern verification failed" not in output, output
    return output


def serve_line(line: str, ready: Path | None = None) -> RunningServer:
    """A walkthrough's line that serves in the foreground (typed in one shell while the
    next lines go to another), started in the background: ready once it has
    printed its URI (``--print-uri``) or, given ``ready``, once that socket
    exists."""
    cmd = ["bash", "-c", f"exec {line}"]
    if ready is None:
        return launch(cmd, socket_path=None, cwd=ROOT, env=installed_env())
    proc = subprocess.Popen(cmd, cwd=ROOT, env=installed_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30.0
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not ready.exists():
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"{line}: did not start serving; stderr: {stderr}")
    return RunningServer(proc, "", str(ready), cmd)


def ended(server: RunningServer, sig: int | None = signal.SIGINT) -> tuple[int, str]:
    """Ctrl-C (or, with ``sig`` None, wait for it to end by itself); the exit
    status and everything it wrote to stderr."""
    status = server.stop(sig) if sig is not None else server.proc.wait(30.0)
    assert server.proc.stderr is not None
    return status, server.proc.stderr.read()


def test_quick_start(tmp_path: Path) -> None:
    """README, Quick start: serve a RAM disk, then nbdinfo, qemu-io and nbdcopy from
    another shell.  The install step (`bash scripts/install &&`, which writes to
    /opt and /usr/local/bin) is left out: the virtualenv's `pynbd` stands in."""
    for tool in ("nbdinfo", "qemu-io", "nbdcopy"):
        require_tool(tool)
    moves = {"/tmp/pynbd.sock": str(tmp_path / "pynbd.sock"),
             "/tmp/copy.img": str(tmp_path / "copy.img")}
    serve = moved(walkthrough("quick start: serve"), moves).strip()
    install = "bash scripts/install && "
    assert serve.startswith(install), serve
    server = serve_line(serve.removeprefix(install))
    try:
        # the URI the README says it prints
        assert server.uri == f"nbd+unix:///?socket={tmp_path / 'pynbd.sock'}"
        output = shell(moved(walkthrough("quick start: clients"), moves))
    finally:
        status, stderr = ended(server)
    assert (status, stderr) == (0, ""), stderr  # as qemu-nbd: nothing printed on success
    assert "export-size: 1073741824" in output, output
    assert "read 1048576/1048576 bytes" in output, output
    copy = (tmp_path / "copy.img").read_bytes()
    assert len(copy) == 1 << 30
    assert copy[:1 << 20] == b"\xab" * (1 << 20)
    assert copy[1 << 20:].count(0) == (1 << 30) - (1 << 20)


def test_tls_example(tmp_path: Path) -> None:
    """docs/tls.md: make credentials, serve with them, nbdinfo and qemu-img over TLS."""
    for tool in ("nbdinfo", "qemu-img", "openssl"):
        require_tool(tool)
    moves = {"/etc/pynbd/tls": str(tmp_path / "tls"), "/tmp/s.sock": str(tmp_path / "s.sock")}
    lines = moved(walkthrough("tls"), moves)
    setup, serve, clients = lines.split("\n", 2)
    assert serve.startswith("pynbd "), serve
    assert "--print-uri" in serve, serve
    shell(setup)
    server = serve_line(serve)
    try:
        assert server.uri.startswith("nbds+unix://"), server.uri
        output = shell(clients)
    finally:
        status, stderr = ended(server)
    assert (status, stderr) == (0, ""), stderr
    assert "export-size: 1073741824" in output, output
    assert "protocol: newstyle-fixed with TLS" in output, output
    assert "virtual size: 1 GiB" in output, output


def test_daemon_examples(tmp_path: Path) -> None:
    """docs/daemon.md: started with its start-up options (an export a client reads),
    then bare and driven by docs/daemon.md's qemu.qmp session, which ends it with
    ``quit``."""
    require_tool("nbdinfo")
    moves = {"/run/pynbd-qmp.sock": str(tmp_path / "qmp.sock"),
             "/run/pynbd.sock": str(tmp_path / "nbd.sock"),
             "/var/lib/images/disk.img": str(tmp_path / "disk.img"),
             "/tmp/disk.img": str(tmp_path / "disk.img"),
             "/tmp/nbd.sock": str(tmp_path / "nbd2.sock")}
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    start = moved(walkthrough("daemon: start-up options"), moves)
    daemon = serve_line(start.replace("\\\n", " "), ready=tmp_path / "nbd.sock")
    try:
        output = shell(f"nbdinfo 'nbd+unix:///disk?socket={tmp_path / 'nbd.sock'}'")
    finally:
        status, stderr = ended(daemon)
    assert (status, stderr) == (0, ""), stderr
    assert "export-size: 1048576" in output, output
    assert "is_read_only: false" in output, output

    (tmp_path / "disk.img").unlink()
    bare, session = (moved(walkthrough(name), moves)
                     for name in ("daemon: started bare", "daemon: qemu.qmp session"))
    truncate, serve = bare.strip().split("\n")
    shell(truncate)
    daemon = serve_line(serve, ready=tmp_path / "qmp.sock")
    result: subprocess.CompletedProcess[str] | None = None
    try:
        result = subprocess.run([sys.executable, "-c", session], check=False, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
    finally:
        # the session ends with quit: the daemon exits by itself
        status, stderr = ended(daemon, None if result is not None and result.returncode == 0
                               else signal.SIGINT)
    assert result.returncode == 0, result.stdout + result.stderr
    exports = result.stdout.splitlines()
    assert exports[0].count("'type': 'nbd'") == 2, exports
    assert exports[1:] == ["BLOCK_EXPORT_DELETED {'id': 'r'}"], exports
    assert (status, stderr) == (0, ""), stderr


def test_backup_walkthrough(tmp_path: Path) -> None:
    """docs/backup.md: a daemon serves a qcow2 disk; a full backup of a frozen view while
    a client writes, then an incremental one of the dirty extents only, which qemu-img
    finds identical to a copy of the disk taken at its backup point; ``quit`` ends it."""
    for tool in ("qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "nbdsh"):
        require_tool(tool)
    moves = {f"/tmp/{name}": str(tmp_path / name) for name in (
        "disk.qcow2", "qmp.sock", "nbd.sock", "scratch.qcow2", "full.img", "check.img",
        "incremental.img")}
    *prepare, serve = moved(walkthrough("backup: the disk"), moves).replace(
        "\\\n", " ").strip().split("\n")
    assert serve.startswith("pynbd daemon "), serve
    shell("\n".join(prepare))
    daemon = serve_line(serve, ready=tmp_path / "nbd.sock")
    helper = moved(walkthrough("backup: qmp helper"), moves)
    quit_sent = False
    try:
        deadline = time.monotonic() + 30.0
        while not (tmp_path / "qmp.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        full = shell(helper + moved(walkthrough("backup: full"), moves))
        incremental = shell(helper + moved(walkthrough("backup: incremental"), moves))
        quit_sent = True
    finally:
        status, stderr = ended(daemon, None if quit_sent else signal.SIGINT)
    assert (status, stderr) == (0, ""), stderr
    assert '"device": "backup", "len": 67108864, "offset": 1048576' in full, full
    image = (tmp_path / "full.img").read_bytes()
    assert image[:16 << 20] == b"\x11" * (16 << 20)
    assert image[16 << 20:].count(0) == 48 << 20
    dirty = [line.split()[:2] for line in incremental.splitlines() if "dirty" in line]
    assert dirty == [["0", "1048576"], ["8388608", "65536"], ["41943040", "65536"]], incremental
    assert "Images are identical." in incremental, incremental
    image = (tmp_path / "incremental.img").read_bytes()
    assert image[:1 << 20] == b"\x33" * (1 << 20)
    assert image[8 << 20:(8 << 20) + (64 << 10)] == b"\x22" * (64 << 10)


def kill_gateway(pid_file: Path) -> None:
    """SIGKILL the pynbd a pid file names, if it still runs (a killed gateway
    leaves its pid file behind, and the pid may since name another process)."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"pynbd" in cmdline:
        os.kill(pid, signal.SIGKILL)


def test_scaling_out_example(tmp_path: Path) -> None:
    """docs/ceph.md, Scaling out: a cluster, an image, two gateways, the checker across them,
    a write through A, A killed, the data read back through B."""
    require_ceph()
    for tool in ("qemu-io", "rbd"):
        require_tool(tool)
    block = walkthrough("scaling out")
    port_a, port_b = free_ports(2)
    script = moved(block, {"/tmp/ceph": str(tmp_path / "ceph"),
                           "/tmp/gw-": str(tmp_path / "gw-"),
                           "10809": str(port_a), "10810": str(port_b)})
    try:
        output = shell(script)
    finally:
        for gateway in ("a", "b"):  # whatever the block left running
            kill_gateway(tmp_path / f"gw-{gateway}.pid")
        if (tmp_path / "ceph").exists():
            subprocess.run([str(ROOT / "scripts/ceph-cluster"), "stop", str(tmp_path / "ceph")],
                           capture_output=True, check=False, timeout=60)
    # the checker ran across both gateways and found nothing
    assert "pynbd check: PASS" in output, output
    assert "8 connections over 2 URI(s)" in output, output
    assert output.count("read 1048576/1048576 bytes") == 1, output
    assert not (tmp_path / "ceph").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
