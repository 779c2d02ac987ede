"""``DnspythonResolver``: the ``Resolver`` on dnspython's ``dns.asyncresolver``.

The only module of the project that imports dnspython. ``dns.backend: dnspython`` selects it;
the default backend, ``CaresResolver``, hands its ``tlsa`` lookups to one of these, because
only this one reports the DNSSEC AD bit. The cache, single flight and settings are
``cache.CachingResolver``'s, shared with ``CaresResolver``. Rules it keeps:

- **One per process, reused.** The composition root builds it once (per worker) and hands it to
  every check; its cache and its in-flight table only pay off when shared. Building one reads
  ``/etc/resolv.conf`` when no nameservers are given; nothing else it does blocks the loop.
- **Every lookup is bounded by ``timeout``** (seconds, the whole lookup: retries, every
  nameserver, a TCP retry after truncation), enforced both by dnspython's ``lifetime`` and by an
  ``asyncio.timeout`` around it. A timeout is a ``DnsTempError``, never a hang.
- **Concurrent identical lookups share one query.** The query runs in its own task; callers
  await it shielded, so one caller's cancellation (its check timed out) neither cancels the
  query for the others nor leaves the cache unfilled.
- **The cache** holds positive answers and NXDOMAIN/NODATA, keyed by (normalised name, type),
  for the answer's TTL clamped to ``[min_ttl, max_ttl]`` (``max_negative_ttl`` for negative
  answers, whose TTL is the SOA's per RFC 2308; a negative answer without SOA is kept only for
  ``min_ttl``). A TTL of 0 after clamping is not stored. Temporary failures are never cached:
  the recursive resolver behind us already rate-limits its own retries, and a cached SERVFAIL
  would outlive a fixed DNSBL. The cache is bounded by entries (``cache_size``) and by an
  estimate of the bytes held (``cache_bytes``); the least recently used entry goes first. Values
  are stored converted (Python strings, not dnspython objects), so a hit costs a dict lookup.
- **Queries**: recursion desired, EDNS0 with a 1232-byte payload (DNS flag day 2020: no IP
  fragmentation), no search list, names built label by label from ``normalise_name`` (no
  escape processing). TLSA queries set DO and AD, so a validating resolver reports the AD bit;
  nothing else asks for DNSSEC records it would not use.
- **Errors**: NXDOMAIN and YXDOMAIN become ``DnsNxDomain``; an empty NOERROR answer
  ``DnsNoData``; SERVFAIL, REFUSED, FORMERR, timeouts, network errors and malformed replies
  from every nameserver become ``DnsTempError``. Nothing dnspython raises leaves this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TLSA import TLSA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from spamkiller.dns.cache import (
    AnswerCache,
    CacheStats,
    CachingResolver,
    Entry,
    parse_nameserver,
)
from spamkiller.dns.resolver import (
    DnsNoData,
    DnsNxDomain,
    DnsTempError,
    Tlsa,
    reverse_name,
)
from spamkiller.errors import ConfigError

# AnswerCache, CacheStats and parse_nameserver live in cache.py; re-exported for old imports.
__all__ = ["AnswerCache", "CacheStats", "DnspythonResolver", "parse_nameserver"]

EDNS_PAYLOAD = 1232  # DNS flag day 2020: the largest UDP answer that avoids IP fragmentation
MAX_ATTEMPT = 2.0  # dnspython's per-server attempt timeout when several servers share the budget

Convert = Callable[[dns.rrset.RRset, bool], tuple[object, ...]]


# --------------------------------------------------------------------------------------------
# Converting answers
# --------------------------------------------------------------------------------------------


def _name_text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return name.canonicalize().to_text(omit_final_dot=True)


def _a(rrset: dns.rrset.RRset, _ad: bool) -> tuple[object, ...]:
    return tuple(cast(A, rd).address for rd in rrset)


def _aaaa(rrset: dns.rrset.RRset, _ad: bool) -> tuple[object, ...]:
    return tuple(cast(AAAA, rd).address for rd in rrset)


def _txt(rrset: dns.rrset.RRset, _ad: bool) -> tuple[object, ...]:
    return tuple(b"".join(cast(TXT, rd).strings).decode("utf-8", "replace") for rd in rrset)


def _mx(rrset: dns.rrset.RRset, _ad: bool) -> tuple[object, ...]:
    return tuple(
        sorted((cast(MX, rd).preference, _name_text(cast(MX, rd).exchange)) for rd in rrset)
    )


def _ptr(rrset: dns.rrset.RRset, _ad: bool) -> tuple[object, ...]:
    return tuple(_name_text(cast(PTR, rd).target) for rd in rrset)


def _tlsa(rrset: dns.rrset.RRset, ad: bool) -> tuple[object, ...]:
    return tuple(
        Tlsa(
            usage=cast(TLSA, rd).usage,
            selector=cast(TLSA, rd).selector,
            mtype=cast(TLSA, rd).mtype,
            data=cast(TLSA, rd).cert,
            authenticated=ad,
        )
        for rd in rrset
    )


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section; 0 without a SOA."""
    if response is None:
        return 0.0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, cast(SOA, rrset[0]).minimum))
    return 0.0


# rdtype -> (converter, ask for DNSSEC): only TLSA needs the AD bit.
_TYPES: dict[int, tuple[Convert, bool]] = {
    dns.rdatatype.A: (_a, False),
    dns.rdatatype.AAAA: (_aaaa, False),
    dns.rdatatype.TXT: (_txt, False),
    dns.rdatatype.MX: (_mx, False),
    dns.rdatatype.PTR: (_ptr, False),
    dns.rdatatype.TLSA: (_tlsa, True),
}


