"""Internal qcow2 snapshots through a real ``pynbd`` server, qemu's tools as the oracle.

``pynbd -l`` serves a snapshot made by ``qemu-img snapshot -c`` read-only, and
clients (qemu-img, nbdcopy, nbdinfo, libnbd) read what ``qemu-img convert -l``
reads; refusals are worded as qemu-nbd words them.  Without ``-l`` an image with
snapshots stays writable: writes copy the clusters the snapshots share, and
afterwards ``qemu-img check`` is clean, the image equals a raw mirror given the
same writes, and every snapshot still reads its old content.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import nbd
import pytest
from tests.support.interop import require_tool

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import ServerFactory

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 16 * MiB
TIMEOUT = 60

#: qemu-io commands before the first snapshot, between the two, and after the second
BEFORE_FIRST = ("write -P 0x11 0 3M", "write -P 0x12 5M 100k", "write -P 0x13 15M 1M")
BEFORE_SECOND = ("write -P 0x21 1M 64k", "write -z 5M 64k", "write -P 0x22 8M 2M")
AFTER_SECOND = ("write -P 0x31 0 4k", "discard 8M 1M", "write -P 0x32 12M 5k")

#: writes through NBD to the active image: each lands on clusters the snapshots share
WRITES = (
    "write -P 0x41 0 64k",
    "write -P 0x42 1000000 300000",  # unaligned, across clusters
    "write -z 2M 1M",
    "write -P 0x43 5M 4k",  # part of a cluster: the rest is copied
    "discard 8M 1M",
    "write -P 0x44 15M 1M",
    "write -z 9M 4k",
)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=check)


def qemu_img(*args: str) -> str:
    return run(require_tool("qemu-img"), *args).stdout


def qemu_io(target: str, *commands: str, fmt: str = "raw", read_only: bool = False) -> None:
    args = [require_tool("qemu-io"), *(["-r"] if read_only else []), "-f", fmt, target]
    for command in commands:
        args += ["-c", command]
    done = run(*args)
    assert "error" not in done.stdout.lower() + done.stderr.lower(), done


def make_image(path: Path, *options: str) -> str:
    """Snapshots "first" (id 1) and "second" (id 2), then more writes to the image."""
    image = str(path)
    qemu_img("create", "-q", "-f", "qcow2", *options, image, str(SIZE))
    qemu_io(image, *BEFORE_FIRST, fmt="qcow2")
    qemu_img("snapshot", "-c", "first", image)
    qemu_io(image, *BEFORE_SECOND, fmt="qcow2")
    qemu_img("snapshot", "-c", "second", image)
    qemu_io(image, *AFTER_SECOND, fmt="qcow2")
    return image


def md5(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.md5(fh.read()).hexdigest()


def converted(image: str, selector: str, out: Path) -> str:
    """The snapshot as ``qemu-img convert -l`` reads it, as a raw file; its md5."""
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", selector, image, str(out))
    return md5(str(out))


def copied(uri: str, out: Path, *, tool: str = "nbdcopy") -> str:
    """The export copied to a raw file by ``tool``; its md5."""
    if tool == "nbdcopy":
        run(require_tool("nbdcopy"), uri, str(out))
    else:
        qemu_img("convert", "-f", "raw", "-O", "raw", uri, str(out))
    return md5(str(out))


def assert_clean(image: str) -> None:
    done = run(require_tool("qemu-img"), "check", "--output=json", image, check=False)
    report = json.loads(done.stdout)
    for key in ("corruptions", "leaks", "check-errors"):
        assert report.get(key, 0) == 0, report


@pytest.mark.parametrize("options", [(), ("-o", "compat=0.10"), ("-o", "cluster_size=4k")],
                         ids=["v3", "v2", "4k"])
def test_snapshots_served_as_qemu_img_converts_them(pynbd_server: ServerFactory,
                                                    tmp_path: Path,
                                                    options: tuple[str, ...]) -> None:
    image = make_image(tmp_path / "disk.qcow2", *options)
    first = converted(image, "snapshot.name=first", tmp_path / "first.raw")
    second = converted(image, "snapshot.name=second", tmp_path / "second.raw")
    assert len({first, second, converted(image, "snapshot.id=1", tmp_path / "id1.raw")}) == 2
    before = md5(image)
    cases = [
        (("-l", "first"), first, "nbdcopy"),
        (("-l", "2"), second, "qemu-img"),  # tried as an id first
        (("--load-snapshot", "1", "-f", "qcow2"), first, "qemu-img"),
        (("-l", "snapshot.id=1"), first, "nbdcopy"),
        (("-l", "snapshot.name=second"), second, "nbdcopy"),
        (("-l", "snapshot.id=2,snapshot.name=second"), second, "qemu-img"),
    ]
    for number, (args, want, tool) in enumerate(cases):
        srv = pynbd_server(*args, image)
        assert copied(srv.uri, tmp_path / f"copy{number}.raw", tool=tool) == want, args
        assert srv.stop() == 0
    assert md5(image) == before, "serving a snapshot changed the image"


def test_snapshot_export_is_read_only(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    """-l makes the export read-only as qemu-nbd's does: nbdinfo says so, libnbd
    refuses writes, and a write sent anyway gets EPERM from the server."""
    image = make_image(tmp_path / "disk.qcow2")
    before = md5(image)
    srv = pynbd_server("-l", "first", image)
    info = json.loads(run(require_tool("nbdinfo"), "--json", srv.uri).stdout)["exports"][0]
    assert info["is_read_only"] is True
    assert info["export-size"] == SIZE
    qemu_io(srv.uri, "read -P 0x11 0 3M", "read -P 0x12 5M 100k", "read -P 0 6M 1M",
            read_only=True)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    try:
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"\xee" * 4096, 0)
        h.set_strict_mode(0)  # send it anyway
        with pytest.raises(nbd.Error) as write:
            h.pwrite(b"\xee" * 4096, 0)
        with pytest.raises(nbd.Error) as zero:
            h.zero(4096, 0)
        with pytest.raises(nbd.Error) as trim:
            h.trim(4096, 0)
        assert [refused.value.errno for refused in (write, zero, trim)] == ["EPERM"] * 3
        assert h.pread(4096, 0) == b"\x11" * 4096
    finally:
        h.shutdown()
    assert srv.stop() == 0
    assert md5(image) == before
    assert_clean(image)


def _pynbd_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "pynbd", *args, check=False)


@pytest.mark.parametrize(("args", "raw"), [
    (("-l", "nosuch"), False),
    (("-l", "snapshot.id=1,snapshot.name=second"), False),  # both must match
    (("-l", "snapshot.name="), False),
    (("-l", "first", "-f", "raw"), True),
    (("-l", "first"), True),  # probed raw
], ids=["unknown", "id-and-name-differ", "empty-name", "raw", "probed-raw"])
def test_refusals_are_worded_as_qemu_nbd(tmp_path: Path, args: tuple[str, ...],
                                         raw: bool) -> None:
    """Exit status 2 as every failure to open the image (qemu-nbd: 1), one line,
    the words of qemu-nbd."""
    if raw:
        image = str(tmp_path / "disk.raw")
        with open(image, "wb") as fh:
            fh.truncate(MiB)
    else:
        image = make_image(tmp_path / "disk.qcow2")
    ours = _pynbd_fails("-k", str(tmp_path / "p.sock"), *args, image)
    theirs = run(require_tool("qemu-nbd"), "-k", str(tmp_path / "q.sock"), *args, image,
                 check=False)
    assert (ours.returncode, theirs.returncode) == (2, 1), (ours, theirs)
    assert ours.stderr.startswith("pynbd: Failed to load snapshot: "), ours.stderr
    assert ours.stderr.count("\n") == 1
    assert ours.stderr.removeprefix("pynbd: ") == theirs.stderr.removeprefix("qemu-nbd: ")


def test_bad_snapshot_parameters(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2")
    done = _pynbd_fails("-k", str(tmp_path / "p.sock"), "-l", "snapshot.tag=first", image)
    assert done.returncode == 2
    assert done.stderr == ("pynbd: Failed in parsing snapshot param `snapshot.tag=first': "
                           "Invalid parameter 'snapshot.tag'\n")


def test_parameter_syntax(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    """qemu's option syntax: ",," is a comma in a value, the last of a key counts."""
    image = make_image(tmp_path / "disk.qcow2")
    qemu_img("snapshot", "-c", "a,b", image)
    want = converted(image, "snapshot.name=a,,b", tmp_path / "ab.raw")
    first = converted(image, "snapshot.id=1", tmp_path / "first.raw")
    for args, expected in ((("-l", "snapshot.name=a,,b"), want), (("-l", "a,b"), want),
                           (("-l", "snapshot.id=3,snapshot.id=1"), first)):
        srv = pynbd_server(*args, image)
        assert copied(srv.uri, tmp_path / "copy.raw") == expected, args
        assert srv.stop() == 0


