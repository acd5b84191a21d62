"""Where an RBD image is: qemu's ``rbd:`` filename syntax and blockdev options.

Rules of this module: parsing only, no Ceph bindings, so that a command line
naming an rbd: image is checked before anything connects.
"""

from __future__ import annotations

import dataclasses

PREFIX = "rbd:"


class RbdSpecError(ValueError):
    """An ``rbd:`` image spec that cannot be parsed."""


@dataclasses.dataclass(frozen=True)
class RbdSpec:
    """Where an RBD image is: qemu's ``rbd:`` filename, or its blockdev options."""

    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    #: other ``key=value`` pairs, passed to librados's configuration
    options: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snapshot}" if self.snapshot else ""
        return f"{self.pool}/{ns}{self.image}{snap}"

    @property
    def cache_requested(self) -> bool:
        """True when the spec turns librbd's client cache on."""
        for key, value in self.options:
            if key.replace("-", "_") == "rbd_cache":
                return value.strip().lower() in ("true", "1", "yes", "on")
        return False


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split at ``sep`` not preceded by a backslash; backslashes escape anything."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_rbd_filename(filename: str) -> RbdSpec:
    """Parse qemu's ``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE...]``.

    ``conf`` and ``id`` select the configuration file and the user; any other
    key is a librados option (``rbd_cache=false``, ``mon_host=...``).  A
    backslash escapes ``:``, ``@``, ``/`` and itself, as in qemu.
    """
    if not filename.startswith(PREFIX):
        raise RbdSpecError(f"not an rbd image spec (expected {PREFIX}POOL/IMAGE): {filename!r}")
    fields = _split_unescaped(filename[len(PREFIX):], ":")
    path, pairs = fields[0], fields[1:]
    at = _split_unescaped(path, "@")
    if len(at) > 2:
        raise RbdSpecError(f"rbd spec {filename!r}: more than one '@' before the options")
    snapshot = _unescape(at[1]) if len(at) == 2 else None
    if snapshot == "":
        raise RbdSpecError(f"rbd spec {filename!r}: empty snapshot name after '@'")
    names = [_unescape(p) for p in _split_unescaped(at[0], "/")]
    if len(names) == 2:
        pool, namespace, image = names[0], "", names[1]
    elif len(names) == 3:
        pool, namespace, image = names
    else:
        raise RbdSpecError(f"rbd spec {filename!r}: expected {PREFIX}POOL/IMAGE or "
                           f"{PREFIX}POOL/NAMESPACE/IMAGE")
    if not pool or not image:
        raise RbdSpecError(f"rbd spec {filename!r}: the pool and image names must not be empty")
    conf = user = None
    options: list[tuple[str, str]] = []
    for pair in pairs:
        kv = _split_unescaped(pair, "=")
        if len(kv) < 2 or not kv[0]:
            raise RbdSpecError(f"rbd spec {filename!r}: option {pair!r} is not KEY=VALUE")
        key, value = _unescape(kv[0]), _unescape("=".join(kv[1:]))
        if key == "conf":
            conf = value
        elif key == "id":
            user = value
        else:
            options.append((key, value))
    return RbdSpec(pool=pool, image=image, namespace=namespace, snapshot=snapshot, conf=conf,
                   user=user, options=tuple(options))
