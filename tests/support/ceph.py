"""A real single-node Ceph cluster for the RBD tests (scripts/ceph-cluster).

``CephCluster.start(root)`` runs ``scripts/ceph-cluster start`` (one monitor,
one memstore OSD on 127.0.0.1) and ``stop()`` stops it by pid.  Images are
made and inspected with Ceph's own ``rbd`` command and Python bindings.

The RBD tier is part of the README's test command: when Ceph is missing the
tests fail with a pointer to it; they are never skipped.
"""

from __future__ import annotations

import importlib
import itertools
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ceph-cluster"
POOL = "rbd"
_names = itertools.count()


def require_ceph() -> None:
    """Fail (never skip) when the Ceph daemons or bindings are missing."""
    missing = [tool for tool in ("ceph-mon", "ceph-osd", "ceph", "rbd", "rados")
               if shutil.which(tool) is None]
    for module in ("rados", "rbd"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"python3-{module}")
    if missing:
        pytest.fail(f"Ceph is not installed ({', '.join(missing)}): run the README's "
                    "test command, which installs every test dependency")


@dataclass
class CephCluster:
    root: Path
    conf: Path
    pool: str = POOL
    _stopped: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, root: Path) -> CephCluster:
        require_ceph()
        done = subprocess.run([str(SCRIPT), "start", str(root), "--pool", POOL],
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            subprocess.run([str(SCRIPT), "stop", str(root)], check=False, timeout=60)
            pytest.fail(f"scripts/ceph-cluster start failed: {done.stderr.strip()}")
        return cls(root=root, conf=Path(done.stdout.strip().splitlines()[-1]))

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            subprocess.run([str(SCRIPT), "stop", str(self.root)], check=False, timeout=60)

    def rbd(self, *args: str, timeout: float = 60) -> str:
        """Run Ceph's ``rbd`` command against this cluster."""
        done = subprocess.run(["rbd", "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(f"rbd {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def new_image(self, size: int, *, exclusive_lock: bool = False, fast_diff: bool = False,
                  prefix: str = "img") -> str:
        """Create a fresh image of ``size`` bytes; return its name.

        Without ``exclusive_lock`` the image has only the layering feature, the
        setting for several writable gateways; ``fast_diff`` adds exclusive-lock,
        object-map and fast-diff (rbd's defaults).
        """
        name = f"{prefix}{next(_names)}"
        rados, rbd = importlib.import_module("rados"), importlib.import_module("rbd")
        features = rbd.RBD_FEATURE_LAYERING
        if exclusive_lock or fast_diff:
            features |= rbd.RBD_FEATURE_EXCLUSIVE_LOCK
        if fast_diff:
            features |= rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF
        with rados.Rados(conffile=str(self.conf)) as cluster, \
                cluster.open_ioctx(self.pool) as ioctx:
            rbd.RBD().create(ioctx, name, size, old_format=False, features=features)
        return name

    def spec(self, image: str, *extra: str) -> str:
        """qemu's ``rbd:`` filename of an image in this cluster."""
        return ":".join([f"rbd:{self.pool}/{image}", f"conf={self.conf}", *extra])

    def read(self, image: str, offset: int, length: int, snapshot: str | None = None) -> bytes:
        """Read an image straight from the cluster (not through any gateway)."""
        rados, rbd = importlib.import_module("rados"), importlib.import_module("rbd")
        with rados.Rados(conffile=str(self.conf), conf={"rbd_cache": "false"}) as cluster, \
                cluster.open_ioctx(self.pool) as ioctx, \
                rbd.Image(ioctx, image, snapshot=snapshot, read_only=True) as img:
            data: Any = img.read(offset, length)
            return bytes(data)
