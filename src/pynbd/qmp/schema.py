"""A small QAPI-like schema: argument checking with qemu's error messages.

Rules of this module: pure functions over JSON values; every failure is a
``QMPError`` of class GenericError worded as qemu words it ("Parameter 'x' is
missing", "Invalid parameter type for 'x', expected: boolean", ...).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Union

from ..block.sizes import parse_size
from .protocol import generic_error

if TYPE_CHECKING:
    from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Enum:
    """A string from a fixed set."""

    values: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Struct:
    """An object with named members; ``optional`` members may be left out."""

    members: Mapping[str, Type]
    optional: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Union_:
    """An object whose ``discriminator`` member picks one of ``variants``."""

    discriminator: str
    variants: Mapping[str, Struct]


Type = Union[type, Enum, Struct, Union_, "ListOf"]


@dataclasses.dataclass(frozen=True)
class ListOf:
    item: Type


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", dict: "object"}


def check(schema: Struct | Union_, value: Any, path: str = "") -> dict[str, Any]:
    """Check an object against ``schema``; return it as a new dict.

    ``path`` names the object in error messages ("" for command arguments).
    """
    if isinstance(schema, Union_):
        return _check_union(schema, value, path)
    return _check_struct(schema, value, path)


def _name(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(kind: Type, value: Any, path: str) -> Any:
    if isinstance(kind, Struct):
        return _check_struct(kind, value, path)
    if isinstance(kind, Union_):
        return _check_union(kind, value, path)
    if isinstance(kind, Enum):
        if not isinstance(value, str):
            raise generic_error(f"Invalid parameter type for '{path}', expected: string")
        if value not in kind.values:
            raise generic_error(f"Parameter '{path}' does not accept value '{value}'")
        return value
    if isinstance(kind, ListOf):
        if not isinstance(value, list):
            raise generic_error(f"Invalid parameter type for '{path}', expected: array")
        return [_check(kind.item, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if kind is int and isinstance(value, bool):
        raise generic_error(f"Invalid parameter type for '{path}', expected: integer")
    if not isinstance(value, kind):
        raise generic_error(
            f"Invalid parameter type for '{path}', expected: {_TYPE_NAMES.get(kind, 'value')}")
    return value


def _check_struct(kind: Struct, value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise generic_error(f"Invalid parameter type for '{path or 'arguments'}', "
                            "expected: object")
    # qemu's order: the schema's members first (missing or of the wrong type),
    # then whatever is left over
    result: dict[str, Any] = {}
    for key, member in kind.members.items():
        if key not in value:
            if key not in kind.optional:
                raise generic_error(f"Parameter '{_name(path, key)}' is missing")
            continue
        result[key] = _check(member, value[key], _name(path, key))
    for key in value:
        if key not in kind.members:
            raise generic_error(f"Parameter '{_name(path, key)}' is unexpected")
    return result


def _check_union(kind: Union_, value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise generic_error(f"Invalid parameter type for '{path}', expected: object")
    tag_path = _name(path, kind.discriminator)
    if kind.discriminator not in value:
        raise generic_error(f"Parameter '{tag_path}' is missing")
    tag = _check(Enum(tuple(kind.variants)), value[kind.discriminator], tag_path)
    variant = kind.variants[tag]
    rest = {k: v for k, v in value.items() if k != kind.discriminator}
    result = _check_struct(variant, rest, path)
    result[kind.discriminator] = tag
    return result


_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})


def coerce(kind: Type, value: Any, path: str = "") -> Any:
    """Convert command-line strings (``key=value`` options) to the schema's types.

    Values that are already of another type, and members the schema does not
    know, are left alone for ``check`` to judge.
    """
    if isinstance(kind, Struct) and isinstance(value, dict):
        return {k: coerce(kind.members[k], v, _name(path, k)) if k in kind.members else v
                for k, v in value.items()}
    if isinstance(kind, Union_) and isinstance(value, dict):
        variant = kind.variants.get(value.get(kind.discriminator, ""))
        if variant is None:
            return value
        members = {**variant.members, kind.discriminator: str}
        return coerce(Struct(members), value, path)
    if not isinstance(value, str):
        return value
    if kind is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise generic_error(f"Parameter '{path}' expects 'on' or 'off'")
    if kind is int:
        try:
            return int(value, 0)
        except ValueError:
            pass
        try:  # sizes may carry a unit, as in qemu: size=64M
            return parse_size(value)
        except ValueError:
            raise generic_error(f"Parameter '{path}' expects an integer") from None
    return value


def parse_keyval(text: str) -> dict[str, Any]:
    """Parse qemu's ``a=1,b.c=2`` option syntax (``,,`` is a literal comma).

    A first element without ``=`` is taken as the value of ``implied`` keys by
    the caller; here it is an error.
    """
    items: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "," and text[i + 1:i + 2] == ",":
            current += ","
            i += 2
            continue
        if ch == ",":
            items.append(current)
            current = ""
        else:
            current += ch
        i += 1
    items.append(current)
    result: dict[str, Any] = {}
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise generic_error(f"Expected '=' after parameter '{item}'")
        target = result
        parts = key.split(".")
        for part in parts[:-1]:
            nested = target.setdefault(part, {})
            if not isinstance(nested, dict):
                raise generic_error(f"Parameter '{key}' conflicts with '{part}'")
            target = nested
        if parts[-1] in target:
            raise generic_error(f"Parameter '{key}' appears more than once")
        target[parts[-1]] = value
    for key, value in result.items():
        if isinstance(value, dict):
            result[key] = _listify(value, f"{key}.")
    return result


def _listify(tree: dict[str, Any], prefix: str) -> Any:
    """qemu's ``keyval_listify``: a level whose keys are all decimal numbers is a
    list (``bitmaps.0=a,bitmaps.1=b``), and must hold every index from 0."""
    for key, value in tree.items():
        if isinstance(value, dict):
            tree[key] = _listify(value, f"{prefix}{key}.")
    if not tree or not all(key.isdecimal() for key in tree):
        return tree
    items = []
    for index in range(len(tree)):
        if str(index) not in tree:
            raise generic_error(f"Parameter '{prefix}{index}' missing")
        items.append(tree[str(index)])
    return items
