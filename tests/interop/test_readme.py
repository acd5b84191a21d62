"""The README's worked examples, run as a user would type them.

A block of the README is taken as it stands, only its fixed ports and paths
moved to free ports and a temporary directory, and run with bash; the test
fails when the block fails, so the README cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.ceph import require_ceph
from tests.support.interop import require_tool

ROOT = Path(__file__).resolve().parents[2]
#: the block is a handful of commands plus a 10 s check; the cluster starts in seconds
TIMEOUT = 180.0


def readme_block(after: str) -> str:
    """The first ```sh block of README.md that follows the line containing ``after``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no sh block after {after!r}"
    return match.group(1)


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


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
    """Scaling out: a cluster, an image, two gateways, the checker across them,
    a write through A, A killed, the data read back through B."""
    require_ceph()
    for tool in ("qemu-io", "rbd"):
        require_tool(tool)
    block = readme_block("A worked example on one machine")
    port_a, port_b = free_ports(2)
    script = (block.replace("/tmp/ceph", str(tmp_path / "ceph"))
              .replace("/tmp/gw-", str(tmp_path / "gw-"))
              .replace("10809", str(port_a)).replace("10810", str(port_b)))
    for fixed in ("/tmp/ceph", "/tmp/gw-", "10809", "10810"):  # every one was moved
        assert fixed not in script, script
    # `pynbd` as installed: the virtualenv's console script first on PATH
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=False,
                                cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        for gateway in ("a", "b"):  # whatever the block left running
            kill_gateway(tmp_path / f"gw-{gateway}.pid")
        if (tmp_path / "ceph").exists():
            subprocess.run([str(ROOT / "scripts/ceph-cluster"), "stop", str(tmp_path / "ceph")],
                           capture_output=True, check=False, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Pattern verification failed" not in output, output
    # the checker ran across both gateways and found nothing
    assert "pynbd check: PASS" in output, output
    assert "8 connections over 2 URI(s)" in output, output
    assert output.count("read 1048576/1048576 bytes") == 1, output
    assert not (tmp_path / "ceph").exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
