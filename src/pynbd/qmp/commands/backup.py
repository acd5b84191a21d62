"""Backup jobs: ``blockdev-backup`` (a command, and an action of ``transaction``),
``query-block-jobs`` and ``block-job-cancel``, and the generic job commands
``query-jobs`` and ``job-cancel`` over the same jobs.

pynbd runs qemu's pull-mode backup, *fleecing*: ``blockdev-backup`` with
``sync: none``, the job libvirt's pull-mode backup starts.  The job freezes a
view of ``device``: a copy-before-write node (``pynbd.block.fleece``) goes over
it, copying the old data of every granule a write is about to change into
``target`` first.  The target is a qcow2 image whose backing node is the
device, exported read-only: it holds the copies itself and reads everything
else through its backing node, so it shows the device as it was when the job
began, while the device's writable exports go on.

Rules of this module:
- The moment frozen is when the action runs.  The actions of a transaction run
  one after the other with no await between them (``commands.bitmaps``), and
  the daemon serves every client on one event loop, so no write lands between
  the freeze and the bitmap actions of the same transaction: a
  ``block-dirty-bitmap-add`` there records every write the view does not hold,
  and a ``block-dirty-bitmap-disable`` there stops the previous bitmap at the
  view.  A write in flight at that moment that had passed the tracking filter
  (recorded by the previous bitmap, not copied) belongs to the view: reads of
  the view wait until such writes have landed (the job is *sealed*).  One that
  had not (a fast-path attempt recorded it, the task path goes on after the
  freeze) is copied before it lands and recorded by the new bitmap too.
- While the job runs the target's backing node reads the frozen view, not the
  live device (``FrozenBacking``): a read of an uncopied range is a frozen
  read, which writes to that range wait for (qemu serialises the copies with
  the reads of a fleecing target for the same reason).  A target of another
  shape is allowed, as in qemu, but shows only the copies.
- The copy-before-write node joins the graph under ``filter-node-name`` or a
  generated name, as qemu's job filter does (queries show it); it uses the
  device and the target, so neither can be deleted while the job runs, and
  one node is the target of one job at most.
- A job runs until ``block-job-cancel``: the copying stops at once (reads of
  the view fail from then on), then, in the background, the copies in flight
  end, the filter leaves the graph, the target reads its backing node again,
  and ``BLOCK_JOB_CANCELLED`` follows; deleting the target then frees the
  copies.  ``JOB_STATUS_CHANGE`` reports created, running, aborting,
  concluded and null, as qemu's (auto-finalize, auto-dismiss).
- The jobs are kept per engine (``jobs``), from the action that makes one
  (undone with it if the transaction fails) until its cancellation ends.
- Checks, their order and their words are qemu 7.2's where it has them; the
  other sync modes, compression and manual finalize or dismiss are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from ...block.blockdev import MAX_NODE_NAME
from ...block.fleece import CopyBeforeWrite
from ...block.graph import GraphError, shown
from ...block.snapshotaccess import FrozenBacking
from ...block.tracking import bitmaps_of
from .. import schema as s
from ..protocol import QMPError, generic_error
from . import JSON, NO_ARGS, Command, id_wellformed

if TYPE_CHECKING:
    from collections.abc import Callable

    from ...block.node import Node
    from ...block.qcow2 import Qcow2Node
    from ..engine import Engine

_ON_ERROR = s.Enum(("report", "ignore", "enospc", "stop", "auto"))
# qemu's BlockdevBackup (BackupCommon and target), without x-perf
BLOCKDEV_BACKUP = s.Struct(
    {"job-id": str, "device": str, "target": str,
     "sync": s.Enum(("top", "full", "none", "incremental", "bitmap")),
     "speed": int, "bitmap": str, "bitmap-mode": s.Enum(("on-success", "never", "always")),
     "compress": bool, "on-source-error": _ON_ERROR, "on-target-error": _ON_ERROR,
     "auto-finalize": bool, "auto-dismiss": bool, "filter-node-name": str},
    frozenset({"job-id", "speed", "bitmap", "bitmap-mode", "compress", "on-source-error",
               "on-target-error", "auto-finalize", "auto-dismiss", "filter-node-name"}))
BLOCK_JOB_CANCEL = s.Struct({"device": str, "force": bool}, frozenset({"force"}))
JOB_CANCEL = s.Struct({"id": str})

Args = dict[str, Any]


class Steps(Protocol):
    """What an action leaves to its transaction (``commands.bitmaps``): steps that undo
    it if a later action fails, and steps to take once every action succeeded."""

    undo_steps: list[Callable[[], None]]
    starts: list[Callable[[], None]]


@dataclasses.dataclass(eq=False)
class BackupJob:
    """A ``sync: none`` backup job: the copy-before-write node that keeps its view."""

    id: str
    cbw: CopyBeforeWrite
    #: the copy-before-write node's name in the graph
    filter_name: str
    #: set once the writes in flight when the copying began have landed
    sealed: asyncio.Event
    status: str = "created"
    #: while running, the target image whose backing node reads the view, and that node
    overlay: Qcow2Node | None = None
    backing: Node | None = None

    def info(self) -> dict[str, JSON]:
        """qemu's BlockJobInfo."""
        copied = min(self.cbw.done.count(), self.cbw.size)
        return {"type": "backup", "device": self.id, "len": self.cbw.size,
                "offset": copied, "busy": False, "paused": False, "speed": 0,
                "io-status": "ok", "ready": False, "status": self.status,
                "auto-finalize": True, "auto-dismiss": True}

    def job_info(self) -> dict[str, JSON]:
        """qemu's JobInfo (``query-jobs``)."""
        return {"id": self.id, "type": "backup", "status": self.status,
                "current-progress": min(self.cbw.done.count(), self.cbw.size),
                "total-progress": self.cbw.size}


