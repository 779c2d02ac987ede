"""The Store protocol: the few atomic operations the checks need to remember things.

Greylisting, rate limits, concurrency caps, reputation, TLS history and the pass cache all live
behind one narrow protocol, so a check never knows whether it talks to SQLite on this host or to
Redis shared by several MX hosts. The contract (tests/integration/test_store_contract.py) runs
unchanged against every backend.

Rules every backend keeps:
- Each operation is one atomic step against the backend: one transaction in SQLite, one Lua
  script or one single command in Redis. Two hosts racing on the same key see a serial order;
  there is no read-then-write across round trips anywhere.
- The store enforces expiry. A record past its expiry is absent for every operation, whether or
  not it has been physically deleted yet; callers never compare timestamps themselves.
- A backend failure raises `StoreError`, never a default value: "Redis is down" must not read as
  "never seen this client". Wrong arguments (empty key, negative TTL) are the caller's bug and
  raise `ValueError` before anything is sent.
- Records are versioned: `SCHEMA_VERSION` is the SQLite migration level and the `sk:v1:` prefix
  of every Redis key. A format change adds a version; it never reinterprets old records.
- Times are Unix seconds (float) in results; durations are seconds. TLS versions are stored as
  ranks (`TLS_VERSIONS`), so "only rises" is a number comparison in SQL and in Lua alike.

This module imports only `errors`; the backends import it, and the checks import only it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from spamkiller.errors import SpamKillerError

SCHEMA_VERSION = 1
KEY_PREFIX = f"sk:v{SCHEMA_VERSION}:"

# Longest key accepted. A greylisting key (an IPv6 /64, a 256-octet reverse path and a 256-octet
# forward path, RFC 5321 4.5.3.1.3) fits; anything longer is a bug in the caller, which should
# hash it.
MAX_KEY_LENGTH = 1024

# TLS versions in rank order (rank = index + 1; 0 means "no TLS"). The names are what
# `ssl.SSLSocket.version()` returns. Ranks are stored, so this tuple may only grow at the end.
TLS_VERSIONS: tuple[str, ...] = ("SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

_OUTCOME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class StoreError(SpamKillerError):
    """The store's backend failed (unreachable, timed out, locked, corrupt, closed).

    The backend's fault, not the client's: a check that gets this applies its `on_error`.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class GreylistResult:
    """What `Store.greylist` found. `retry_after` is 0 when `passed`."""

    first_seen: float
    passed: bool
    retry_after: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RateResult:
    """What `Store.hit_rate` found. `count` includes this hit only when `allowed`."""

    count: int
    allowed: bool
    reset_after: float  # seconds until the current window ends and the count starts again at 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotLease:
    """One slot held by `Store.acquire_slot`; give it back with `Store.release_slot`."""

    key: str
    token: str
    in_use: int  # slots of this key held right after this one was taken, this one included


