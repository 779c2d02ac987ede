"""MemoryResolver keeps the protocol's semantics, so checks unit-tested on it behave the same
against the real resolver: values or typed errors, NXDOMAIN vs NODATA, failures, hangs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from spamkiller.dns.memory import MemoryResolver
from spamkiller.dns.resolver import (
    DnsInvalidName,
    DnsNoData,
    DnsNxDomain,
    DnsPermError,
    DnsTempError,
    Resolver,
    Tlsa,
)

T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


def resolver() -> MemoryResolver:
    return (
        MemoryResolver(
            {
                ("example.com", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all", "google-site=x"],
                ("example.com", "MX"): [(20, "MX2.example.com."), (10, "mx1.example.com")],
            }
        )
        .add("mx1.example.com", "A", "192.0.2.10")
        .add("mx1.example.com", "AAAA", "2001:DB8:0::10")
        .add("sel._domainkey.example.com", "TXT", "v=DKIM1; p=MIIB")
        .add("2.0.0.127.zen.example", "A", "127.0.0.2", "127.0.0.4")
        .add("null.example", "MX", (0, "."))
        .add(
            "_25._tcp.mx1.example.com",
            "TLSA",
            Tlsa(usage=3, selector=1, mtype=1, data=b"k", authenticated=True),
        )
        .add_ptr("192.0.2.10", "mx1.example.com")
        .add_ptr("2001:db8::10", "MX1.example.com.")
    )


def test_it_is_a_resolver() -> None:
    r: Resolver = MemoryResolver()  # mypy checks the protocol where checks use it
    assert all(callable(getattr(r, m)) for m in ("txt", "a", "aaaa", "mx", "ptr", "tlsa"))


def test_values_as_the_real_resolver_returns_them() -> None:
    r = resolver()
    assert run(r.txt("Example.COM.")) == ["v=spf1 ip4:192.0.2.0/24 -all", "google-site=x"]
    assert run(r.mx("example.com")) == [(10, "mx1.example.com"), (20, "mx2.example.com")]
    assert run(r.a("mx1.example.com")) == ["192.0.2.10"]
    assert run(r.aaaa("mx1.example.com")) == ["2001:db8::10"]
    assert run(r.ptr("192.0.2.10")) == ["mx1.example.com"]
    assert run(r.ptr("2001:db8:0:0::10")) == ["mx1.example.com"]
    assert run(r.ptr("::ffff:192.0.2.10")) == ["mx1.example.com"]
    assert run(r.mx("null.example")) == [(0, ".")]
    (tlsa,) = run(r.tlsa("_25._tcp.mx1.example.com"))
    assert tlsa.authenticated and tlsa.usage == 3


def test_returned_lists_are_copies() -> None:
    r = resolver()
    run(r.a("2.0.0.127.zen.example")).clear()
    assert run(r.a("2.0.0.127.zen.example")) == ["127.0.0.2", "127.0.0.4"]


def test_nxdomain_and_nodata_are_told_apart() -> None:
    r = resolver()
    with pytest.raises(DnsNxDomain):
        run(r.a("3.0.0.127.zen.example"))
    with pytest.raises(DnsNoData):
        run(r.mx("mx1.example.com"))  # has A and AAAA
    with pytest.raises(DnsNoData):
        run(r.txt("_domainkey.example.com"))  # an empty non-terminal exists
    with pytest.raises(DnsNoData):
        run(r.txt("zen.example"))
    with pytest.raises(DnsNxDomain):
        run(r.txt("other._domainkey.example.com"))
    with pytest.raises(DnsNxDomain):
        run(r.ptr("192.0.2.11"))
    # Both are permanent: a DNSBL check catches DnsPermError as "not listed".
    with pytest.raises(DnsPermError):
        run(r.a("4.0.0.127.zen.example"))


def test_invalid_names_raise_before_anything_is_asked() -> None:
    r = resolver()
    with pytest.raises(DnsInvalidName):
        run(r.a("bad..name"))
    with pytest.raises(DnsInvalidName):
        run(r.ptr("not-an-ip"))
    assert r.queries == []


def test_failures_override_records() -> None:
    r = resolver().fail("example.com", "TXT").fail("mx1.example.com", error=DnsNxDomain)
    with pytest.raises(DnsTempError, match=r"example\.com TXT"):
        run(r.txt("example.com"))
    assert run(r.mx("example.com"))[0] == (10, "mx1.example.com")  # other types unaffected
    with pytest.raises(DnsNxDomain):
        run(r.a("mx1.example.com"))
    with pytest.raises(DnsNxDomain):
        run(r.aaaa("mx1.example.com"))


def test_a_failing_subtree_is_a_zone_that_is_down() -> None:
    r = resolver().fail("zen.example", subtree=True, reason="SERVFAIL")
    for name in ("2.0.0.127.zen.example", "9.9.9.9.zen.example"):
        with pytest.raises(DnsTempError, match="SERVFAIL"):
            run(r.a(name))
    with pytest.raises(DnsTempError):
        run(r.txt("2.0.0.127.zen.example"))
    assert run(r.a("mx1.example.com")) == ["192.0.2.10"]


def test_each_failure_is_a_fresh_exception() -> None:
    r = MemoryResolver().fail("down.example")
    errors: list[DnsTempError] = []
    for _ in range(2):
        try:
            run(r.a("down.example"))
        except DnsTempError as exc:
            errors.append(exc)
    assert errors[0] is not errors[1]


def test_a_hanging_lookup_is_cancelled_by_the_callers_timeout() -> None:
    r = resolver().hang("zen.example", subtree=True)

    async def check() -> str:
        try:
            async with asyncio.timeout(0.05):
                await r.a("2.0.0.127.zen.example")
        except TimeoutError:
            return "timed out"
        return "answered"

    assert run(check()) == "timed out"


def test_queries_are_recorded_in_order() -> None:
    r = resolver()
    run(r.txt("Example.com."))
    with pytest.raises(DnsNxDomain):
        run(r.a("nope.example"))
    run(r.ptr("192.0.2.10"))
    assert r.queries == [
        ("example.com", "TXT"),
        ("nope.example", "A"),
        ("10.2.0.192.in-addr.arpa", "PTR"),
    ]


def test_lookups_yield_to_the_loop() -> None:
    r = MemoryResolver().add("a.example", "A", "192.0.2.1")

    async def main() -> list[bool]:
        ran: list[bool] = []
        asyncio.get_running_loop().call_soon(ran.append, True)
        await r.a("a.example")  # a real lookup yields; a check must not rely on it not doing so
        return ran

    assert run(main()) == [True]


def test_a_delay_slows_every_lookup() -> None:
    r = MemoryResolver(delay=0.05).add("a.example", "A", "192.0.2.1")

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await r.a("a.example")
        return loop.time() - start

    assert run(timed()) >= 0.05


@pytest.mark.parametrize(
    ("rdtype", "value"),
    [
        ("A", "2001:db8::1"),
        ("A", "300.1.1.1"),
        ("AAAA", "192.0.2.1"),
        ("MX", "10 mx.example.com"),
        ("MX", (70000, "mx.example.com")),
        ("TLSA", "3 1 1 abcd"),
        ("TXT", b"bytes"),
        ("PTR", "bad..name"),
    ],
)
def test_typos_in_test_data_fail_where_they_are_written(rdtype: str, value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        MemoryResolver().add("x.example", rdtype, value)  # type: ignore[arg-type]


def test_unknown_record_type_is_refused() -> None:
    with pytest.raises(ValueError, match="record type"):
        MemoryResolver().add("x.example", "SRV", "0 0 25 mx.example")  # type: ignore[arg-type]
