"""The arithmetic of I/O throttling: qemu's limits and leaky buckets, sans IO.

``ThrottleLimits`` is qemu's ``ThrottleLimits`` (what a ``throttle-group`` is
configured with): six buckets (``bps-total``, ``bps-read``, ``bps-write``,
``iops-total``, ``iops-read``, ``iops-write``), each with an average rate,
an optional burst rate (``-max``) and a burst length in seconds
(``-max-length``), plus ``iops-size``.  ``ThrottleState`` holds the bucket
levels and answers the one question the throttle node asks: given the time
now, how long must a read (or a write) wait before it may start?

Rules of this module:
- Pure arithmetic: no clock, no sleeping, no I/O.  Every method that depends
  on time takes ``now`` (seconds, any monotonic origin) as an argument.
- The semantics are qemu's (``util/throttle.c``): a bucket leaks at its
  average rate; a request may start while every bucket it fills is at most
  ``avg / 10`` units full (or ``max * max-length`` with a burst rate, which
  must then also stay under ``max / 10`` in a second bucket leaking at
  ``max``); it is counted once it starts (``account``), so one large request
  is never refused, it only delays the next ones.  A read fills the total and
  read buckets, a write the total and write buckets; bytes go to the ``bps``
  buckets and operations to the ``iops`` ones, a request larger than
  ``iops-size`` (when set) counting as ``size / iops-size`` operations.
- Validation is qemu's (``throttle_is_valid``, ``throttle_limits_to_config``
  and the ``x-`` properties' setter), with its wording: ``ThrottleError``.
- Changing the limits (``ThrottleState.configure``) empties every bucket, as
  qemu's ``throttle_config`` does.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

#: qemu's THROTTLE_VALUE_MAX: the largest rate or burst a bucket takes
THROTTLE_VALUE_MAX = 1_000_000_000_000_000
#: the largest burst length (an ``unsigned`` in qemu)
UINT_MAX = 0xFFFF_FFFF


class ThrottleError(ValueError):
    """Limits qemu would refuse; the message is qemu's."""


class Bucket(enum.IntEnum):
    """qemu's BucketType, in its order."""

    BPS_TOTAL = 0
    BPS_READ = 1
    BPS_WRITE = 2
    OPS_TOTAL = 3
    OPS_READ = 4
    OPS_WRITE = 5


#: the option name of each bucket (ThrottleLimits' member prefixes)
BUCKET_NAMES = {Bucket.BPS_TOTAL: "bps-total", Bucket.BPS_READ: "bps-read",
                Bucket.BPS_WRITE: "bps-write", Bucket.OPS_TOTAL: "iops-total",
                Bucket.OPS_READ: "iops-read", Bucket.OPS_WRITE: "iops-write"}
#: every member of qemu's ThrottleLimits, in its schema's order
LIMIT_KEYS: tuple[str, ...] = (*(
    f"{name}{suffix}" for name in ("iops-total", "iops-read", "iops-write",
                                   "bps-total", "bps-read", "bps-write")
    for suffix in ("", "-max", "-max-length")), "iops-size")

#: the buckets a read (index 0) or a write (index 1) is checked against
_CHECKED = ((Bucket.BPS_TOTAL, Bucket.OPS_TOTAL, Bucket.BPS_READ, Bucket.OPS_READ),
            (Bucket.BPS_TOTAL, Bucket.OPS_TOTAL, Bucket.BPS_WRITE, Bucket.OPS_WRITE))
#: the byte and operation buckets a read or a write fills
_BYTES = ((Bucket.BPS_TOTAL, Bucket.BPS_READ), (Bucket.BPS_TOTAL, Bucket.BPS_WRITE))
_OPS = ((Bucket.OPS_TOTAL, Bucket.OPS_READ), (Bucket.OPS_TOTAL, Bucket.OPS_WRITE))


def _bucket_of(key: str) -> tuple[Bucket, str]:
    """``"bps-read-max"`` -> (BPS_READ, "max"); the field is "avg", "max" or "length"."""
    for bucket, name in BUCKET_NAMES.items():
        if key == name:
            return bucket, "avg"
        if key == f"{name}-max":
            return bucket, "max"
        if key == f"{name}-max-length":
            return bucket, "length"
    raise ThrottleError(f"Parameter '{key}' is unexpected")


