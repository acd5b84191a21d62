"""The benchmark's throwaway Ceph cluster: start, images, OSD pid, stop.

bench/run.py's ``rbd`` column uses this.  The cluster itself comes from
``scripts/ceph-cluster`` (one monitor, one memstore OSD on 127.0.0.1, pool
``rbd``), started in a directory inside the benchmark's temp dir and stopped
by pid.  This module only runs that script and the ``rbd`` command line tool,
each with a timeout, and finds the OSD's pid so that its CPU can be measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import shutil
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ceph-cluster"
POOL = "rbd"
START_TIMEOUT = 120.0  # the script gives itself 60 s
STOP_TIMEOUT = 60.0  # the script: SIGTERM, 15 s, SIGKILL, rm -rf
#: a killed client's watch keeps an image busy until the OSD expires it (5 s in
#: ceph-cluster's configuration)
REMOVE_RETRY_S = 15.0
TOOLS = ("rbd", "ceph", "ceph-mon", "ceph-osd", "monmaptool", "rados")


@dataclasses.dataclass(frozen=True)
class Cluster:
    root: Path
    conf: Path
    osd_pid: int

    def spec(self, image: str) -> str:
        """qemu's (and pynbd's) ``rbd:`` filename for ``image`` in the pool."""
        return f"rbd:{POOL}/{image}:conf={self.conf}"


def missing_requirements() -> list[str]:
    """What the rbd column needs and this host lacks (tools, pynbd's Python bindings)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not SCRIPT.exists():
        missing.append(str(SCRIPT))
    missing += [f"python module {m} (python3-{m})" for m in ("rados", "rbd")
                if importlib.util.find_spec(m) is None]
    return missing


def _check(cmd: list[str], timeout: float) -> str:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def start(root: Path, memstore_bytes: int) -> Cluster:
    """Start a cluster in ``root`` (absent or empty); the caller must call :func:`stop`.

    ``stop(root)`` is safe (and needed) even when this raises half-way.
    """
    out = _check([str(SCRIPT), "start", str(root), "--memstore-bytes", str(memstore_bytes)],
                 START_TIMEOUT)
    conf = Path(out.strip().splitlines()[-1])
    osd = [pid for pid in _pids(root) if _comm(pid) == "ceph-osd"]
    if len(osd) != 1:
        raise RuntimeError(f"expected one ceph-osd among {_pids(root)}, found {osd}")
    return Cluster(root, conf, osd[0])


def stop(root: Path) -> None:
    """Stop the cluster in ``root`` by pid (the script's ``stop``) and remove ``root``."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run([str(SCRIPT), "stop", str(root)], check=False, capture_output=True,
                       timeout=STOP_TIMEOUT)


def _pids(root: Path) -> list[int]:
    try:
        return [int(x) for x in (root / "pids").read_text().split()]
    except (OSError, ValueError):
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def rbd(cluster: Cluster, *args: str, timeout: float = 60.0) -> str:
    """Run ``rbd -c CONF ARGS...`` (bounded, no progress output); its stdout."""
    return _check(["rbd", "-c", str(cluster.conf), "--no-progress", *args], timeout)


def import_image(cluster: Cluster, source: Path, name: str, size: int) -> None:
    """A new image ``name`` (layering only) holding a copy of the raw file ``source``."""
    rbd(cluster, "import", "--image-feature", "layering", str(source), f"{POOL}/{name}",
        timeout=60 + size / 10e6)


def create_image(cluster: Cluster, name: str, size: int) -> None:
    """A new, empty image ``name`` of ``size`` bytes (a multiple of 1 MiB), layering only."""
    rbd(cluster, "create", "--size", f"{size >> 20}M", "--image-feature", "layering",
        f"{POOL}/{name}")


def remove_image(cluster: Cluster, name: str, size: int) -> None:
    """Remove image ``name``, retrying (bounded) while a stopped server's watch lingers."""
    deadline = time.monotonic() + REMOVE_RETRY_S
    while True:
        try:
            rbd(cluster, "rm", f"{POOL}/{name}", timeout=60 + size / 100e6)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