# --------------------------------------------------------------------------------------------
# The resolver
# --------------------------------------------------------------------------------------------


class DnspythonResolver(CachingResolver):
    """The ``Resolver`` protocol over ``dns.asyncresolver``, with the shared bounded TTL cache.

    Arguments as ``CachingResolver``'s; without ``nameservers`` it reads ``/etc/resolv.conf``.
    """

    def _start(self) -> None:
        plain = self._new_resolver(self._servers)
        self.nameservers: list[str] = [str(ns) for ns in plain.nameservers]
        self._plain = plain
        self._dnssec = self._new_resolver(self._servers, copy_from=plain)
        # DO: send the DNSSEC records; AD in the query (RFC 6840 5.7): report validation status.
        self._dnssec.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        self._dnssec.flags = dns.flags.RD | dns.flags.AD

    def _new_resolver(
        self,
        servers: Sequence[tuple[str, int]],
        copy_from: dns.asyncresolver.Resolver | None = None,
    ) -> dns.asyncresolver.Resolver:
        system = not servers and copy_from is None
        try:
            resolver = dns.asyncresolver.Resolver(configure=system)
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError(
                "dns.nameservers: not given, and /etc/resolv.conf names no nameserver"
            ) from None
        if copy_from is not None:
            resolver.nameservers = copy_from.nameservers
        elif servers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in servers]
        resolver.search = []
        resolver.use_search_by_default = False
        resolver.cache = None  # ours is in front, holding converted values
        resolver.retry_servfail = False
        resolver.lifetime = self.timeout
        count = max(1, len(resolver.nameservers))
        # One server gets the whole budget; several share it, so a dead first server leaves
        # time to ask the next one.
        resolver.timeout = self.timeout if count == 1 else min(MAX_ATTEMPT, self.timeout / count)
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        return resolver

    # --- the protocol ------------------------------------------------------------------------

    async def txt(self, name: str) -> list[str]:
        return cast(list[str], list(await self._lookup(name, dns.rdatatype.TXT, "TXT")))

    async def a(self, name: str) -> list[str]:
        return cast(list[str], list(await self._lookup(name, dns.rdatatype.A, "A")))

    async def aaaa(self, name: str) -> list[str]:
        return cast(list[str], list(await self._lookup(name, dns.rdatatype.AAAA, "AAAA")))

    async def mx(self, name: str) -> list[tuple[int, str]]:
        values = await self._lookup(name, dns.rdatatype.MX, "MX")
        return cast(list[tuple[int, str]], list(values))

    async def ptr(self, ip: str) -> list[str]:
        values = await self._lookup(reverse_name(ip), dns.rdatatype.PTR, "PTR")
        return cast(list[str], list(values))

    async def tlsa(self, name: str) -> list[Tlsa]:
        values = await self._lookup(name, dns.rdatatype.TLSA, "TLSA")
        return cast(list[Tlsa], list(values))

    # --- the work ----------------------------------------------------------------------------

    async def _query(self, qname: str, rdtype: int) -> tuple[Entry, float]:
        """One lookup, as (entry, seconds to cache it). Never raises a DNS failure."""
        convert, dnssec = _TYPES[rdtype]
        resolver = self._dnssec if dnssec else self._plain
        name = dns.name.Name([label.encode("ascii") for label in qname.split(".")])
        try:
            async with asyncio.timeout(self.timeout):
                answer = await resolver.resolve(
                    name,
                    dns.rdatatype.RdataType(rdtype),
                    raise_on_no_answer=False,
                    lifetime=self.timeout,
                    search=False,
                )
        except dns.resolver.NXDOMAIN as exc:
            responses = cast(dict[object, dns.message.Message], exc.kwargs.get("responses", {}))
            response = next(iter(responses.values()), None)
            return Entry(error=DnsNxDomain, reason="NXDOMAIN"), self._negative(
                _negative_ttl(response)
            )
        except dns.resolver.YXDOMAIN:
            return Entry(error=DnsNxDomain, reason="YXDOMAIN"), self._negative(0.0)
        except (TimeoutError, dns.exception.Timeout):
            return Entry(error=DnsTempError, reason=f"timed out after {self.timeout:g}s"), 0.0
        except dns.resolver.NoNameservers as exc:
            return Entry(error=DnsTempError, reason=_no_nameservers(exc)), 0.0
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            reason = f"{type(exc).__name__}: {exc}"[:200]
            return Entry(error=DnsTempError, reason=reason), 0.0

        if answer.rrset is None:
            ttl = self._negative(_negative_ttl(answer.response))
            return Entry(error=DnsNoData, reason="no records of this type (NODATA)"), ttl
        authenticated = bool(answer.response.flags & dns.flags.AD)
        try:
            values = convert(answer.rrset, authenticated)
        except (ValueError, AttributeError) as exc:  # a reply dnspython parsed but we cannot use
            return Entry(error=DnsTempError, reason=f"unusable answer: {exc}"[:200]), 0.0
        return Entry(values=values), self._positive(answer.chaining_result.minimum_ttl)


def _no_nameservers(exc: dns.resolver.NoNameservers) -> str:
    """'SERVFAIL from 127.0.0.1@53; ConnectionRefusedError from ...' out of dnspython's list."""
    parts: list[str] = []
    for error in exc.kwargs.get("errors", []):
        server, problem = str(error[0]).removeprefix("Do53:"), error[3]
        what = problem if isinstance(problem, str) else type(problem).__name__
        parts.append(f"{what} from {server}")
    return "; ".join(dict.fromkeys(parts))[:300] or "no nameserver answered"