@dataclasses.dataclass(frozen=True, slots=True)
class BucketLimit:
    """One bucket's configuration: rate, burst rate, burst length (seconds)."""

    avg: int = 0
    max: int = 0
    burst_length: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class ThrottleLimits:
    """A throttle group's configuration (qemu's ThrottleConfig).

    All zero (the default) limits nothing.  Build one with ``updated``, which
    validates; the constructor does not.
    """

    buckets: tuple[BucketLimit, ...] = (BucketLimit(),) * len(Bucket)
    #: qemu's op_size: requests larger than this count as several operations
    iops_size: int = 0

    def updated(self, values: Mapping[str, int]) -> ThrottleLimits:
        """These limits with ``values`` (ThrottleLimits' keys: ``iops-total``,
        ``bps-read-max``, ...) set, as qemu's ``throttle_limits_to_config``;
        the keys left out keep their values.

        Raises:
            ThrottleError: an unknown key or invalid limits (qemu's wording).
        """
        buckets = list(self.buckets)
        iops_size = self.iops_size
        for key, value in values.items():
            if key == "iops-size":
                if value < 0:
                    raise ThrottleError("iops-size value must not be negative")
                iops_size = value
                continue
            bucket, field = _bucket_of(key)
            if field == "length":
                if not 0 <= value <= UINT_MAX:
                    raise ThrottleError(f"{key} value must be in the range [0, {UINT_MAX}]")
                buckets[bucket] = dataclasses.replace(buckets[bucket], burst_length=value)
            elif value < 0:  # qemu stores it unsigned: far above THROTTLE_VALUE_MAX
                raise ThrottleError(f"bps/iops/max values must be within "
                                    f"[0, {THROTTLE_VALUE_MAX}]")
            else:
                buckets[bucket] = dataclasses.replace(buckets[bucket], **{field: value})
        limits = ThrottleLimits(tuple(buckets), iops_size)
        limits.validate()
        return limits

    def validate(self) -> None:
        """qemu's ``throttle_is_valid``.

        Raises:
            ThrottleError: the first problem found, in qemu's order and words.
        """
        b = self.buckets
        for total, read, write in ((Bucket.BPS_TOTAL, Bucket.BPS_READ, Bucket.BPS_WRITE),
                                   (Bucket.OPS_TOTAL, Bucket.OPS_READ, Bucket.OPS_WRITE)):
            for field in ("avg", "max"):
                if getattr(b[total], field) and (getattr(b[read], field)
                                                 or getattr(b[write], field)):
                    raise ThrottleError("bps/iops/max total values and read/write values "
                                        "cannot be used at the same time")
        if self.iops_size and not any(b[i].avg for i in (Bucket.OPS_TOTAL, Bucket.OPS_READ,
                                                          Bucket.OPS_WRITE)):
            raise ThrottleError("iops size requires an iops value to be set")
        for bucket in b:
            if bucket.avg > THROTTLE_VALUE_MAX or bucket.max > THROTTLE_VALUE_MAX:
                raise ThrottleError(f"bps/iops/max values must be within "
                                    f"[0, {THROTTLE_VALUE_MAX}]")
            if not bucket.burst_length:
                raise ThrottleError("the burst length cannot be 0")
            if bucket.burst_length > 1 and not bucket.max:
                raise ThrottleError("burst length set without burst rate")
            if bucket.max and not bucket.avg:
                raise ThrottleError("bps_max/iops_max require corresponding bps/iops values")
            if bucket.max and bucket.max < bucket.avg:
                raise ThrottleError("bps_max/iops_max cannot be lower than bps/iops")

    def as_dict(self) -> dict[str, int]:
        """Every ThrottleLimits member with its value (qom-get ``limits``)."""
        out: dict[str, int] = {}
        for key in LIMIT_KEYS:
            if key == "iops-size":
                out[key] = self.iops_size
                continue
            bucket, field = _bucket_of(key)
            limit = self.buckets[bucket]
            out[key] = {"avg": limit.avg, "max": limit.max,
                        "length": limit.burst_length}[field]
        return out

    def limits(self, write: bool) -> bool:
        """Whether any bucket can ever hold back a write (or a read)."""
        return any(self.buckets[bucket].avg for bucket in _CHECKED[write])

    @property
    def limited(self) -> bool:
        """Whether anything is limited at all."""
        return self.limits(False) or self.limits(True)


def _whole_ns(seconds: float) -> float:
    """A wait cut to whole nanoseconds, as qemu computes it: what rounding leaves
    over a full bucket is no wait at all (never a wait too short to pass)."""
    return math.floor(seconds * 1e9) / 1e9


