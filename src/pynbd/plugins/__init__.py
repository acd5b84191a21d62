"""Storage plugins: the helpers a plugin may use, and the plugins that ship with pynbd.

A plugin is a class with ``read`` and ``size`` (and optionally ``write``,
``zero``, ``trim``, ``flush``, ``block_status``, ``close``); ``docs/plugins.md``
is its contract.  A plugin needs nothing from pynbd, but may use these
stable names:

- ``DATA``, ``HOLE``, ``ZERO``: the flags of ``block_status`` extents
  (``(length, flags)`` pairs; ``HOLE | ZERO`` for an unallocated range);
- ``parse_size(text)``: a byte count as users write it (``64M``, ``1GiB``);
- ``parse_bool(text)``: ``on``/``off``, ``yes``/``no``, ``true``/``false``, ``1``/``0``.

Built in (by driver name): ``pattern`` (``pynbd.plugins.pattern``, test data) and
``http`` (``pynbd.plugins.http``, a remote image read with range requests).

Rules of this package: pynbd never imports it at run time except to load a
built-in plugin a user names; a plugin module here imports only the standard
library and this module.
"""

from __future__ import annotations

from ..block.sizes import parse_size

#: ``block_status`` flags (NBD_STATE_*): allocated data, a hole, reads as zeroes
DATA = 0
HOLE = 1
ZERO = 2

_TRUE = frozenset({"on", "yes", "true", "y", "1"})
_FALSE = frozenset({"off", "no", "false", "n", "0"})


def parse_bool(text: str) -> bool:
    """``on``/``off`` and the usual spellings of a flag; ``ValueError`` otherwise."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected on or off, not {text!r}")


__all__ = ["DATA", "HOLE", "ZERO", "parse_bool", "parse_size"]
