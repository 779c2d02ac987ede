"""Forward-confirmed reverse DNS against a dict-backed resolver."""

from __future__ import annotations

import asyncio

import pytest

from spamkiller.checks.base import CheckContext
from spamkiller.checks.fcrdns import MAX_NAMES, FcrdnsCheck
from spamkiller.dns.memory import MemoryResolver
from spamkiller.dns.resolver import DnsTempError, reverse_name
from spamkiller.tls.facts import TlsFacts


def ctx(ip: str) -> CheckContext:
    return CheckContext(
        client_ip=ip,
        listener="mx",
        our_hostname="mx.example.com",
        our_domains=frozenset({"example.com"}),
        tls=TlsFacts.plaintext(starttls_offered=True),
    )


def run(resolver: MemoryResolver, ip: str) -> tuple[list[str], str | None]:
    context = ctx(ip)
    found = asyncio.run(FcrdnsCheck(resolver).run(context))
    return [f.symbol for f in found], context.client_name


def test_confirmed_name_becomes_the_client_name() -> None:
    r = MemoryResolver().add_ptr("203.0.113.7", "mail.sender.example")
    r.add("mail.sender.example", "A", "203.0.113.7")
    assert run(r, "203.0.113.7") == ([], "mail.sender.example")


def test_ipv6_is_confirmed_with_aaaa() -> None:
    r = MemoryResolver().add_ptr("2001:db8::7", "v6.sender.example")
    r.add("v6.sender.example", "AAAA", "2001:db8::7")
    assert run(r, "2001:db8::7") == ([], "v6.sender.example")


def test_no_ptr_and_ptr_not_pointing_back_are_told_apart() -> None:
    assert run(MemoryResolver(), "203.0.113.8") == (["RDNS_NONE"], None)
    r = MemoryResolver().add_ptr("203.0.113.9", "liar.example")
    r.add("liar.example", "A", "198.51.100.1")
    assert run(r, "203.0.113.9") == (["FCRDNS_MISMATCH"], None)


def test_only_the_first_names_are_tried() -> None:
    names = [f"n{i}.example" for i in range(MAX_NAMES + 5)]
    r = MemoryResolver().add_ptr("203.0.113.10", *names)
    r.add(names[-1], "A", "203.0.113.10")  # only the last one points back: too far down
    assert run(r, "203.0.113.10") == (["FCRDNS_MISMATCH"], None)
    assert len(r.queries) == 1 + MAX_NAMES


def test_temporary_failure_is_an_error_for_on_error() -> None:
    r = MemoryResolver().fail(reverse_name("203.0.113.11"))
    with pytest.raises(DnsTempError):
        run(r, "203.0.113.11")


def test_private_clients_are_not_looked_up() -> None:
    r = MemoryResolver()
    assert run(r, "10.0.0.1") == ([], None)
    assert r.queries == []
