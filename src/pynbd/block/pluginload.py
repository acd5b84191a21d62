"""Finding and loading Python storage plugins: the class a plugin spec names, what it
defines, and the command line's ``plugin:`` image syntax.

A plugin (``docs/plugins.md``) is a class with ``read`` and ``size`` methods and
optional ``write``, ``zero``, ``trim``, ``flush``, ``block_status`` and
``close``; ``pynbd.block.plugin`` adapts one to the node interface.

Rules of this module:
- A spec is ``PATH_OR_MODULE[:CLASS]``.  ``PATH_OR_MODULE`` is, in this order:
  a file (it ends in ``.py`` or holds a ``/``), a driver name (a plugin that
  ships with pynbd, ``BUILTIN``, or an installed package's entry point in the
  ``pynbd.plugins`` group), or an importable module.  Without ``CLASS`` a
  module's plugin is the one class it defines with ``read`` and ``size``; an
  entry point names the class itself (``module:Class``) or such a module.
- A file is executed once per process (cached by its real path), as a module
  is imported once.
- Every failure is a ``PluginError`` with one line saying what is wrong (import
  errors as ``ExceptionType: message``); never a traceback.
- Capabilities come from what the class defines; the optional class attributes
  (``ATTRIBUTES``) must be booleans.
- Options are strings (``KEY=VALUE``), passed to the constructor as keyword
  arguments; keys are Python identifiers.  ``timeout`` is pynbd's, never the
  plugin's (the per-request timeout, ``pynbd.block.plugin``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types
from typing import Any

#: the command line's image prefix: ``plugin:PATH_OR_MODULE[:CLASS][:KEY=VALUE...]``
PLUGIN_PREFIX = "plugin:"
#: the entry-point group installed packages register their plugins in
ENTRY_POINT_GROUP = "pynbd.plugins"
#: the plugins that ship with pynbd, by driver name (``module:Class``)
BUILTIN = {
    "pattern": "pynbd.plugins.pattern:PatternDisk",
    "http": "pynbd.plugins.http:HttpDisk",
}
#: the methods a plugin must define, and the ones it may
REQUIRED = ("read", "size")
OPTIONAL = ("write", "zero", "trim", "flush", "block_status", "close")
#: the optional class attributes and their defaults (``multi_conn``: None means
#: "one store if read-only")
ATTRIBUTES: dict[str, bool | None] = {
    "multi_conn": None, "serialize": False, "blocking": True, "native_fua": False,
    "fast_zero": False,
}
#: option keys pynbd keeps for itself
RESERVED = frozenset({"timeout"})


class PluginError(Exception):
    """A plugin that cannot be found, loaded or opened (one line)."""


@dataclasses.dataclass(frozen=True)
class PluginClass:
    """A loaded plugin class and what it defines."""

    cls: type
    #: the driver name queries show: the entry-point or built-in name, else "python"
    driver: str
    #: what the user named (queries show it as the node's file)
    source: str
    #: the methods it defines (of REQUIRED and OPTIONAL), name -> is a coroutine function
    methods: dict[str, bool]
    #: ATTRIBUTES as the class sets them
    attributes: dict[str, bool | None]

    @property
    def name(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    @property
    def writable(self) -> bool:
        return "write" in self.methods


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


_files: dict[str, types.ModuleType] = {}


def _load_file(path: str) -> types.ModuleType:
    real = os.path.realpath(path)
    if real in _files:
        return _files[real]
    if not os.path.isfile(real):
        raise PluginError(f"Could not open plugin '{path}': No such file or directory")
    stem = os.path.splitext(os.path.basename(real))[0]
    digest = hashlib.sha1(real.encode(), usedforsecurity=False).hexdigest()[:12]
    name = f"pynbd_plugin_{''.join(c if c.isalnum() else '_' for c in stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, real)
    if spec is None or spec.loader is None:
        raise PluginError(f"Could not load plugin '{path}': not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[name]
        if not isinstance(err, Exception):
            raise
        raise PluginError(f"Could not load plugin '{path}': {error_line(err)}") from None
    _files[real] = module
    return module


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def plugin_drivers() -> list[str]:
    """Every driver name a plugin answers to: the built-in ones, then the installed ones."""
    return [*BUILTIN, *(name for name in _entry_points() if name not in BUILTIN)]


def is_plugin_driver(name: str) -> bool:
    """Whether ``name`` is a built-in plugin or an installed one's entry point."""
    return name in BUILTIN or name in _entry_points()