@pytest.mark.parametrize("options", [
    (),
    ("-o", "compat=0.10"),
    ("-o", "cluster_size=4k,refcount_bits=2"),
    ("-o", "extended_l2=on,cluster_size=128k"),
], ids=["v3", "v2", "4k-rc2", "extended-l2"])
def test_active_image_stays_writable(pynbd_server: ServerFactory, tmp_path: Path,
                                     options: tuple[str, ...]) -> None:
    """Without -l the active image is served writable; writes over clusters that
    snapshots share copy them (refcount > 1, no COPIED flag), and each snapshot
    keeps its content, through qemu-img and through pynbd -l."""
    image = make_image(tmp_path / "disk.qcow2", *options)
    snapshots = {name: converted(image, f"snapshot.name={name}", tmp_path / f"{name}.raw")
                 for name in ("first", "second")}
    mirror = str(tmp_path / "mirror.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, mirror)
    srv = pynbd_server("-f", "qcow2", image)
    qemu_io(srv.uri, *WRITES)
    qemu_io(mirror, *WRITES)
    assert srv.stop() == 0
    assert_clean(image)
    compare = run(require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", image,
                  mirror, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    for name, want in snapshots.items():
        assert converted(image, f"snapshot.name={name}", tmp_path / "after.raw") == want, name
        srv = pynbd_server("-l", name, image)
        assert copied(srv.uri, tmp_path / "served.raw") == want, name
        assert srv.stop() == 0


def test_snapshot_over_a_backing_file(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    """What a snapshot leaves unallocated reads from the image's backing file."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as fh:
        fh.truncate(SIZE)
    qemu_io(str(base), "write -P 0xb0 0 16M")
    image = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", image)
    qemu_io(image, "write -P 0x51 1M 1M", fmt="qcow2")
    qemu_img("snapshot", "-c", "snap", image)
    qemu_io(image, "write -P 0x52 0 4M", fmt="qcow2")
    want = converted(image, "snapshot.name=snap", tmp_path / "want.raw")
    srv = pynbd_server("-l", "snap", image)
    assert copied(srv.uri, tmp_path / "got.raw") == want
    qemu_io(srv.uri, "read -P 0xb0 0 1M", "read -P 0x51 1M 1M", "read -P 0xb0 2M 14M",
            read_only=True)
    assert srv.stop() == 0


def _qemu_nbd_size(args: list[str], sock: Path) -> int:
    """The export size qemu-nbd serves with ``args`` (its socket waited for)."""
    proc = subprocess.Popen([require_tool("qemu-nbd"), "-t", "-k", str(sock), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        return int(run(require_tool("nbdinfo"), "--size", uri).stdout)
    finally:
        proc.terminate()
        proc.communicate(timeout=TIMEOUT)


def test_resized_image_size_as_qemu_nbd(pynbd_server: ServerFactory, tmp_path: Path) -> None:
    """A snapshot taken before the image grew is served at the image's size, as
    qemu-nbd -l serves it (qemu keeps the size when it loads a snapshot)."""
    image = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "4M")
    qemu_io(image, "write -P 0x61 0 4M", fmt="qcow2")
    qemu_img("snapshot", "-c", "small", image)
    qemu_img("resize", "-q", image, "12M")
    qemu_io(image, "write -P 0x62 8M 1M", fmt="qcow2")
    theirs = _qemu_nbd_size(["-l", "small", image], tmp_path / "q.sock")
    srv = pynbd_server("-l", "small", image)
    assert int(run(require_tool("nbdinfo"), "--size", srv.uri).stdout) == theirs == 12 * MiB
    want = converted(image, "snapshot.name=small", tmp_path / "want.raw")
    assert copied(srv.uri, tmp_path / "got.raw") == want
    assert srv.stop() == 0
