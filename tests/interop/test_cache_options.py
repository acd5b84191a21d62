"""``--cache``, ``--aio`` and ``--detect-zeroes``, served by a real pynbd to real clients.

Every cache mode serves unaligned reads and writes from qemu-io and whole-image
copies from nbdcopy with the right data (checked against a raw mirror given the
same writes), and ``none``/``directsync`` really open the image ``O_DIRECT``
(the server's fd flags).  ``--detect-zeroes unmap`` turns a write of zeroes
into a hole in a raw file (``qemu-img map``, ``st_blocks``) and into zero
clusters in a qcow2 image (``qemu-img map``; ``qemu-img check`` clean and
``qemu-img compare`` equal to the mirror).  Refused combinations print one
line with qemu-nbd's words where it has them (qemu-nbd itself is the oracle).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests.support.interop import require_tool

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import RunningServer, ServerFactory

pytestmark = pytest.mark.interop

MiB = 1 << 20
#: not a multiple of any block size: the last partial block is written too
SIZE = 10 * MiB + 123
TIMEOUT = 60

#: unaligned and aligned writes, zeroes and a discard; the last touches the final byte
WRITES = (
    "write -P 0x11 1 1000",
    "write -P 0x22 4095 3",
    "write -P 0x33 1M 64k",
    "write -P 0x44 3000000 1234567",
    "write -z 5000 7000",
    "write -P 0x55 6M 2M",
    "write -P 0x66 5999999 2",
    f"write -P 0x77 {SIZE - 1123} 1123",
)
#: reads at unaligned places that must see those writes
READS = (
    "read -P 0x11 1 1000",
    "read -P 0x22 4095 3",
    "read -P 0 1001 3094",
    "read -P 0x44 3000000 1234567",
    "read -P 0 5000 7000",
    "read -P 0x66 5999999 2",
    f"read -P 0x77 {SIZE - 1123} 1123",
)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=check,
                          stdin=subprocess.DEVNULL)


def qemu_io(target: str, *commands: str, fmt: str = "raw") -> str:
    args = [require_tool("qemu-io"), "-f", fmt, target]
    for command in commands:
        args += ["-c", command]
    done = run(*args)
    assert "error" not in (done.stdout + done.stderr).lower(), done
    assert "pattern verification failed" not in done.stdout, done.stdout
    return done.stdout


def qemu_img(*args: str) -> str:
    return run(require_tool("qemu-img"), *args).stdout


def image_map(path: str, fmt: str) -> list[dict[str, Any]]:
    extents: list[dict[str, Any]] = json.loads(
        qemu_img("map", "--output=json", "-f", fmt, path))
    return extents


def covering(extents: list[dict[str, Any]], offset: int,
             length: int) -> list[dict[str, Any]]:
    return [e for e in extents
            if e["start"] < offset + length and offset < e["start"] + e["length"]]


def sparse(path: Path, size: int = SIZE) -> str:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return str(path)


def supports_direct(directory: Path | str) -> bool:
    fd, path = tempfile.mkstemp(dir=directory, suffix=".probe")
    os.close(fd)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
    except OSError:
        return False
    finally:
        os.unlink(path)
    return True


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose file system does O_DIRECT: tmp_path if it does."""
    if supports_direct(tmp_path):
        yield tmp_path
        return
    for candidate in ("/var/tmp", "/work"):
        if os.path.isdir(candidate) and supports_direct(candidate):
            with tempfile.TemporaryDirectory(dir=candidate, prefix="pynbd-cache-") as where:
                yield Path(where)
            return
    pytest.skip("no directory here supports O_DIRECT (tmp_path, /var/tmp, /work)")