_JOBS: weakref.WeakKeyDictionary[Engine, dict[str, BackupJob]] = weakref.WeakKeyDictionary()


def jobs(engine: Engine) -> dict[str, BackupJob]:
    """The backup jobs of ``engine``, by id."""
    return _JOBS.setdefault(engine, {})


def _status(engine: Engine, job: BackupJob, status: str) -> None:
    job.status = status
    engine.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": status})


# -- blockdev-backup ---------------------------------------------------------------------


def _check_bitmap(device: Node, args: Args) -> None:
    """qemu's checks of ``bitmap`` and ``bitmap-mode`` (``do_backup_common``)."""
    sync = args["sync"]
    if sync in ("bitmap", "incremental") and "bitmap" not in args:
        raise generic_error(f"must provide a valid bitmap name for '{sync}' sync mode")
    mode = args.get("bitmap-mode")
    if sync == "incremental":
        if mode not in (None, "on-success"):
            raise generic_error("Bitmap sync mode must be 'on-success' when using sync "
                                "mode 'incremental'")
        sync, mode = "bitmap", "on-success"
    name = args.get("bitmap")
    if name is None:
        if mode is not None:
            raise generic_error("Cannot specify bitmap sync mode without a bitmap")
        return
    bitmap = bitmaps_of(shown(device)).get(name)
    if bitmap is None:
        raise generic_error(f"Bitmap '{name}' could not be found")
    if mode is None:
        raise generic_error("Bitmap sync mode must be given when providing a bitmap")
    if bitmap.busy:
        raise generic_error(f"Bitmap '{name}' is currently in use by another operation "
                            "and cannot be used")
    if bitmap.inconsistent:
        raise generic_error(f"Bitmap '{name}' is inconsistent and cannot be used")
    if sync == "none":
        raise generic_error("sync mode 'none' does not produce meaningful bitmap outputs")
    if mode == "never" and sync != "bitmap":
        raise generic_error(f"Bitmap sync mode 'never' has no meaningful effect when "
                            f"combined with sync mode '{sync}'")


def _check_job(engine: Engine, device: Node, target: Node, args: Args) -> None:
    """qemu's checks of ``backup_job_create`` up to the filter, and what pynbd refuses."""
    if shown(device) is shown(target):
        raise generic_error("Source and target cannot be the same")
    if args.get("compress", False):
        raise generic_error(f"Compression is not supported for this drive {args['target']}")
    if any(job.cbw.children.get("target") is target for job in jobs(engine).values()):
        raise generic_error(f"Node '{args['target']}' is busy: block device is in use by "
                            "block job: backup")
    if target.size != device.size:
        raise generic_error("Source and target image have different sizes")
    if args["sync"] != "none":
        raise generic_error(f"Backup sync mode '{args['sync']}' is not supported: pynbd "
                            "runs pull-mode backups (sync 'none'), whose target a client "
                            "copies from")
    if not (args.get("auto-finalize", True) and args.get("auto-dismiss", True)):
        raise generic_error("pynbd's backup jobs finalize and dismiss themselves "
                            "(auto-finalize and auto-dismiss must be true)")