class ThrottleState:
    """The bucket levels of one throttle group.

    Args:
        limits: the configuration (validated).
        now: the time the buckets start empty.
    """

    def __init__(self, limits: ThrottleLimits, now: float) -> None:
        self.limits = limits
        self._level = [0.0] * len(Bucket)
        self._burst_level = [0.0] * len(Bucket)
        self._previous_leak = now

    def configure(self, limits: ThrottleLimits, now: float) -> None:
        """New limits; every bucket starts empty again (qemu's ``throttle_config``)."""
        self.limits = limits
        self._level = [0.0] * len(Bucket)
        self._burst_level = [0.0] * len(Bucket)
        self._previous_leak = now

    def level(self, bucket: Bucket) -> float:
        """How full ``bucket`` is, in bytes or operations (as of the last leak)."""
        return self._level[bucket]

    def leak(self, now: float) -> None:
        """Empty the buckets by what flowed out since the last leak."""
        delta = now - self._previous_leak
        self._previous_leak = max(now, self._previous_leak)
        if delta <= 0:
            return
        for i, limit in enumerate(self.limits.buckets):
            self._level[i] = max(self._level[i] - limit.avg * delta, 0.0)
            if limit.burst_length > 1:
                self._burst_level[i] = max(self._burst_level[i] - limit.max * delta, 0.0)

    def _bucket_wait(self, i: int) -> float:
        """qemu's ``throttle_compute_wait`` for one bucket, in seconds."""
        limit = self.limits.buckets[i]
        if not limit.avg:
            return 0.0
        if not limit.max:
            # no burst rate: still let short bursts through (a tenth of a second's worth)
            bucket_size, burst_bucket_size = limit.avg / 10, 0.0
        else:
            bucket_size = float(limit.max * limit.burst_length)
            burst_bucket_size = limit.max / 10
        extra = self._level[i] - bucket_size
        if extra > 0:
            return _whole_ns(extra / limit.avg)
        if limit.burst_length > 1:
            extra = self._burst_level[i] - burst_bucket_size
            if extra > 0:
                return _whole_ns(extra / limit.max)
        return 0.0

    def wait(self, write: bool, now: float) -> float:
        """Seconds a read (or a write) must wait from ``now`` before it may start;
        0.0: it may start now (then ``account`` it)."""
        self.leak(now)
        return max(self._bucket_wait(i) for i in _CHECKED[write])

    def account(self, write: bool, size: int) -> None:
        """A read (or a write) of ``size`` bytes starts: fill its buckets."""
        op_size = self.limits.iops_size
        units = size / op_size if op_size and size > op_size else 1.0
        for amount, buckets in ((float(size), _BYTES[write]), (units, _OPS[write])):
            for i in buckets:
                self._level[i] += amount
                if self.limits.buckets[i].burst_length > 1:
                    self._burst_level[i] += amount


def limits_from_properties(props: Mapping[str, object]) -> ThrottleLimits:
    """A ``throttle-group`` object's limits from its properties: ``limits`` (a
    mapping of ThrottleLimits members) and/or the legacy ``x-iops-total``,
    ``x-bps-read-max``, ... properties, with qemu's checks and wording.

    Raises:
        ThrottleError: an unknown property, a value that is not an integer, or
            invalid limits.
    """
    legacy: dict[str, int] = {}
    for key, value in props.items():
        if key == "limits":
            continue
        name = key[2:] if key.startswith("x-") else ""
        if name not in LIMIT_KEYS:
            raise ThrottleError(f"Parameter '{key}' is unexpected")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ThrottleError(f"Invalid parameter type for '{key}', expected: integer")
        if value < 0:
            raise ThrottleError("Property values cannot be negative")
        if name.endswith("-max-length") and value > UINT_MAX:
            raise ThrottleError(f"{key} value must be in the range [0, {UINT_MAX}]")
        legacy[name] = value
    limits = ThrottleLimits().updated(legacy)
    given = props.get("limits")
    if given is None:
        return limits
    if not isinstance(given, dict):
        raise ThrottleError("Invalid parameter type for 'limits', expected: object")
    for key, value in given.items():
        if key not in LIMIT_KEYS:
            raise ThrottleError(f"Parameter 'limits.{key}' is unexpected")
        if not isinstance(value, int) or isinstance(value, bool):
            raise ThrottleError(f"Invalid parameter type for 'limits.{key}', "
                                "expected: integer")
    return limits.updated(given)