def open_flags(server: RunningServer, path: str) -> list[int]:
    """The open flags of every fd of the server that refers to ``path``."""
    flags = []
    fds = f"/proc/{server.proc.pid}/fd"
    for fd in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{fd}") != path:
                continue
            with open(f"/proc/{server.proc.pid}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("flags:"):
                        flags.append(int(line.split()[1], 8))
        except FileNotFoundError:
            continue
    return flags


def refusal(*args: str) -> str:
    """pynbd's one line for a refused command line (status 2)."""
    done = run(sys.executable, "-m", "pynbd", *args, check=False)
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pynbd: ")
    return lines[0][len("pynbd: "):]


# -- every cache mode serves the right data --------------------------------------------


@pytest.mark.parametrize("mode", ["none", "directsync", "writethrough", "writeback",
                                  "unsafe"])
def test_cache_modes_serve_unaligned_io(pynbd_server: ServerFactory, direct_dir: Path,
                                        mode: str) -> None:
    image = sparse(direct_dir / "disk.img")
    mirror = sparse(direct_dir / "mirror.img")
    srv = pynbd_server("-f", "raw", f"--cache={mode}", image)
    direct = [bool(flag & os.O_DIRECT) for flag in open_flags(srv, image)]
    assert direct, "the server holds the image open"
    # none/directsync: the image fd (and only that one: the tail's is buffered)
    assert any(direct) == (mode in ("none", "directsync")), direct
    qemu_io(srv.uri, *WRITES)
    qemu_io(mirror, *WRITES)
    qemu_io(srv.uri, *READS)
    copy = str(direct_dir / "copy.img")
    run(require_tool("nbdcopy"), srv.uri, copy)
    assert Path(copy).read_bytes() == Path(mirror).read_bytes()
    # and a whole image written through the server by nbdcopy
    source = direct_dir / "source.img"
    source.write_bytes(bytes(range(256)) * (SIZE // 256) + b"\x5a" * (SIZE % 256))
    run(require_tool("nbdcopy"), str(source), srv.uri)
    run(require_tool("nbdcopy"), srv.uri, copy)
    assert Path(copy).read_bytes() == source.read_bytes()
    assert srv.stop() == 0
    assert os.path.getsize(image) == SIZE
    assert Path(image).read_bytes() == source.read_bytes()


def test_cache_none_on_qcow2_with_a_backing_file(pynbd_server: ServerFactory,
                                                 direct_dir: Path) -> None:
    """The image and the backing file its header names are both opened O_DIRECT (as
    qemu inherits cache.direct); writes keep the image consistent."""
    base = str(direct_dir / "base.qcow2")
    top = str(direct_dir / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "write -P 0x99 0 4M", fmt="qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    mirror = sparse(direct_dir / "mirror.img")
    qemu_io(mirror, "write -P 0x99 0 4M")
    srv = pynbd_server("-f", "qcow2", "--cache=none", top)
    for path in (base, top):
        flags = open_flags(srv, path)
        assert flags, path
        assert flags[0] & os.O_DIRECT, (path, flags)
    qemu_io(srv.uri, *WRITES)
    qemu_io(mirror, *WRITES)
    assert srv.stop() == 0
    assert json.loads(run(require_tool("qemu-img"), "check", "--output=json", top,
                          check=False).stdout).get("corruptions", 0) == 0
    done = run(require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", top, mirror,
               check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_memory_disk_takes_every_cache_mode(pynbd_server: ServerFactory) -> None:
    """qemu ignores cache.direct where there is no host I/O: so does a memory: disk."""
    for mode in ("none", "writethrough", "unsafe"):
        srv = pynbd_server(f"--cache={mode}", "memory:16M")
        qemu_io(srv.uri, "write -P 0x12 3 5000", "read -P 0x12 3 5000", "flush")
        assert srv.stop() == 0


# -- detect-zeroes -------------------------------------------------------------------------


@pytest.mark.parametrize("detect", [None, "on", "unmap"])
def test_detect_zeroes_on_a_raw_file(pynbd_server: ServerFactory, tmp_path: Path,
                                     detect: str | None) -> None:
    """A plain WRITE of zeroes (not WRITE_ZEROES) over data: with unmap it leaves a
    hole; with on it becomes a write-zeroes that keeps the blocks allocated (zeroed
    extents: ``qemu-img map`` says zero); off writes the zeroes as data."""
    image = sparse(tmp_path / "disk.img")
    args = ["--discard=unmap", *([f"--detect-zeroes={detect}"] if detect else [])]
    srv = pynbd_server("-f", "raw", *args, image)
    qemu_io(srv.uri, "write -P 0xaa 0 8M", "flush")
    before = os.stat(image).st_blocks * 512
    qemu_io(srv.uri, "write -P 0 1M 4M", "flush")  # -P 0: a write with a zero payload
    qemu_io(srv.uri, "read -P 0xaa 0 1M", "read -P 0 1M 4M", "read -P 0xaa 5M 3M")
    assert srv.stop() == 0
    after = os.stat(image).st_blocks * 512
    zeroed = covering(image_map(image, "raw"), 1 * MiB, 4 * MiB)
    if detect == "unmap":
        assert after <= before - 4 * MiB
        assert all(not e["data"] and e["zero"] for e in zeroed), zeroed
    elif detect == "on":
        assert after >= before
        assert all(e["zero"] for e in zeroed), zeroed
    else:
        assert after >= before
        assert all(e["data"] and not e["zero"] for e in zeroed), zeroed
    assert all(e["data"] for e in covering(image_map(image, "raw"), 0, MiB))


@pytest.mark.parametrize("detect", ["on", "unmap"])
def test_detect_zeroes_on_qcow2_makes_zero_clusters(pynbd_server: ServerFactory,
                                                    tmp_path: Path, detect: str) -> None:
    image = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, str(SIZE))
    mirror = sparse(tmp_path / "mirror.img")
    writes = ("write -P 0xaa 0 8M", "write -P 0 1M 4M", "write -P 0 6M 100")
    srv = pynbd_server("-f", "qcow2", "--discard=unmap", f"--detect-zeroes={detect}", image)
    qemu_io(srv.uri, *writes)
    qemu_io(mirror, *writes)
    assert srv.stop() == 0
    extents = image_map(image, "qcow2")
    assert all(e["zero"] and not e["data"] for e in covering(extents, MiB, 4 * MiB)), extents
    assert all(e["data"] for e in covering(extents, 0, MiB))
    # the 100 zero bytes are not whole clusters: written as zeroes, still data
    assert all(e["data"] for e in covering(extents, 6 * MiB, 100))
    report = json.loads(run(require_tool("qemu-img"), "check", "--output=json", image,
                            check=False).stdout)
    assert report.get("corruptions", 0) == 0, report
    done = run(require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", image, mirror,
               check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- refusals ------------------------------------------------------------------------------


def test_detect_zeroes_unmap_needs_discard_unmap(tmp_path: Path) -> None:
    """qemu-nbd's words (qemu-nbd itself says the same)."""
    image = sparse(tmp_path / "disk.img")
    line = refusal("-f", "raw", "--detect-zeroes=unmap", image)
    assert line == ("setting detect-zeroes to unmap is not allowed without setting discard "
                    "operation to unmap")
    qemu = run(require_tool("qemu-nbd"), "-f", "raw", "--detect-zeroes=unmap", image,
               check=False)
    assert qemu.returncode != 0
    assert line in qemu.stderr
    assert refusal("-f", "raw", "--discard=ignore", "--detect-zeroes=unmap", image) == line


def test_o_direct_refused_by_the_file_system() -> None:
    """procfs cannot do O_DIRECT: qemu's words (qemu-io says the same)."""
    line = refusal("-r", "-f", "raw", "--cache=none", "/proc/version")
    assert line == "Could not open '/proc/version': filesystem does not support O_DIRECT"
    qemu = run(require_tool("qemu-io"), "-r", "-f", "raw", "-t", "none", "-c", "read 0 512",
               "/proc/version", check=False)
    assert line in qemu.stderr + qemu.stdout


@pytest.mark.parametrize(("args", "want"), [
    (["--aio=native"], "--aio=native is not supported: pynbd does its file I/O in a thread "
                       "pool (--aio=threads, the default)"),
    (["--aio=io_uring", "--cache=none"], "--aio=io_uring is not supported: pynbd does its "
                                         "file I/O in a thread pool (--aio=threads, the "
                                         "default)"),
    (["-n", "--cache=writeback"], "-n and --cache can only be specified once"),
    (["--cache=bogus"], "argument --cache: invalid choice: 'bogus' (choose from 'none', "
                        "'off', 'writeback', 'writethrough', 'directsync', 'unsafe')"),
    (["--aio=bogus"], "argument --aio: invalid choice: 'bogus' (choose from 'threads', "
                      "'native', 'io_uring')"),
    (["--detect-zeroes=bogus"], "argument --detect-zeroes: invalid choice: 'bogus' (choose "
                                "from 'off', 'on', 'unmap')"),
])
def test_bad_options_are_one_line(tmp_path: Path, args: list[str], want: str) -> None:
    image = sparse(tmp_path / "disk.img")
    assert refusal("-f", "raw", *args, image) == want


def test_accepted_spellings(pynbd_server: ServerFactory, direct_dir: Path) -> None:
    """-n and --cache=off are qemu-nbd's other names for --cache=none; --aio=threads and
    --detect-zeroes=off change nothing."""
    image = sparse(direct_dir / "disk.img")
    for args in (["-n"], ["--cache=off"], ["--aio=threads", "--detect-zeroes=off"]):
        srv = pynbd_server("-f", "raw", *args, image)
        direct = any(flag & os.O_DIRECT for flag in open_flags(srv, image))
        assert direct == (args != ["--aio=threads", "--detect-zeroes=off"])
        qemu_io(srv.uri, "write -P 0x21 7 77", "read -P 0x21 7 77")
        assert srv.stop() == 0


def test_snapshot_overlay_inherits_cache_direct(pynbd_server: ServerFactory, direct_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``-s --cache=none``: the temporary overlay is opened O_DIRECT as well (qemu's
    overlay inherits cache.direct), serves the writes, and the image keeps its bytes."""
    temp = direct_dir / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    image = sparse(direct_dir / "disk.img")
    qemu_io(image, "write -P 0x42 0 1M")
    before = Path(image).read_bytes()
    mirror = sparse(direct_dir / "mirror.img")
    qemu_io(mirror, "write -P 0x42 0 1M", *WRITES)
    srv = pynbd_server("-f", "raw", "-s", "--cache=none", image)
    fds = f"/proc/{srv.proc.pid}/fd"
    overlay = {os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)
               if os.readlink(f"{fds}/{fd}").startswith(f"{temp}/vl.")}
    assert len(overlay) == 1, overlay  # the direct fd and the buffered one of the tail
    assert any(flags & os.O_DIRECT for flags in open_flags(srv, overlay.pop()))
    qemu_io(srv.uri, *WRITES)
    copy = str(direct_dir / "copy.img")
    run(require_tool("nbdcopy"), srv.uri, copy)
    assert Path(copy).read_bytes() == Path(mirror).read_bytes()
    assert srv.stop() == 0
    assert Path(image).read_bytes() == before
    assert os.listdir(temp) == []
