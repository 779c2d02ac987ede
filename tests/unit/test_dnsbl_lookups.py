"""The DNSBL/DNSWL check against a dict-backed resolver: weights, codes, errors, skipped ranges."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from spamkiller.checks.base import CheckContext
from spamkiller.checks.dnsbl import DnsblCheck, DnsblRefused, Zone
from spamkiller.dns.memory import MemoryResolver
from spamkiller.tls.facts import TlsFacts


def ctx(ip: str) -> CheckContext:
    return CheckContext(
        client_ip=ip,
        listener="mx",
        our_hostname="mx.example.com",
        our_domains=frozenset({"example.com"}),
        tls=TlsFacts.plaintext(starttls_offered=True),
    )


def lists() -> MemoryResolver:
    r = MemoryResolver()
    r.add("7.113.0.203.bl.example", "A", "127.0.0.2")
    r.add("7.113.0.203.wl.example", "A", "127.0.10.3")
    r.add("8.113.0.203.bl.example", "A", "127.0.0.11")  # a code the zone does not count
    r.add("9.113.0.203.bl.example", "A", "127.255.255.254")  # "query refused"
    return r


ZONES = [
    Zone(zone="bl.example", weight=4.0, match=(ipaddress.IPv4Network("127.0.0.2/32"),)),
    Zone(zone="wl.example", weight=-2.0),
]


def run(check: DnsblCheck, ip: str) -> list[tuple[str, float, str]]:
    return [(f.symbol, f.factor, f.detail) for f in asyncio.run(check.run(ctx(ip)))]


def test_listed_on_block_and_allow_lists() -> None:
    found = run(DnsblCheck(lists(), ZONES), "203.0.113.7")
    assert found == [
        ("DNSBL_LISTED", 4.0, "bl.example=127.0.0.2"),
        ("DNSWL_LISTED", 2.0, "wl.example=127.0.10.3"),
    ]


def test_unmatched_code_and_unlisted_address_find_nothing() -> None:
    assert run(DnsblCheck(lists(), ZONES), "203.0.113.8") == []
    assert run(DnsblCheck(lists(), ZONES), "203.0.113.99") == []


def test_refused_code_is_an_error_not_a_listing() -> None:
    with pytest.raises(RuntimeError, match="query refused"):
        run(DnsblCheck(lists(), [Zone(zone="bl.example", weight=4.0)]), "203.0.113.9")
    assert issubclass(DnsblRefused, RuntimeError)


def test_a_failing_zone_does_not_hide_a_listing_elsewhere() -> None:
    resolver = lists().fail("wl.example", subtree=True)
    assert run(DnsblCheck(resolver, ZONES), "203.0.113.7") == [
        ("DNSBL_LISTED", 4.0, "bl.example=127.0.0.2")
    ]
    with pytest.raises(RuntimeError, match=r"wl\.example"):
        run(DnsblCheck(resolver, [ZONES[1]]), "203.0.113.7")


def test_private_and_loopback_clients_are_not_looked_up() -> None:
    resolver = lists()
    for ip in ("10.1.2.3", "127.0.0.1", "192.168.1.1", "fe80::1"):
        assert run(DnsblCheck(resolver, ZONES), ip) == []
    assert resolver.queries == []
