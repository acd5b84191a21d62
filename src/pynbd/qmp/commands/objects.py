"""User-creatable objects: object-add and object-del.

Rules of this module: objects are kept as ``id -> (qom-type, properties)`` in
``Engine.objects``; ``nbd-server-start`` reads them (``tls-creds``,
``tls-authz``) through ``Engine.tls_credentials``.  A ``throttle-group`` is
also a live group (``commands.throttle``), refused deletion while in use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .. import schema as s
from ..protocol import generic_error
from . import JSON, Command
from .throttle import THROTTLE_GROUP, add_throttle_group, del_throttle_group

if TYPE_CHECKING:
    from ..engine import Engine

OBJECT_ADD = s.Union_("qom-type", {
    "tls-creds-x509": s.Struct(
        {"id": str, "dir": str, "endpoint": s.Enum(("server", "client")),
         "verify-peer": bool},
        frozenset({"endpoint", "verify-peer"})),
    "authz-simple": s.Struct({"id": str, "identity": str}),
    "throttle-group": THROTTLE_GROUP,
})


async def _object_add(engine: Engine, args: dict[str, JSON]) -> JSON:
    object_id = args.pop("id")
    if object_id in engine.objects:
        raise generic_error(f"attempt to add duplicate property '{object_id}' to object "
                            "(type 'container')")
    kind = args.pop("qom-type")
    # a management command: a stat() here is fine
    if kind == "tls-creds-x509" and not os.path.isdir(args["dir"]):  # noqa: ASYNC240
        raise generic_error(f"Unable to access credentials {args['dir']}: "
                            "No such file or directory")
    if kind == "throttle-group":
        add_throttle_group(engine, object_id, args)
    engine.objects[object_id] = (kind, args)
    return {}


async def _object_del(engine: Engine, args: dict[str, JSON]) -> JSON:
    if args["id"] not in engine.objects:
        raise generic_error(f"object '{args['id']}' not found")
    del_throttle_group(engine, args["id"])
    del engine.objects[args["id"]]
    return {}


COMMANDS = (
    Command("object-add", OBJECT_ADD, _object_add),
    Command("object-del", s.Struct({"id": str}), _object_del),
)
