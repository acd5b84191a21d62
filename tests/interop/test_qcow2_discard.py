"""Freed qcow2 clusters, served: ``pynbd --discard unmap image.qcow2`` to qemu-io.

A client's discard frees the clusters; the client's flush makes the change
durable, and then the freed clusters are punched in the host file (``du``
drops) and reused by later writes (the file does not grow).  Without
``--discard unmap`` nothing is punched, but the clusters are reused all the
same.  After the server stops, ``qemu-img check`` finds no corruption and no
leak, and ``qemu-img compare`` finds the image identical to a raw mirror that
received the same requests.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.support.interop import require_tool

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import ServerFactory

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB
TIMEOUT = 60


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=check)


def qemu_io(target: str, *commands: str, fmt: str = "raw") -> None:
    """qemu-io commands on an image or an NBD URI (which is always raw)."""
    args = [require_tool("qemu-io"), "-f", fmt, target]
    for command in commands:
        args += ["-c", command]
    done = run(*args)
    output = (done.stdout + done.stderr).lower()
    for word in ("error", "failed", "pattern verification"):
        assert word not in output, done


def on_disk(path: str) -> int:
    """Bytes the file takes on disk (what ``du`` counts)."""
    return os.stat(path).st_blocks * 512


def assert_clean(image: str) -> None:
    """No corruption and, after the server's clean close, no leaked cluster."""
    done = run(require_tool("qemu-img"), "check", "--output=json", image, check=False)
    report = json.loads(done.stdout)
    for key in ("corruptions", "leaks", "check-errors"):
        assert report.get(key, 0) == 0, report


def assert_same(image: str, mirror: str) -> None:
    done = run(require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", image, mirror,
               check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def new_image(tmp_path: Path, *options: str) -> tuple[str, str]:
    image, mirror = str(tmp_path / "disk.qcow2"), str(tmp_path / "mirror.raw")
    run(require_tool("qemu-img"), "create", "-q", "-f", "qcow2", *options, image, str(SIZE))
    with open(mirror, "wb") as fh:
        fh.truncate(SIZE)
    return image, mirror


def both(uri: str, mirror: str, *commands: str) -> None:
    """The same requests to the export and to the raw mirror."""
    qemu_io(uri, *commands)
    qemu_io(mirror, *commands)


@pytest.mark.parametrize("options", [
    (),
    ("-o", "compat=0.10"),
    ("-o", "cluster_size=4096,refcount_bits=1"),
    ("-o", "cluster_size=2M,refcount_bits=64"),
    ("-o", "extended_l2=on,cluster_size=128k"),
], ids=["default", "v2", "4k-rc1", "2M-rc64", "extended-l2"])
def test_discard_unmap_punches_and_clusters_are_reused(pynbd_server: ServerFactory,
                                                      tmp_path: Path,
                                                      options: tuple[str, ...]) -> None:
    image, mirror = new_image(tmp_path, *options)
    srv = pynbd_server("--discard", "unmap", "-f", "qcow2", image)
    both(srv.uri, mirror, "write -P 0x11 0 8M", "write -P 0x12 12M 1M", "flush")
    written, size = on_disk(image), os.path.getsize(image)
    both(srv.uri, mirror, "discard 0 8M", "flush")
    assert on_disk(image) <= written - 6 * MiB, (written, on_disk(image))
    both(srv.uri, mirror, "write -P 0x22 32M 7M", "flush")
    assert os.path.getsize(image) <= size  # the freed clusters hold the new data
    qemu_io(srv.uri, "read -P 0 0 8M", "read -P 0x12 12M 1M", "read -P 0x22 32M 7M")
    assert srv.stop() == 0
    assert_clean(image)
    assert_same(image, mirror)


def test_without_discard_unmap_nothing_is_punched(pynbd_server: ServerFactory,
                                                  tmp_path: Path) -> None:
    """The default (``--discard ignore``, as qemu-nbd): the host file keeps its blocks;
    the clusters the discard freed in the image are still reused."""
    image, mirror = new_image(tmp_path)
    srv = pynbd_server("-f", "qcow2", image)
    both(srv.uri, mirror, "write -P 0x31 0 8M", "flush")
    written, size = on_disk(image), os.path.getsize(image)
    both(srv.uri, mirror, "discard 0 8M", "flush")
    assert on_disk(image) >= written
    both(srv.uri, mirror, "write -P 0x32 16M 8M", "flush")
    assert os.path.getsize(image) <= size
    assert srv.stop() == 0
    assert_clean(image)
    assert_same(image, mirror)