def _filter_name(engine: Engine, args: Args) -> str:
    name: str | None = args.get("filter-node-name")
    if name is None:
        return engine.graph.generated_name()
    if not id_wellformed(name):
        raise generic_error(f"Invalid node-name: '{name}'")
    if name in engine.graph or any(job.filter_name == name for job in jobs(engine).values()):
        raise generic_error(f"Duplicate nodes with node-name='{name}'")
    if len(name) > MAX_NODE_NAME:
        raise generic_error("Node name too long")
    return name


def backup_action(engine: Engine, args: Args, steps: Steps) -> None:
    """The ``blockdev-backup`` action: freeze ``device`` now (no await), start the job
    once every action of the transaction succeeded."""
    device, target = engine.node(args["device"]), engine.node(args["target"])
    _check_bitmap(device, args)
    _check_job(engine, device, target, args)
    filter_name = _filter_name(engine, args)
    job_id = args.get("job-id", "")  # qemu names it after the device's BlockBackend: none
    if not id_wellformed(job_id):
        raise generic_error(f"Invalid job ID '{job_id}'")
    table = jobs(engine)
    if job_id in table:
        raise generic_error(f"Job ID '{job_id}' already in use")
    if args.get("speed", 0) < 0:
        raise generic_error("Parameter 'speed' expects a non-negative value")
    try:
        cbw = CopyBeforeWrite(device, target)  # the moment: writes copy from now on
    except ValueError as err:
        raise generic_error(str(err)) from None
    job = BackupJob(job_id, cbw, filter_name, asyncio.Event())
    table[job_id] = job

    def undo() -> None:
        cbw.release()
        del table[job_id]
    steps.undo_steps.append(undo)
    steps.starts.append(lambda: _start(engine, job, device, target))


def _start(engine: Engine, job: BackupJob, device: Node, target: Node) -> None:
    engine.graph.add(job.cbw, job.filter_name)
    overlay = shown(target)
    backing = overlay.children.get("backing")
    if backing is not None and shown(backing) is shown(device):
        from ...block.qcow2 import Qcow2Node  # the one format with a backing node

        if isinstance(overlay, Qcow2Node):
            job.overlay, job.backing = overlay, backing
            overlay.backing = FrozenBacking(backing, job.cbw, job.sealed)
    _status(engine, job, "created")
    _status(engine, job, "running")
    engine.in_background(_seal(job))


async def _seal(job: BackupJob) -> None:
    try:
        if job.cbw.tracking is not None:
            await job.cbw.tracking.quiesce()
    finally:
        job.sealed.set()


# -- the job commands ------------------------------------------------------------------


async def _query_block_jobs(engine: Engine, args: Args) -> JSON:
    return [job.info() for job in jobs(engine).values()]


async def _query_jobs(engine: Engine, args: Args) -> JSON:
    return [job.job_info() for job in jobs(engine).values()]


async def _block_job_cancel(engine: Engine, args: Args) -> JSON:
    job = jobs(engine).get(args["device"])
    if job is None:
        raise QMPError("DeviceNotActive", f"Block job '{args['device']}' not found")
    return _cancel(engine, job)


async def _job_cancel(engine: Engine, args: Args) -> JSON:
    job = jobs(engine).get(args["id"])
    if job is None:
        raise generic_error("Job not found")
    return _cancel(engine, job)


def _cancel(engine: Engine, job: BackupJob) -> JSON:
    if job.status != "running":
        raise generic_error(f"Job '{job.id}' in state '{job.status}' cannot accept command "
                            "verb 'cancel'")
    _status(engine, job, "aborting")
    job.cbw.release()  # no write copies from now on; reads of the view fail
    engine.in_background(_finish(engine, job))
    return {}


async def _finish(engine: Engine, job: BackupJob) -> None:
    """The rest of a cancellation: the copies in flight end, the filter leaves the
    graph, the target reads its backing node again."""
    async with engine.graph_lock:
        if engine.graph.get(job.filter_name) is job.cbw:
            # a node a user put over the filter may still hold it: it stays, released
            with contextlib.suppress(GraphError):
                await engine.graph.remove(job.filter_name)
        if job.overlay is not None:
            job.overlay.backing = job.backing
            job.overlay = job.backing = None
    info = job.info()
    engine.emit("BLOCK_JOB_CANCELLED", {key: info[key] for key in (
        "type", "device", "len", "offset", "speed")})
    _status(engine, job, "concluded")
    _status(engine, job, "null")
    jobs(engine).pop(job.id, None)


COMMANDS = (
    Command("query-block-jobs", NO_ARGS, _query_block_jobs),
    Command("block-job-cancel", BLOCK_JOB_CANCEL, _block_job_cancel),
    Command("query-jobs", NO_ARGS, _query_jobs),
    Command("job-cancel", JOB_CANCEL, _job_cancel),
)