def _import(module: str, shown: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as err:
        raise PluginError(f"Could not load plugin '{shown}': {error_line(err)}") from None


def _from_target(target: str, shown: str) -> object:
    """What ``module:attr`` (an entry point's or a built-in's value) names."""
    module, _, attr = target.partition(":")
    found: object = _import(module, shown)
    for part in attr.split(".") if attr else ():
        if not hasattr(found, part):
            raise PluginError(f"Could not load plugin '{shown}': '{module}' has no "
                              f"attribute '{attr}'")
        found = getattr(found, part)
    return found


def _plugin_classes(module: types.ModuleType) -> list[type]:
    return [value for value in vars(module).values()
            if isinstance(value, type) and value.__module__ == module.__name__
            and all(callable(getattr(value, name, None)) for name in REQUIRED)]


def _pick(found: object, cls_name: str | None, shown: str) -> type:
    if isinstance(found, type):
        if cls_name is not None:
            raise PluginError(f"Plugin '{shown}' is a class: give no class name after it")
        return found
    if not isinstance(found, types.ModuleType):
        raise PluginError(f"Plugin '{shown}' is neither a class nor a module")
    if cls_name is not None:
        value = getattr(found, cls_name, None)
        if not isinstance(value, type):
            raise PluginError(f"Plugin '{shown}' has no class '{cls_name}'")
        return value
    classes = _plugin_classes(found)
    if not classes:
        raise PluginError(f"Plugin '{shown}' defines no plugin class (a class with "
                          "read() and size())")
    if len(classes) > 1:
        names = ", ".join(sorted(cls.__name__ for cls in classes))
        raise PluginError(f"Plugin '{shown}' defines several plugin classes ({names}): "
                          f"name one as '{shown}:CLASS'")
    return classes[0]


def split_spec(spec: str) -> tuple[str, str | None]:
    """``PATH_OR_MODULE[:CLASS]`` as its two parts."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.isidentifier():
        return head, tail
    return spec, None


def describe(cls: type, driver: str, source: str) -> PluginClass:
    """What ``cls`` defines, checked; ``PluginError`` if it is no plugin."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    methods: dict[str, bool] = {}
    for method in REQUIRED + OPTIONAL:
        value = getattr(cls, method, None)
        if value is None:
            if method in REQUIRED:
                raise PluginError(f"Plugin class '{name}' has no {method}() method")
            continue
        if not callable(value):
            raise PluginError(f"Plugin class '{name}': {method} is not a method")
        methods[method] = inspect.iscoroutinefunction(value)
    attributes: dict[str, bool | None] = {}
    for attr, default in ATTRIBUTES.items():
        value = getattr(cls, attr, default)
        if not (isinstance(value, bool) or (value is None and default is None)):
            raise PluginError(f"Plugin class '{name}': {attr} must be True or False")
        attributes[attr] = value
    return PluginClass(cls, driver, source, methods, attributes)


def load_driver(driver: str) -> PluginClass:
    """The plugin class of a plugin's own driver name (built-in or entry point)."""
    target = BUILTIN.get(driver)
    if target is None:
        entry = _entry_points().get(driver)
        if entry is None:
            raise PluginError(f"Unknown driver '{driver}'")
        try:
            found: object = entry.load()
        except Exception as err:
            raise PluginError(f"Could not load plugin '{driver}': "
                              f"{error_line(err)}") from None
    else:
        found = _from_target(target, driver)
    return describe(_pick(found, None, driver), driver, driver)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def load_plugin(spec: str) -> PluginClass:
    """The plugin class ``spec`` (``PATH_OR_MODULE[:CLASS]``) names."""
    where, cls_name = split_spec(spec)
    if not where:
        raise PluginError("Parameter 'plugin' is empty: give a file, module or plugin name")
    if where.endswith(".py") or "/" in where:
        return describe(_pick(_load_file(where), cls_name, where), "python",
                        os.path.abspath(where))
    if is_plugin_driver(where):
        if cls_name is not None:
            raise PluginError(f"Plugin '{where}' is an installed plugin: give no class name")
        return load_driver(where)
    if not _importable(where):
        raise PluginError(f"Unknown plugin '{where}': not a file, an installed plugin "
                          f"(entry point group {ENTRY_POINT_GROUP}) or an importable module")
    return describe(_pick(_import(where, where), cls_name, where), "python", where)


def check_options(options: Any) -> dict[str, str]:
    """The plugin's options (QMP's ``options``), checked: string values, identifier keys."""
    if not isinstance(options, dict):
        raise PluginError("Invalid parameter type for 'options', expected: object")
    for key, value in options.items():
        if not isinstance(value, str):
            raise PluginError(f"Invalid parameter type for 'options.{key}', expected: string")
        if not key.isidentifier():
            raise PluginError(f"Parameter 'options.{key}': plugin option names are Python "
                              "identifiers")
        if key in RESERVED:
            raise PluginError(f"Parameter 'options.{key}' is pynbd's: give it next to "
                              "'options'")
    return dict(options)


def check_arguments(plugin: PluginClass, options: dict[str, str]) -> None:
    """The constructor takes these keyword arguments (checked before it is called)."""
    try:
        params = inspect.signature(plugin.cls).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C constructor: it will say so itself
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        for key in options:
            if key not in {p.name for p in named}:
                known = ", ".join(p.name for p in named) or "none"
                raise PluginError(f"Plugin '{plugin.source}' has no option '{key}' "
                                  f"(its options: {known})")
    for p in named:
        if p.default is p.empty and p.name not in options:
            raise PluginError(f"Plugin '{plugin.source}' needs option '{p.name}'")


def _cli_items(text: str) -> list[str]:
    """``A:B:key=v:w`` as ``[A, B, key=v:w]``: an item that does not start with
    ``NAME=`` after a ``key=value`` item continues its value (URLs hold colons)."""
    items: list[str] = []
    for item in text.split(":"):
        key, sep, _ = item.partition("=")
        if items and "=" in items[-1] and not (sep and key.isidentifier()):
            items[-1] += ":" + item
        else:
            items.append(item)
    return items


def cli_options(text: str) -> tuple[dict[str, Any], bool]:
    """``PATH_OR_MODULE[:CLASS][:KEY=VALUE...]`` (the image after ``plugin:``) as
    blockdev options of the ``python`` driver, and whether the plugin can write."""
    items = _cli_items(text)
    where, rest = items[0], items[1:]
    if rest and "=" not in rest[0]:
        where, rest = f"{where}:{rest[0]}", rest[1:]
    options: dict[str, str] = {}
    timeout: float | None = None
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise PluginError(f"bad plugin option '{item}': expected KEY=VALUE")
        if key in options or (key == "timeout" and timeout is not None):
            raise PluginError(f"plugin option '{key}' appears more than once")
        if key == "timeout":
            timeout = parse_timeout(value)
        else:
            options[key] = value
    plugin = load_plugin(where)
    check_arguments(plugin, options)
    blockdev: dict[str, Any] = {"driver": "python", "plugin": where, "options": options}
    if timeout is not None:
        blockdev["timeout"] = timeout
    return blockdev, plugin.writable


def parse_timeout(text: str) -> float:
    """``timeout=SECONDS`` (a number, 0 for none)."""
    try:
        value = float(text)
    except ValueError:
        raise PluginError(f"bad plugin timeout '{text}': expected seconds") from None
    if not 0 <= value < 1e9:
        raise PluginError(f"bad plugin timeout '{text}': expected seconds (0: none)")
    return value
