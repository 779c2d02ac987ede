"""``MemoryResolver``: a dict-backed ``Resolver`` for unit tests of checks.

It keeps the same rules as the real resolver (see ``resolver.py``), so a check tested against
it behaves the same in production:

- names are normalised with ``normalise_name``, so ``Example.COM.`` finds ``example.com``;
  an invalid name raises ``DnsInvalidName`` before anything is recorded as asked;
- a name with no records at all is ``DnsNxDomain``; a name that has records of other types, or
  names below it (an empty non-terminal such as ``_domainkey.example.com``), is ``DnsNoData``;
- a returned list is never empty, MX pairs come sorted, names come back without the final dot;
- every lookup yields to the event loop at least once (``asyncio.sleep(delay)``), as a real
  one does.

On top, a test can make a name (or a whole subtree, e.g. a DNSBL zone) fail temporarily or
permanently, or hang until the caller's timeout cancels it; ``queries`` lists every lookup in
order, as ``(name without final dot, type)``, so a test can assert what a check asked.
Values are checked when added, so a typo in a test fails there, not in the check.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Literal, cast

from spamkiller.dns.resolver import (
    DnsError,
    DnsNoData,
    DnsNxDomain,
    DnsTempError,
    Tlsa,
    normalise_name,
    reverse_name,
)

__all__ = ["MemoryResolver", "RecordType"]

RecordType = Literal["TXT", "A", "AAAA", "MX", "PTR", "TLSA"]
_TYPES: frozenset[str] = frozenset({"TXT", "A", "AAAA", "MX", "PTR", "TLSA"})
# What fail() and hang() install: an error class and reason to raise, or None: never answer.
_Failure = tuple[type[DnsError], str] | None


def _name_out(name: str) -> str:
    """A name as the real resolver returns it: lowercase A-labels, no final dot; root is '.'."""
    if name == ".":
        return "."
    return normalise_name(name)[:-1]


class MemoryResolver:
    """Records per (name, type) in a dict, plus explicit failures. See the module docstring.

    ``records`` maps ``(name, type)`` to a list of values: ``str`` for TXT, A, AAAA and PTR
    (the PTR record's owner is the reverse name; ``add_ptr`` builds it from an address),
    ``(preference, exchange)`` for MX, ``Tlsa`` for TLSA.
    """

    def __init__(
        self,
        records: Mapping[tuple[str, RecordType], Iterable[object]] | None = None,
        *,
        delay: float = 0.0,
    ) -> None:
        self.delay = delay
        self.queries: list[tuple[str, str]] = []
        self._records: dict[tuple[str, str], list[object]] = {}
        self._names: set[str] = set()  # every owner name and all its ancestors
        self._failures: dict[tuple[str, str | None, bool], _Failure] = {}
        for (name, rdtype), values in (records or {}).items():
            self.add(name, rdtype, *values)

    # --- setting up --------------------------------------------------------------------------

    def add(self, name: str, rdtype: RecordType, *values: object) -> MemoryResolver:
        """Add records (appending to any already there). Returns self, for chaining."""
        if rdtype not in _TYPES:
            raise ValueError(f"record type {rdtype!r} is not one of {sorted(_TYPES)}")
        owner = normalise_name(name)
        stored = self._records.setdefault((owner, rdtype), [])
        stored.extend(_checked(rdtype, value) for value in values)
        labels = owner[:-1].split(".")
        for i in range(len(labels)):
            self._names.add(".".join(labels[i:]) + ".")
        return self

    def add_ptr(self, ip: str, *names: str) -> MemoryResolver:
        """PTR records for an address (its reverse name is built here)."""
        return self.add(reverse_name(ip), "PTR", *names)

    def fail(
        self,
        name: str,
        rdtype: RecordType | None = None,
        *,
        error: type[DnsError] = DnsTempError,
        subtree: bool = False,
        reason: str = "",
    ) -> MemoryResolver:
        """Make lookups of ``name`` (of one type, or all) raise ``error``, whatever is stored.

        The default is a temporary failure (SERVFAIL); pass ``DnsNxDomain`` or ``DnsNoData`` to
        hide records that are there. With ``subtree``, names below ``name`` fail too (a DNSBL
        zone that is down).
        """
        if not issubclass(error, DnsError) or error is DnsError:
            raise TypeError(f"{error!r}: pass DnsTempError or a DnsPermError kind")
        key = (normalise_name(name), rdtype, subtree)
        self._failures[key] = (error, reason or f"{error.__name__} (test)")
        return self

    def hang(
        self, name: str, rdtype: RecordType | None = None, *, subtree: bool = False
    ) -> MemoryResolver:
        """Make lookups of ``name`` never answer: the caller's timeout must cancel them."""
        self._failures[(normalise_name(name), rdtype, subtree)] = None
        return self

    # --- the protocol ------------------------------------------------------------------------

    async def txt(self, name: str) -> list[str]:
        return cast(list[str], await self._lookup(name, "TXT"))

    async def a(self, name: str) -> list[str]:
        return cast(list[str], await self._lookup(name, "A"))

    async def aaaa(self, name: str) -> list[str]:
        return cast(list[str], await self._lookup(name, "AAAA"))

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return sorted(cast(list[tuple[int, str]], await self._lookup(name, "MX")))

    async def ptr(self, ip: str) -> list[str]:
        return cast(list[str], await self._lookup(reverse_name(ip), "PTR"))

    async def tlsa(self, name: str) -> list[Tlsa]:
        return cast(list[Tlsa], await self._lookup(name, "TLSA"))

    # --- the work ----------------------------------------------------------------------------

    async def _lookup(self, name: str, rdtype: str) -> list[object]:
        owner = normalise_name(name, rdtype)
        shown = owner[:-1]
        self.queries.append((shown, rdtype))
        await asyncio.sleep(self.delay)
        found, failure = self._failure(owner, rdtype)
        if found:
            if failure is None:
                await asyncio.Event().wait()  # until cancelled
            assert failure is not None
            error, reason = failure
            raise error(shown, rdtype, reason)
        values = self._records.get((owner, rdtype))
        if values:
            return list(values)
        if owner in self._names:
            raise DnsNoData(shown, rdtype, "no records of this type (NODATA)")
        raise DnsNxDomain(shown, rdtype, "NXDOMAIN")

    def _failure(self, owner: str, rdtype: str) -> tuple[bool, _Failure]:
        for key in ((owner, rdtype, False), (owner, None, False)):
            if key in self._failures:
                return True, self._failures[key]
        if any(subtree for _, _, subtree in self._failures):
            labels = owner.split(".")
            for i in range(len(labels) - 1):
                parent = ".".join(labels[i:])
                for key in ((parent, rdtype, True), (parent, None, True)):
                    if key in self._failures:
                        return True, self._failures[key]
        return False, None


def _checked(rdtype: str, value: object) -> object:
    """A value as the real resolver would return it, or ValueError/TypeError for a typo."""
    if rdtype == "TXT" and isinstance(value, str):
        return value
    if rdtype == "A" and isinstance(value, str):
        return str(ipaddress.IPv4Address(value))
    if rdtype == "AAAA" and isinstance(value, str):
        return ipaddress.IPv6Address(value).compressed
    if rdtype == "PTR" and isinstance(value, str):
        return _name_out(value)
    if rdtype == "MX" and isinstance(value, tuple) and len(value) == 2:
        preference, exchange = value
        if isinstance(preference, int) and 0 <= preference <= 65535 and isinstance(exchange, str):
            return (preference, _name_out(exchange))
    if rdtype == "TLSA" and isinstance(value, Tlsa):
        return value
    raise TypeError(f"{value!r} is not a {rdtype} value (see MemoryResolver's docstring)")
