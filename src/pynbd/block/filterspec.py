"""The command line's filters: ``--filter NAME[,KEY=VALUE...]`` and ``--object
throttle-group,...``, parsed and then stacked over the exported node.

``pynbd`` (qemu-nbd has no such option) takes a repeatable ``--filter``:

- ``throttle,throttle-group=ID``: a member of the group an ``--object
  throttle-group,id=ID,limits.iops-total=...`` (or ``x-iops-total=...``)
  defines; several filters may share one group.
- ``throttle,iops-total=500,bps-total=50M``: limits inline (any member of
  qemu's ThrottleLimits, also as ``limits.KEY``), in a group of its own.
- ``log,logfile=PATH[,logappend=on]``: every request logged to PATH.

Rules of this module:
- Parsing is pure and raises ``ValueError`` with a one-line message naming
  the option as given (``--filter TEXT: ...``); the command turns it into its
  usage error.  Limits are checked here, with qemu's wording
  (``pynbd.block.throttlemath``), so a bad limit is refused before the image
  is opened; so is a filter naming a group no ``--object`` defines.
- Values are integers (``0x`` prefixes allowed) or sizes (``50M``); a comma in
  a value is written ``,,`` (as in qemu's options).
- ``stack_filters`` builds the filters in the order given, the first nearest
  the image, through the same builder as QMP's ``blockdev-add``
  (``pynbd.block.blockdev``), and adds them to the graph under generated
  names.  Without filters it returns the node unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .blockdev import BlockdevError, add_all, build
from .sizes import parse_size
from .throttle import ThrottleGroup
from .throttlemath import LIMIT_KEYS, ThrottleError, ThrottleLimits, limits_from_properties

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from .graph import BlockGraph
    from .node import Node

#: the filters ``--filter`` knows
FILTERS = ("throttle", "log")
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})


@dataclasses.dataclass(frozen=True, slots=True)
class FilterSpec:
    """One ``--filter``: its blockdev options (without ``file``), and for inline
    throttle limits the limits of its own group."""

    text: str
    driver: str
    options: tuple[tuple[str, object], ...]
    limits: ThrottleLimits | None = None


def split_options(text: str) -> list[tuple[str, str | None]]:
    """``a=1,b,c=x,,y`` -> ``[("a", "1"), ("b", None), ("c", "x,y")]``."""
    items: list[str] = [""]
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                items[-1] += ","
                i += 2
                continue
            items.append("")
        else:
            items[-1] += text[i]
        i += 1
    out: list[tuple[str, str | None]] = []
    for item in items:
        if item:
            key, sep, value = item.partition("=")
            out.append((key, value if sep else None))
    return out


def _integer(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"Invalid parameter type for '{key}', expected: integer")
    try:
        return int(value, 0)
    except ValueError:
        pass
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError(f"Parameter '{key}' expects an integer or a size "
                         f"(such as 100 or 10M), got '{value}'") from None


def group_limits(props: Mapping[str, object]) -> ThrottleLimits:
    """The limits of an ``--object throttle-group`` from its properties as parsed
    (strings; ``limits`` nested): ``limits.KEY=...`` and/or ``x-KEY=...``.

    Raises:
        ValueError: a bad property or limits qemu would refuse.
    """
    converted: dict[str, object] = {}
    for key, value in props.items():
        if key == "limits" and isinstance(value, dict):
            converted[key] = {name: _integer(f"limits.{name}", v) for name, v in value.items()}
        else:
            converted[key] = _integer(key, value)
    return limits_from_properties(converted)


def parse_filter(text: str, groups: Mapping[str, ThrottleLimits]) -> FilterSpec:
    """One ``--filter`` (``groups``: the throttle groups ``--object`` defines).

    Raises:
        ValueError: ``--filter TEXT: problem``.
    """
    try:
        return _parse_filter(text, groups)
    except ValueError as err:
        raise ValueError(f"--filter {text}: {err}") from None


def _parse_filter(text: str, groups: Mapping[str, ThrottleLimits]) -> FilterSpec:
    items = split_options(text)
    if not items or items[0][1] is not None:
        raise ValueError(f"expected a filter name first ({' or '.join(FILTERS)})")
    name = items[0][0]
    values: dict[str, str] = {}
    for key, value in items[1:]:
        if value is None:
            raise ValueError(f"Expected '=' after parameter '{key}'")
        if key in values:
            raise ValueError(f"Parameter '{key}' appears more than once")
        values[key] = value
    if name == "log":
        return _log_spec(text, values)
    if name == "throttle":
        return _throttle_spec(text, values, groups)
    raise ValueError(f"unknown filter '{name}' (expected {' or '.join(FILTERS)})")


def _log_spec(text: str, values: dict[str, str]) -> FilterSpec:
    for key in values:
        if key not in ("logfile", "logappend"):
            raise ValueError(f"Parameter '{key}' is unexpected")
    if not values.get("logfile"):
        raise ValueError("Parameter 'logfile' is missing")
    options: dict[str, object] = {"logfile": values["logfile"]}
    if "logappend" in values:
        flag = values["logappend"].lower()
        if flag not in _TRUE | _FALSE:
            raise ValueError("Parameter 'logappend' expects 'on' or 'off'")
        options["logappend"] = flag in _TRUE
    return FilterSpec(text, "log", tuple(options.items()))


def _throttle_spec(text: str, values: dict[str, str],
                   groups: Mapping[str, ThrottleLimits]) -> FilterSpec:
    group = values.pop("throttle-group", None)
    limits: dict[str, int] = {}
    for key, value in values.items():
        bare = key.removeprefix("limits.")
        if bare not in LIMIT_KEYS:
            raise ValueError(f"Parameter '{key}' is unexpected")
        limits[bare] = _integer(key, value)
    if group is not None:
        if limits:
            raise ValueError("give either throttle-group=ID or limits, not both")
        if group not in groups:
            raise ValueError(f"Throttle group '{group}' does not exist")
        return FilterSpec(text, "throttle", (("throttle-group", group),))
    if not limits:
        raise ValueError("give throttle-group=ID (an --object throttle-group) or limits "
                         "such as iops-total=500 or bps-total=50M")
    try:
        return FilterSpec(text, "throttle", (), ThrottleLimits().updated(limits))
    except ThrottleError as err:
        raise ValueError(str(err)) from None


def parse_filters(objects: Mapping[str, tuple[str, Mapping[str, object]]],
                  specs: Sequence[str]) -> tuple[dict[str, ThrottleLimits],
                                                 tuple[FilterSpec, ...]]:
    """The throttle groups among ``--object``'s objects (id -> (type, properties))
    and the ``--filter`` specs, parsed.

    Raises:
        ValueError: one line naming the option at fault.
    """
    groups: dict[str, ThrottleLimits] = {}
    for object_id, (kind, props) in objects.items():
        if kind != "throttle-group":
            continue
        try:
            groups[object_id] = group_limits(props)
        except ValueError as err:
            raise ValueError(f"--object throttle-group,id={object_id}: {err}") from None
    return groups, tuple(parse_filter(text, groups) for text in specs)


async def stack_filters(graph: BlockGraph, node: Node, specs: Sequence[FilterSpec],
                        groups: Mapping[str, ThrottleLimits]) -> Node:
    """Build ``specs`` over ``node`` (the first nearest it), add them to ``graph``;
    the top one.

    Raises:
        BlockdevError: a filter could not be made (``--filter TEXT: ...``).
    """
    if not specs:
        return node
    live = {name: ThrottleGroup(name, limits) for name, limits in groups.items()}
    for index, spec in enumerate(specs):
        options: dict[str, object] = {"driver": spec.driver, "file": node.node_name,
                                      "read-only": not node.capabilities.can_write,
                                      **dict(spec.options)}
        if spec.limits is not None:  # inline limits: a group of its own (not an id)
            name = f"#filter{index}"
            live[name] = ThrottleGroup(name, spec.limits)
            options["throttle-group"] = name
        opened: list[Node] = []
        try:
            node = add_all(graph, await build(graph, options, opened, throttle_groups=live))
        except BlockdevError as err:
            for each in reversed(opened):
                await each.close()
            raise BlockdevError(f"--filter {spec.text}: {err}") from None
    return node
