"""parse_size: byte counts as users write them (``64M``, ``1GiB``)."""

from __future__ import annotations

import pytest

from pynbd.block import parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0),
    ("1048576", 1 << 20),
    ("512", 512),
    ("512B", 512),
    ("512K", 512 << 10),
    ("512k", 512 << 10),
    ("64M", 64 << 20),
    ("64m", 64 << 20),
    ("1G", 1 << 30),
    ("1g", 1 << 30),
    ("2T", 2 << 40),
    ("2t", 2 << 40),
    ("1P", 1 << 50),
    ("64MiB", 64 << 20),
    ("64MB", 64 << 20),
    ("1GiB", 1 << 30),
    ("4kib", 4 << 10),
    (" 10M\n", 10 << 20),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "M", "-1", "+1", "1.5G", "1 G", "1X", "1iB", "1GG", "0x10", "1_000", "ten",
    "١٢", "64Mi", "1GiBs",
])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)
