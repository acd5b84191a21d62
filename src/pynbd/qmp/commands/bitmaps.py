"""Dirty bitmap commands: block-dirty-bitmap-add, -remove, -clear, -enable, -disable,
-merge, and ``transaction`` over them; the bitmap lookups ``block-export-add`` uses.

Rules of this module:
- A bitmap belongs to the node a user named: the real node under the daemon's
  implicit filters (``shown``).  Every write reaches that node through the
  tracking filter the daemon puts right over it (``commands.block``), so its
  enabled bitmaps record every write of every parent and export, fast paths
  included, from the moment they are added.
- Every command is a transaction of one action.  The arguments of every action
  are checked before any action runs; then the actions run in order, each
  seeing what the ones before it did (as in qemu: a bitmap added by one action
  can be cleared by the next; a bitmap removed by one is busy for the rest and
  leaves only when all succeeded), each leaving a step that undoes it.  If one
  fails, the steps are undone in reverse: nothing has changed.
- No action awaits, so no write lands between an action and its undoing (an
  undone clear or merge loses no write).  Removing a persistent bitmap takes
  it out of the image at once (the node's ``remove_persistent_bitmap``, as
  qemu): the actions are then run as a dry run and undone, the bitmaps are
  taken out of the image (kept busy meanwhile), and the actions run for real.
- Checks, their order and their words are qemu's (qemu-storage-daemon 7.2):
  busy bitmaps (exported) are neither removed, cleared, enabled, disabled,
  merged into nor merged from; inconsistent ones can only be removed; a
  persistent bitmap needs a node that can store it (``check_persistent_bitmap``,
  a qcow2 node's); an action type this daemon does not run is refused as qemu
  refuses one it does not know.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import TYPE_CHECKING, Any

from ...block.bitmap import BitmapError, DirtyBitmap
from ...block.graph import shown
from ...block.tracking import bitmaps_of
from .. import schema as s
from ..protocol import generic_error
from . import JSON, Command
from .backup import BLOCKDEV_BACKUP, backup_action

if TYPE_CHECKING:
    from collections.abc import Callable

    from ...block.bitmap import BitmapSet
    from ...block.node import Node
    from ..engine import Engine

#: qemu's BDRV_BITMAP_MAX_NAME_SIZE (bytes)
MAX_NAME = 1023
#: qemu's default granularity is the node's cluster size, clamped to these
MIN_DEFAULT_GRANULARITY, MAX_DEFAULT_GRANULARITY = 4 << 10, 64 << 10

BLOCK_DIRTY_BITMAP = s.Struct({"node": str, "name": str})
# granularity: checked by ``_granularity`` for qemu's words (uint32)
BLOCK_DIRTY_BITMAP_ADD = s.Struct(
    {"node": str, "name": str, "granularity": object, "persistent": bool, "disabled": bool},
    frozenset({"granularity", "persistent", "disabled"}))
# bitmaps: names or {node, name} (qemu's BlockDirtyBitmapOrStr), see ``check_refs``
BLOCK_DIRTY_BITMAP_MERGE = s.Struct({"node": str, "target": str, "bitmaps": s.ListOf(object)})
_EXTERNAL = s.Struct({"node": str, "name": str})
TRANSACTION = s.Struct({"actions": s.ListOf(object), "properties": dict},
                       frozenset({"properties"}))
_COMPLETION_MODES = ("individual", "grouped")

Args = dict[str, Any]
#: a bitmap reference: a name on the node at hand, or (node name, bitmap name)
Ref = str | tuple[str, str]


# -- argument checks (before any action runs) -------------------------------------------


def check_refs(items: list[JSON], path: str) -> list[Ref]:
    """Bitmap references (qemu's BlockDirtyBitmapOrStr): names or ``{node, name}``."""
    refs: list[Ref] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            refs.append(item)
        elif isinstance(item, dict):
            ref = s.check(_EXTERNAL, item, f"{path}[{i}]")
            refs.append((ref["node"], ref["name"]))
        else:  # qemu names no member here
            raise generic_error("Invalid parameter type for 'null', expected: "
                                "BlockDirtyBitmapOrStr")
    return refs


def _granularity(value: JSON, path: str) -> int:
    """qemu's uint32 ``granularity``: its words for a value of another type or range."""
    if isinstance(value, bool) or not isinstance(value, int) or not (
            -(1 << 63) <= value < 1 << 64):
        raise generic_error(f"Parameter '{path}granularity' expects uint64")
    if not 0 <= value <= 0xFFFFFFFF:
        raise generic_error("Parameter 'granularity' expects uint32_t")
    return value


def _checked(kind: str, args: Args, path: str) -> Args:
    """An action's arguments, schema-checked and converted (``_converted``)."""
    return _converted(s.check(ACTIONS[kind].schema, args, path.rstrip(".")), path)


def _converted(args: Args, path: str) -> Args:
    """Schema-checked arguments with the members the schema leaves open checked as
    qemu's types (``path``: the prefix of their names in messages)."""
    if "granularity" in args:
        args["granularity"] = _granularity(args["granularity"], path)
    if "bitmaps" in args:
        args["bitmaps"] = check_refs(args["bitmaps"], f"{path}bitmaps")
    return args


def _check_actions(items: list[JSON]) -> list[tuple[str, Args]]:
    actions: list[tuple[str, Args]] = []
    for i, item in enumerate(items):
        path = f"actions[{i}]"
        if not isinstance(item, dict):
            raise generic_error(f"Invalid parameter type for '{path}', expected: object")
        if "type" not in item:
            raise generic_error(f"Parameter '{path}.type' is missing")
        kind = item["type"]
        if not isinstance(kind, str):
            raise generic_error(f"Invalid parameter type for '{path}.type', expected: string")
        if kind not in ACTIONS:  # qemu names the member alone here
            raise generic_error(f"Parameter 'type' does not accept value '{kind}'")
        wrapper = s.check(s.Struct({"data": dict}),
                          {k: v for k, v in item.items() if k != "type"}, path)
        actions.append((kind, _checked(kind, wrapper["data"], f"{path}.data.")))
    return actions


# -- lookups and qemu's bitmap checks -------------------------------------------------


def lookup(engine: Engine, node_name: str, name: str) -> tuple[Node, DirtyBitmap]:
    """The real node called ``node_name`` and its bitmap ``name`` (qemu's
    ``block_dirty_bitmap_lookup``)."""
    node = engine.graph.get(node_name)
    if node is None:
        raise generic_error(f"Node '{node_name}' not found")
    real = shown(node)
    bitmap = bitmaps_of(real).get(name)
    if bitmap is None:
        raise generic_error(f"Dirty bitmap '{name}' not found")
    return real, bitmap


def check(bitmap: DirtyBitmap, *, readonly: bool = True, inconsistent: bool = True) -> None:
    """qemu's ``bdrv_dirty_bitmap_check``: busy always; read-only (a bitmap loaded from
    a read-only image) and inconsistent unless told not to."""
    if bitmap.busy:
        raise generic_error(f"Bitmap '{bitmap.name}' is currently in use by another "
                            "operation and cannot be used")
    if readonly and getattr(bitmap, "readonly", False):
        raise generic_error(f"Bitmap '{bitmap.name}' is readonly and cannot be modified")
    if inconsistent and bitmap.inconsistent:
        raise generic_error(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


def export_bitmaps(engine: Engine, node: Node, refs: list[Ref], *,
                   read_only: bool) -> tuple[list[DirtyBitmap], list[Node]]:
    """The bitmaps an export of ``node`` offers (qemu's ``nbd_export_create``): a name
    is looked up on the node and down its backing chain; ``(node, name)`` on that
    node.  Returns them and the graph nodes named by ``(node, name)`` (which the
    export then uses)."""
    found: list[DirtyBitmap] = []
    holders: list[Node] = []
    for ref in refs:
        if isinstance(ref, str):
            bitmap, where = _in_chain(shown(node), ref)
            if bitmap is None:
                raise generic_error(f"Bitmap '{ref}' is not found")
            if read_only and where.capabilities.can_write and bitmap.enabled:
                raise generic_error(f"Enabled bitmap '{ref}' incompatible with readonly "
                                    "export")
        else:
            _, bitmap = lookup(engine, *ref)
            holders.append(engine.node(ref[0]))
        check(bitmap, readonly=False)
        found.append(bitmap)
    return found, holders


def _in_chain(node: Node, name: str) -> tuple[DirtyBitmap | None, Node]:
    current: Node | None = node
    while current is not None:
        bitmap = current.bitmaps.get(name) if current.bitmaps is not None else None
        if bitmap is not None:
            return bitmap, current
        backing = current.children.get("backing")
        current = shown(backing) if backing is not None else None
    return None, node


def default_granularity(node: Node) -> int:
    """qemu's ``bdrv_get_default_bitmap_granularity``: the node's cluster size (qcow2)
    clamped to [4 KiB, 64 KiB]; 64 KiB for a node without one."""
    cluster = getattr(node, "cluster_size", None)
    if isinstance(cluster, int) and cluster > 0:
        return min(MAX_DEFAULT_GRANULARITY, max(MIN_DEFAULT_GRANULARITY, cluster))
    return MAX_DEFAULT_GRANULARITY


# -- actions ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """The undo steps and pending removals of one run of actions."""

    #: whether clear and merge keep the old bits (a lone action is never undone)
    keep: bool
    undo_steps: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    #: bitmaps to take off their node once every action succeeded
    removing: list[tuple[Node, BitmapSet, DirtyBitmap]] = dataclasses.field(
        default_factory=list)
    #: steps to take once every action succeeded (``commands.backup``: a job starts)
    starts: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def undo(self) -> None:
        for step in reversed(self.undo_steps):
            step()
        self.undo_steps.clear()

    def commit(self) -> None:
        for _, bitmaps, bitmap in self.removing:
            bitmap.busy -= 1
            bitmaps.remove(bitmap.name)
        for start in self.starts:
            start()

    def restorer(self, bitmap: DirtyBitmap) -> None:
        if self.keep:
            old = bitmap.to_bytes()
            self.undo_steps.append(lambda: bitmap.load_bytes(old))


def _add(engine: Engine, args: Args, run: _Run) -> None:
    name = args["name"]
    if not name:
        raise generic_error("Bitmap name cannot be empty")
    real = shown(engine.node(args["node"]))
    granularity = args.get("granularity")
    if granularity is None:
        granularity = default_granularity(real)
    elif granularity < 512 or granularity & (granularity - 1):
        raise generic_error("Granularity must be power of 2 and at least 512")
    persistent = bool(args.get("persistent", False))
    if persistent:
        can_store = getattr(real, "check_persistent_bitmap", None)
        if can_store is None:
            raise generic_error(f"Can't store persistent bitmaps to {args['node']}: "
                                f"{os.strerror(errno.ENOTSUP)}")
        try:
            can_store(name, granularity)
        except BitmapError as err:
            raise generic_error(str(err)) from None
    bitmaps = bitmaps_of(real)
    if name in bitmaps:
        raise generic_error(f"Bitmap already exists: {name}")
    if len(name.encode("utf-8")) > MAX_NAME:
        raise generic_error(f"Bitmap name too long: {name}")
    bitmaps.add(DirtyBitmap(name, real.size, granularity,
                            enabled=not args.get("disabled", False), persistent=persistent))

    def drop() -> None:
        bitmaps.remove(name)
    run.undo_steps.append(drop)


def _remove(engine: Engine, args: Args, run: _Run) -> None:
    real, bitmap = lookup(engine, args["node"], args["name"])
    check(bitmap, inconsistent=False)
    bitmap.busy += 1  # gone for the actions after this one; taken off at the end
    run.removing.append((real, bitmaps_of(real), bitmap))

    def keep() -> None:
        bitmap.busy -= 1
        run.removing.pop()
    run.undo_steps.append(keep)


def _clear(engine: Engine, args: Args, run: _Run) -> None:
    _, bitmap = lookup(engine, args["node"], args["name"])
    check(bitmap)
    run.restorer(bitmap)
    bitmap.clear()


def _enable(engine: Engine, args: Args, run: _Run) -> None:
    _set_enabled(engine, args, run, enabled=True)


def _disable(engine: Engine, args: Args, run: _Run) -> None:
    _set_enabled(engine, args, run, enabled=False)


def _set_enabled(engine: Engine, args: Args, run: _Run, *, enabled: bool) -> None:
    real, bitmap = lookup(engine, args["node"], args["name"])
    check(bitmap, readonly=False)
    bitmaps, was = bitmaps_of(real), bitmap.enabled

    def switch(value: bool) -> None:
        bitmap.enabled = value
        bitmaps.changed()
    switch(enabled)
    run.undo_steps.append(lambda: switch(was))


def _merge(engine: Engine, args: Args, run: _Run) -> None:
    real, target = lookup(engine, args["node"], args["target"])
    sources: list[DirtyBitmap] = []
    for ref in args["bitmaps"]:
        if isinstance(ref, str):
            source = bitmaps_of(real).get(ref)
            if source is None:
                raise generic_error(f"Dirty bitmap '{ref}' not found")
        else:
            _, source = lookup(engine, *ref)
        check(source, readonly=False)
        if source.size != target.size:
            raise generic_error(
                f"Bitmaps are of different sizes (destination size is {target.size}, "
                f"source size is {source.size}) and can't be merged")
        sources.append(source)
    check(target)  # qemu merges into a copy first: the target is checked last
    run.restorer(target)
    for source in sources:  # any granularities
        target.merge(source)


def _abort(engine: Engine, args: Args, run: _Run) -> None:
    raise generic_error("Transaction aborted using Abort action")


@dataclasses.dataclass(frozen=True)
class _Action:
    schema: s.Struct
    apply: Callable[[Engine, Args, _Run], None]


#: the transaction actions this daemon runs (qemu's TransactionActionKind, in part)
ACTIONS: dict[str, _Action] = {
    "abort": _Action(s.Struct({}), _abort),
    "block-dirty-bitmap-add": _Action(BLOCK_DIRTY_BITMAP_ADD, _add),
    "block-dirty-bitmap-remove": _Action(BLOCK_DIRTY_BITMAP, _remove),
    "block-dirty-bitmap-clear": _Action(BLOCK_DIRTY_BITMAP, _clear),
    "block-dirty-bitmap-enable": _Action(BLOCK_DIRTY_BITMAP, _enable),
    "block-dirty-bitmap-disable": _Action(BLOCK_DIRTY_BITMAP, _disable),
    "block-dirty-bitmap-merge": _Action(BLOCK_DIRTY_BITMAP_MERGE, _merge),
    "blockdev-backup": _Action(BLOCKDEV_BACKUP, backup_action),
}


# -- running actions -------------------------------------------------------------------


def _apply(engine: Engine, actions: list[tuple[str, Args]]) -> _Run:
    """Run every action in order; on a failure undo them all and raise."""
    run = _Run(keep=len(actions) > 1)
    try:
        for kind, args in actions:
            ACTIONS[kind].apply(engine, args, run)
    except BaseException:
        run.undo()
        raise
    return run


async def _run(engine: Engine, actions: list[tuple[str, Args]]) -> JSON:
    if all(kind != "block-dirty-bitmap-remove" for kind, _ in actions):
        _apply(engine, actions).commit()
        return {}
    async with engine.graph_lock:  # no node closes while an image changes
        run = _apply(engine, actions)
        stored = [(node, bitmap) for node, _, bitmap in run.removing if bitmap.persistent]
        if not stored:
            run.commit()
            return {}
        run.undo()  # that was a dry run: out of the image first, then for real
        for _, bitmap in stored:
            bitmap.busy += 1  # nothing may use them while the image changes
        try:
            for node, bitmap in stored:
                await _remove_stored(node, bitmap.name)
        finally:
            for _, bitmap in stored:
                bitmap.busy -= 1
        _apply(engine, actions).commit()
    return {}


async def _remove_stored(node: Node, name: str) -> None:
    remove = getattr(node, "remove_persistent_bitmap", None)
    if remove is None:
        return
    try:
        await remove(name)
    except BitmapError as err:
        raise generic_error(str(err)) from None
    except OSError as err:
        raise generic_error(f"Failed to update bitmap extension: "
                            f"{err.strerror or err}") from None


# -- the commands -------------------------------------------------------------------


def _command(kind: str) -> Command:
    async def handler(engine: Engine, args: Args) -> JSON:
        return await _run(engine, [(kind, _converted(args, ""))])
    return Command(kind, ACTIONS[kind].schema, handler)


async def _transaction(engine: Engine, args: Args) -> JSON:
    actions = _check_actions(args["actions"])
    mode = _completion_mode(args.get("properties", {}))
    if mode != "individual" and actions:  # only backup jobs support "grouped"
        raise generic_error(f"Action '{actions[0][0]}' does not support Transaction "
                            f"property completion-mode = {mode}")
    return await _run(engine, actions)


def _completion_mode(properties: Args) -> str:
    extra = [key for key in properties if key != "completion-mode"]
    if extra:
        raise generic_error(f"Parameter 'properties.{extra[0]}' is unexpected")
    mode = properties.get("completion-mode", "individual")
    if not isinstance(mode, str):
        raise generic_error("Invalid parameter type for 'properties.completion-mode', "
                            "expected: string")
    if mode not in _COMPLETION_MODES:
        raise generic_error(f"Parameter 'completion-mode' does not accept value '{mode}'")
    return mode


COMMANDS = (
    *(_command(kind) for kind in ACTIONS if kind != "abort"),
    Command("transaction", TRANSACTION, _transaction),
)
