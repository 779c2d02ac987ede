"""Connection rates, message rates and concurrent sessions per client address and per network.

Counted in the Store, so every worker process and every MX host sharing one Redis see one count
(postscreen's and anvil's limits are per host). This is session policy, not scoring: a client over
a limit is told to come back later (421 at connect, 451 at MAIL), whatever its score.

A store that fails or overruns `timeout` never turns into a silent pass or a silent refusal: the
outcome carries the error for the driver to log and count, and `on_error` says whether the client
goes on (accept) or is told to retry (tempfail).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from spamkiller.checks.base import client_address
from spamkiller.smtp.replies import Reply
from spamkiller.store.base import SlotLease, Store, StoreError
from spamkiller.units import Rate, format_duration

_T = TypeVar("_T")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

STORE_TROUBLE_AT_CONNECT = Reply(421, "4.3.0", "Temporary system problem, try again later")
STORE_TROUBLE = Reply(451, "4.3.0", "Temporary system problem, try again later")


def network_of(ip: str, *, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The client's network in CIDR form: 192.0.2.0/24, 2001:db8:1:2::/64."""
    address = client_address(ip)
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def in_any(ip: str, networks: Sequence[Network]) -> bool:
    # Not cached: a cache key would hash every network object (pure Python), which costs more
    # than the lookups; client_address is cached already.
    try:
        address = client_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


async def guarded(operation: Awaitable[_T], timeout: float) -> tuple[_T | None, str | None]:
    """(result, None), or (None, why) when the store failed or overran `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            return await operation, None
    except TimeoutError:
        return None, f"store timed out after {format_duration(timeout)}"
    except StoreError as exc:
        return None, f"store error: {exc}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RateSettings:
    timeout: float = 1.0
    on_error: str = "accept"  # accept | tempfail
    exempt: tuple[Network, ...] = ()
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    connections_per_ip: Rate | None = None
    connections_per_network: Rate | None = None
    messages_per_ip: Rate | None = None
    messages_per_network: Rate | None = None
    concurrent_per_ip: int = 0
    concurrent_per_network: int = 0
    slot_ttl: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a limit said: `reply` refuses (None: go on); `error` is a store failure to log."""

    reply: Reply | None = None
    error: str | None = None
    leases: tuple[SlotLease, ...] = ()
    limit: str | None = None  # which limit refused, for the log line


PASS = Outcome()


class RateLimiter:
    def __init__(self, store: Store, settings: RateSettings) -> None:
        self.store = store
        self.settings = settings

    def applies(self, ip: str) -> bool:
        return not in_any(ip, self.settings.exempt)

    def _keys(self, ip: str) -> tuple[str, str]:
        s = self.settings
        return ip, network_of(ip, ipv4_prefix=s.ipv4_prefix, ipv6_prefix=s.ipv6_prefix)

    async def admit(self, ip: str) -> Outcome:
        """At connect: the connection rates, then a concurrency slot per address and network."""
        s = self.settings
        address, network = self._keys(ip)
        refused = await self._rates(
            "connections",
            (
                (f"conn:ip:{address}", s.connections_per_ip, "address"),
                (f"conn:net:{network}", s.connections_per_network, "network"),
            ),
            at_connect=True,
        )
        if refused is not None:
            return refused
        wanted = [
            (f"conc:ip:{address}", s.concurrent_per_ip, "address"),
            (f"conc:net:{network}", s.concurrent_per_network, "network"),
        ]
        wanted = [w for w in wanted if w[1] > 0]
        if not wanted:
            return PASS
        results, error = await guarded(
            asyncio.gather(
                *(self.store.acquire_slot(k, limit=n, ttl=s.slot_ttl) for k, n, _ in wanted),
                return_exceptions=True,
            ),
            s.timeout,
        )
        leases = tuple(r for r in results or () if isinstance(r, SlotLease))
        failure = next((r for r in results or () if isinstance(r, BaseException)), None)
        if failure is not None and not isinstance(failure, StoreError):
            raise failure
        if error is None and failure is not None:
            error = f"store error: {failure}"
        if error is not None:
            await self.release(leases)
            return self._trouble(error, at_connect=True)
        for (_, limit, scope), result in zip(wanted, results or (), strict=True):
            if result is None:
                await self.release(leases)
                return Outcome(
                    reply=Reply(
                        421, "4.7.0", f"Too many sessions from your {scope}, try again later"
                    ),
                    limit=f"concurrent_per_{'ip' if scope == 'address' else 'network'}={limit}",
                )
        return Outcome(leases=leases)

    async def message(self, ip: str) -> Outcome:
        """At MAIL: the message rates."""
        s = self.settings
        address, network = self._keys(ip)
        refused = await self._rates(
            "messages",
            (
                (f"msg:ip:{address}", s.messages_per_ip, "address"),
                (f"msg:net:{network}", s.messages_per_network, "network"),
            ),
            at_connect=False,
        )
        return refused or PASS

    async def release(self, leases: Sequence[SlotLease]) -> str | None:
        """Give slots back; the error, if the store failed (the slots then expire on their own)."""
        if not leases:
            return None
        _, error = await guarded(
            asyncio.gather(*(self.store.release_slot(lease) for lease in leases)),
            self.settings.timeout,
        )
        return error

    async def _rates(
        self,
        what: str,
        limits: Sequence[tuple[str, Rate | None, str]],
        *,
        at_connect: bool,
    ) -> Outcome | None:
        # One after the other, address first: a hit refused by the address's limit must not
        # use up the allowance of its whole network (one busy host would lock out its /24).
        for key, rate, scope in limits:
            if rate is None:
                continue
            result, error = await guarded(
                self.store.hit_rate(f"{key}:{rate.window:g}", window=rate.window, limit=rate.count),
                self.settings.timeout,
            )
            if error is not None or result is None:
                return self._trouble(error or "store gave no answer", at_connect=at_connect)
            if not result.allowed:
                wait = max(1, math.ceil(result.reset_after))
                text = f"Too many {what} from your {scope}, try again in {wait} seconds"
                name = f"{what}_per_{'ip' if scope == 'address' else 'network'}"
                return Outcome(
                    reply=Reply(421, "4.7.0", text) if at_connect else Reply(451, "4.7.1", text),
                    limit=f"{name}={rate.count}/{format_duration(rate.window)}",
                )
        return None

    def _trouble(self, error: str, *, at_connect: bool) -> Outcome:
        if self.settings.on_error == "tempfail":
            return Outcome(
                reply=STORE_TROUBLE_AT_CONNECT if at_connect else STORE_TROUBLE, error=error
            )
        return Outcome(error=error)
