"""Throttle groups over QMP: the ``throttle-group`` object, qom-get and qom-set.

Rules of this module:
- ``object-add`` (``commands.objects``) hands a ``throttle-group`` to
  ``add_throttle_group``: its limits come from ``limits`` (qemu's
  ThrottleLimits) and/or the legacy ``x-iops-total``, ... properties, checked
  with qemu's wording, and the live group goes into ``Engine.throttle_groups``,
  where ``blockdev-add`` driver ``throttle`` finds it by id.
  ``object-del`` asks ``del_throttle_group``, which refuses while a throttle
  node is a member, in qemu's words.
- ``qom-get`` reads an object's property (a throttle group's ``limits``
  whole, as qemu shows them, or one ``x-`` property); ``qom-set`` changes a
  throttle group's ``limits`` at run time (the members given, the others
  kept; the buckets empty, as in qemu); the ``x-`` properties cannot be set
  after creation.  A path is an object id or ``/objects/ID``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...block.throttle import ThrottleGroup
from ...block.throttlemath import LIMIT_KEYS, ThrottleError, limits_from_properties
from .. import schema as s
from ..protocol import QMPError, generic_error
from . import JSON, Command

if TYPE_CHECKING:
    from ..engine import Engine

#: qemu's ThrottleLimits: every member optional
LIMITS = s.Struct(dict.fromkeys(LIMIT_KEYS, int), frozenset(LIMIT_KEYS))
#: qemu's ThrottleGroupProperties (object-add qom-type ``throttle-group``)
THROTTLE_GROUP = s.Struct(
    {"id": str, "limits": LIMITS, **{f"x-{key}": int for key in LIMIT_KEYS}},
    frozenset({"limits", *(f"x-{key}" for key in LIMIT_KEYS)}))

QOM_GET = s.Struct({"path": str, "property": str})
QOM_SET = s.Struct({"path": str, "property": str, "value": object})


def add_throttle_group(engine: Engine, object_id: str, props: dict[str, JSON]) -> None:
    """Make the group ``object-add`` describes (``props`` without id and qom-type)."""
    try:
        limits = limits_from_properties(props)
    except ThrottleError as err:
        raise generic_error(str(err)) from None
    engine.throttle_groups[object_id] = ThrottleGroup(object_id, limits)


def del_throttle_group(engine: Engine, object_id: str) -> None:
    """Forget the group, unless a throttle node still uses it."""
    group = engine.throttle_groups.get(object_id)
    if group is not None and group.in_use:
        raise generic_error(f"object '{object_id}' is in use, can not be deleted")
    engine.throttle_groups.pop(object_id, None)


def _object(engine: Engine, path: str) -> tuple[str, str, dict[str, JSON]]:
    object_id = path.removeprefix("/objects/")
    found = engine.objects.get(object_id)
    if found is None:
        raise QMPError("DeviceNotFound", f"Device '{path}' not found")
    kind, props = found
    return object_id, kind, props


async def _qom_get(engine: Engine, args: dict[str, JSON]) -> JSON:
    object_id, kind, props = _object(engine, args["path"])
    prop = args["property"]
    group = engine.throttle_groups.get(object_id)
    if group is not None:
        limits = group.limits.as_dict()
        if prop == "limits":
            return limits
        if prop.startswith("x-") and prop[2:] in limits:
            return limits[prop[2:]]
    elif prop in props:
        return props[prop]
    if prop == "type":
        return kind
    raise generic_error(f"Property '{kind}.{prop}' not found")


async def _qom_set(engine: Engine, args: dict[str, JSON]) -> JSON:
    object_id, kind, _ = _object(engine, args["path"])
    prop = args["property"]
    group = engine.throttle_groups.get(object_id)
    if group is not None and prop.startswith("x-") and prop[2:] in LIMIT_KEYS:
        raise generic_error("Property cannot be set after initialization")
    if group is None or prop != "limits":
        raise generic_error(f"Property '{kind}.{prop}' not found")
    values = s.check(LIMITS, args["value"], "value")
    try:
        limits = group.limits.updated(values)
    except ThrottleError as err:
        raise generic_error(str(err)) from None
    group.configure(limits)
    return {}


COMMANDS = (
    Command("qom-get", QOM_GET, _qom_get),
    Command("qom-set", QOM_SET, _qom_set),
)
