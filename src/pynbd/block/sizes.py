"""Byte counts as users write them (``64M``, ``1GiB``): one parser for every command."""

from __future__ import annotations

import re

_SIZE = re.compile(r"([0-9]+)(?:([kmgtpe])(i?b)?|(b))?", re.ASCII | re.IGNORECASE)
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """Parse a byte count with an optional binary unit.

    Accepts a plain number of bytes (``"1048576"``, ``"512B"``) or a number
    with a power-of-1024 unit: ``K``, ``M``, ``G``, ``T``, ``P``, ``E`` in
    either case, optionally followed by ``B`` or ``iB`` (``"64M"``,
    ``"1GiB"``, ``"512kb"``).  Surrounding whitespace is ignored.

    Raises:
        ValueError: the text is not such a size.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number of bytes, optionally "
                         f"followed by K, M, G, T, P or E (powers of 1024), e.g. 64M or 1GiB")
    number, unit = match.group(1), match.group(2)
    return int(number) << _SHIFT[unit.lower()] if unit else int(number)