@dataclass(frozen=True, slots=True, kw_only=True)
class Reputation:
    """Outcomes counted for one key since `first_seen`."""

    first_seen: float
    last_seen: float
    counts: Mapping[str, int]

    def count(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsHistory:
    """Sessions seen for one key, with and without TLS, and the floor for downgrade detection.

    `best_version` is the highest version ever seen; `floor` is the lowest version this peer is
    now required to use, raised deliberately (after SPF passed, say) and never lowered.
    """

    first_seen: float
    last_seen: float
    with_tls: int
    without_tls: int
    best_version: str | None
    floor: str | None


@runtime_checkable
class Store(Protocol):
    """Atomic domain operations over expiring records. Every method may raise StoreError."""

    async def greylist(
        self,
        key: str,
        *,
        delay: float,
        expire: float,
        retry_window: float | None = None,
        now: float | None = None,
    ) -> GreylistResult:
        """Greylist `key`: the first sight is recorded and told to wait `delay` seconds.

        A retry at least `delay` after the first sight, while the pending record lives
        (`retry_window` after the first sight; default `expire`), passes. A passed record passes
        every time and each pass extends its life to `expire` from now. A retry that is too early
        leaves the first sight unchanged. `now` replaces the backend's clock for the timestamps
        and the delay and window comparisons (tests, replays); physical expiry stays on the real
        clock (Redis TTLs, the SQLite sweep), so a record written with a `now` far in the past
        may vanish early.
        """
        ...

    async def hit_rate(self, key: str, *, window: float, limit: int, cost: int = 1) -> RateResult:
        """Count `cost` against `key` if the count would stay within `limit`.

        Fixed window starting at the first hit: the window lasts `window` seconds, then the
        count starts again from zero at the next hit. Denied hits are not counted.
        """
        ...

    async def acquire_slot(self, key: str, *, limit: int, ttl: float) -> SlotLease | None:
        """Take one of `limit` concurrent slots of `key`, or None if all are held.

        Each slot expires on its own `ttl` seconds after it was taken, so the slots of a crashed
        worker come back even while the key stays busy. `ttl` must outlive the longest hold.
        """
        ...

    async def release_slot(self, lease: SlotLease) -> None:
        """Give a slot back. Releasing twice, or after it expired, does nothing."""
        ...

    async def record_outcome(self, key: str, outcome: str, *, expire: float) -> Reputation:
        """Count one `outcome` for `key` and return the record after counting.

        The record lives at least `expire` seconds from now (a shorter `expire` never cuts an
        existing record's life).
        """
        ...

    async def reputation(self, key: str) -> Reputation | None:
        """The record of `key`, or None if there is none (or it expired)."""
        ...

    async def record_tls(self, key: str, *, version: str | None, expire: float) -> TlsHistory:
        """Count one session of `key`, with TLS `version` or without TLS (None).

        Returns the history after counting, floor included, so the caller detects a downgrade
        (`version` below `floor`) in the same round trip. Life extends as in record_outcome.
        """
        ...

    async def raise_tls_floor(self, key: str, version: str, *, expire: float) -> TlsHistory:
        """Raise the floor of `key` to `version` if that is higher; the floor never drops."""
        ...

    async def tls_history(self, key: str) -> TlsHistory | None:
        """The TLS history of `key`, or None."""
        ...

    async def pass_cache_get(self, key: str) -> bool:
        """True if `key` was put in the pass cache and its TTL has not run out."""
        ...

    async def pass_cache_put(self, key: str, *, ttl: float) -> None:
        """Put `key` in the pass cache for `ttl` seconds from now (replacing any earlier TTL)."""
        ...

    async def ping(self) -> None:
        """One round trip to the backend; raises StoreError if it does not answer."""
        ...

    async def close(self) -> None:
        """Release the backend. Later operations raise StoreError. Closing twice is harmless."""
        ...


# --- argument checks shared by the backends, so both refuse exactly the same things ------------


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("store key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"store key longer than {MAX_KEY_LENGTH} characters; hash it")
    if _CONTROL.search(key):
        raise ValueError(f"store key contains a control character: {key!r}")
    if not key.isascii():
        try:
            key.encode()  # a lone surrogate (from undecodable bytes) has no UTF-8 form to store
        except UnicodeEncodeError:
            raise ValueError(f"store key is not valid Unicode: {key!r}") from None
    return key


def check_duration(name: str, value: float) -> float:
    """A positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number of seconds, not {value!r}")
    return float(value)


def check_count(name: str, value: int) -> int:
    """A positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def check_greylist(
    delay: float, expire: float, retry_window: float | None, now: float | None
) -> tuple[float, float, float]:
    """(delay, retry_window, expire) after checking; `delay` may be 0, the others must not."""
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise ValueError(f"delay must be a number of seconds, not {delay!r}")
    if not math.isfinite(delay) or delay < 0:
        raise ValueError(f"delay must be 0 or more seconds, not {delay!r}")
    expire = check_duration("expire", expire)
    window = expire if retry_window is None else check_duration("retry_window", retry_window)
    if delay >= window:
        raise ValueError(f"delay ({delay} s) must be shorter than the retry window ({window} s)")
    if now is not None and (
        isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now)
    ):
        raise ValueError(f"now must be a finite Unix time, not {now!r}")
    return float(delay), window, expire


def check_outcome(outcome: str) -> str:
    if not isinstance(outcome, str) or not _OUTCOME.fullmatch(outcome):
        raise ValueError(
            f"outcome must be a short lowercase word ([a-z][a-z0-9_-]{{0,31}}), not {outcome!r}"
        )
    return outcome


def tls_rank(version: str | None) -> int:
    """0 for no TLS, else the version's rank in TLS_VERSIONS (1-based)."""
    if version is None:
        return 0
    try:
        return TLS_VERSIONS.index(version) + 1
    except ValueError:
        raise ValueError(f"unknown TLS version {version!r}; known: {TLS_VERSIONS}") from None


def tls_name(rank: int) -> str | None:
    """The inverse of tls_rank; a rank this build does not know is a StoreError (newer writer)."""
    if rank == 0:
        return None
    if 1 <= rank <= len(TLS_VERSIONS):
        return TLS_VERSIONS[rank - 1]
    raise StoreError(f"stored TLS version rank {rank} is unknown to this version of Spam Killer")
