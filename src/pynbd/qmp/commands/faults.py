"""Fault injection on block nodes: x-fault-add, x-fault-clear, x-query-faults.

Rules of this module: rules go to the node's implicit ``FaultFilter`` (every
node the daemon makes has one, see ``commands.block``), so they act on exports
already serving it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...block.faults import COMMANDS as FAULT_COMMANDS
from ...block.faults import FaultFilter, FaultRule, parse_errno
from .. import schema as s
from ..protocol import generic_error
from . import JSON, NODE_NAME, Command

if TYPE_CHECKING:
    from ..engine import Engine

X_FAULT_ADD = s.Struct(
    {"node-name": str, "command": s.Enum((*FAULT_COMMANDS, "all")), "errno": str,
     # numbers: checked by the handler (the schema module has no float type)
     "rate": object, "start": int, "end": int, "count": int, "delay": object, "seed": int},
    frozenset({"errno", "rate", "start", "end", "count", "delay", "seed"}))
X_FAULT_CLEAR = s.Struct({"node-name": str, "id": int}, frozenset({"id"}))


def _fault_backend(engine: Engine, name: str) -> FaultFilter:
    node = engine.node(name)
    if not isinstance(node, FaultFilter):
        raise generic_error(f"Node '{name}' does not support fault injection")
    return node


def _number(args: dict[str, JSON], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise generic_error(f"Invalid parameter type for '{key}', expected: number")
    return float(value)


async def _x_fault_add(engine: Engine, args: dict[str, JSON]) -> JSON:
    backend = _fault_backend(engine, args["node-name"])
    rate = _number(args, "rate", 1.0)
    delay = _number(args, "delay", 0.0)
    errno: int | None = None
    if "errno" in args:
        try:
            errno = parse_errno(args["errno"])
        except ValueError:
            raise generic_error(
                f"Parameter 'errno' does not accept value '{args['errno']}'") from None
    elif not delay:
        errno = parse_errno("EIO")
    if not 0.0 <= rate <= 1.0:
        raise generic_error("Parameter 'rate' expects a value between 0 and 1")
    if not 0.0 <= delay < float("inf"):
        raise generic_error("Parameter 'delay' expects a value of 0 or more")
    if args.get("start", 0) < 0:
        raise generic_error("Parameter 'start' expects a value of 0 or more")
    if "end" in args and args["end"] <= args.get("start", 0):
        raise generic_error("Parameter 'end' expects a value greater than 'start'")
    if args.get("count", 1) < 1:
        raise generic_error("Parameter 'count' expects a value of 1 or more")
    command = args["command"]
    try:
        rule = FaultRule(frozenset(FAULT_COMMANDS if command == "all" else (command,)),
                         errno=errno, rate=rate, start=args.get("start", 0),
                         end=args.get("end"), count=args.get("count"), delay=delay,
                         seed=args.get("seed"))
    except ValueError as err:
        raise generic_error(f"Invalid fault: {err}") from None
    return {"id": backend.add_rule(rule)}


async def _x_fault_clear(engine: Engine, args: dict[str, JSON]) -> JSON:
    backend = _fault_backend(engine, args["node-name"])
    try:
        backend.clear(args.get("id"))
    except KeyError:
        raise generic_error(f"Node '{args['node-name']}' has no fault with id "
                            f"{args['id']}") from None
    return {}


async def _x_query_faults(engine: Engine, args: dict[str, JSON]) -> JSON:
    return _fault_backend(engine, args["node-name"]).describe()


COMMANDS = (
    Command("x-fault-add", X_FAULT_ADD, _x_fault_add),
    Command("x-fault-clear", X_FAULT_CLEAR, _x_fault_clear),
    Command("x-query-faults", NODE_NAME, _x_query_faults),
)
