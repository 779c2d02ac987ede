"""What a check is: it looks at one SMTP stage and reports findings; it never decides.

Rules this module keeps:
- A check returns `Finding`s named by stable symbols (`symbols.py`, documented in
  docs/symbols.md); the weight comes from config, a finding only scales it (`factor`).
- Checks get everything through `CheckContext`: typed fields, filled in as the session goes on.
  What one check needs from another is a field here, not a string bag.
- Checks never import a concrete resolver, store or the server: they get protocols.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from spamkiller.store.base import TlsHistory
from spamkiller.tls.facts import TlsFacts


class Stage(IntEnum):
    """SMTP stages in order; a check runs at exactly one."""

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    symbol: str  # stable public name: "HELO_IS_OURS"
    factor: float = 1.0  # multiplies the configured weight
    detail: str = ""  # for logs and headers; never changes the score


@dataclass(slots=True, kw_only=True)
class CheckContext:
    """What the session knows so far; checks read it, the driver fills it in."""

    client_ip: str
    listener: str
    our_hostname: str
    our_domains: frozenset[str]
    tls: TlsFacts
    client_name: str | None = None  # forward-confirmed reverse name (FCrDNS), when known
    authenticated_domain: str | None = None  # the MAIL FROM domain SPF passed, when known
    tls_history: TlsHistory | None = None  # this client's, this session counted (at first MAIL)
    helo: str | None = None
    mail_from: str | None = None  # "" for the null sender
    recipients: list[str] = field(default_factory=list)
    rcpt: str | None = None  # the recipient being checked at the RCPT stage


class Check(Protocol):
    """One check. `cost` orders checks of a stage: cheap local ones first, DNS next. A `local`
    check never waits on I/O (it reads only the context), so it runs without a timer."""

    name: str
    stage: Stage
    cost: int
    local: bool

    async def run(self, ctx: CheckContext) -> Sequence[Finding]: ...


_DOCUMENTATION = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


# Parsing an address costs more than the rest of a cached check (the ipaddress module is pure
# Python); a client's address is asked about by several checks in every session, so it is parsed
# once per process. Address objects are immutable: sharing them is safe.
parse_ip = functools.lru_cache(maxsize=8192)(ipaddress.ip_address)


@functools.lru_cache(maxsize=8192)
def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address, an IPv4-mapped IPv6 one (::ffff:192.0.2.1, from a dual-stack socket or a
    PROXY TCP6 header) as the IPv4 address it is. ValueError if it is no address."""
    address = parse_ip(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=8192)
def worth_looking_up(ip: str) -> bool:
    """Public addresses (and the documentation ranges tests and examples use): private,
    loopback and link-local clients are in no public DNS list and have no public reverse name."""
    address = parse_ip(ip)
    return address.is_global or any(address in net for net in _DOCUMENTATION)
