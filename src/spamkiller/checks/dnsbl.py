"""DNS block and allow lists, weighted like postscreen's dnsbl_sites: every zone is asked at once.

Rules kept here:
- Each zone has a weight (negative for an allow list) and, optionally, the return addresses that
  count; by default any 127.0.0.0/8 answer counts except 127.255.255.0/24, which list operators
  use to say "query refused" (Spamhaus, for one): that is an error, never a listing.
- Not listed (NXDOMAIN or NODATA) is silence. A temporary DNS failure is an error of the check, so
  its `on_error` applies; one zone failing does not hide another zone's answer.
- Addresses that no public list can hold (private, loopback, link-local, documentation ranges
  excepted for tests) are not looked up.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from spamkiller.checks.base import CheckContext, Finding, Stage, worth_looking_up
from spamkiller.dns.resolver import DnsPermError, Resolver, reverse_labels

_REFUSED = ipaddress.ip_network("127.255.255.0/24")
_ANY_LISTING = ipaddress.ip_network("127.0.0.0/8")


class DnsblRefused(RuntimeError):
    """The list answered with an error code (127.255.255.x): not a listing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Zone:
    zone: str
    weight: float
    match: tuple[ipaddress.IPv4Network, ...] = ()  # empty: any 127.0.0.0/8 answer


class DnsblCheck:
    name = "dnsbl"
    stage = Stage.CONNECT
    local = False
    cost = 10  # DNS: after the local checks

    def __init__(self, resolver: Resolver, zones: Sequence[Zone]) -> None:
        self.resolver = resolver
        self.zones = tuple(zones)

    async def run(self, ctx: CheckContext) -> Sequence[Finding]:
        if not worth_looking_up(ctx.client_ip):
            return []
        labels = reverse_labels(ctx.client_ip)
        answers = await asyncio.gather(
            *(self._lookup(f"{labels}.{z.zone}", z) for z in self.zones), return_exceptions=True
        )
        found: list[Finding] = []
        errors: list[str] = []
        for zone, answer in zip(self.zones, answers, strict=True):
            if isinstance(answer, BaseException):
                if isinstance(answer, asyncio.CancelledError):
                    raise answer
                errors.append(f"{zone.zone}: {answer}")
            elif answer:
                symbol = "DNSBL_LISTED" if zone.weight >= 0 else "DNSWL_LISTED"
                found.append(
                    Finding(symbol=symbol, factor=abs(zone.weight), detail=f"{zone.zone}={answer}")
                )
        if errors and not found:
            raise RuntimeError("; ".join(errors))  # the pipeline makes it CHECK_ERROR + on_error
        return found

    async def _lookup(self, name: str, zone: Zone) -> str:
        """The first counting return address, or "" when not listed."""
        try:
            values = await self.resolver.a(name)
        except DnsPermError:
            return ""
        for value in values:
            code = ipaddress.IPv4Address(value)
            if code in _REFUSED:
                raise DnsblRefused(f"query refused ({value})")
            if zone.match:
                if any(code in network for network in zone.match):
                    return value
            elif code in _ANY_LISTING:
                return value
        return ""
