"""Both resolvers against a real DNS server (unbound on 127.0.0.1, see support/dns_server.py).

Every test runs once per backend (``CaresResolver``, ``DnspythonResolver``): the same
semantics, proven the same way. Every record type, the four ways a lookup ends without values
(NXDOMAIN, NODATA, SERVFAIL, timeout), DNSSEC's AD bit (through dnspython for both: c-ares
hands TLSA over), and the cache proven from the server's side: its query counter does not
move on a hit, and a stopped server still "answers" until the TTL runs out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import uvloop

from spamkiller.dns.cares import CaresResolver
from spamkiller.dns.dnspython import DnspythonResolver
from spamkiller.dns.resolver import (
    DnsNoData,
    DnsNxDomain,
    DnsTempError,
    Tlsa,
    reverse_labels,
)
from support.dns_server import DnsServer

T = TypeVar("T")
Real = CaresResolver | DnspythonResolver
BACKENDS: dict[str, type[Real]] = {"cares": CaresResolver, "dnspython": DnspythonResolver}
KEY_HASH = "ab" * 32
BIG_TXT = ["x" * 250] * 12  # 3,000+ bytes: truncated over UDP at 1232, so dnspython uses TCP


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    srv = DnsServer(tmp_path_factory.mktemp("unbound"))
    srv.add("host.example.test", "A", "192.0.2.10")
    srv.add("host.example.test", "A", "192.0.2.11")
    srv.add("host.example.test", "AAAA", "2001:db8::10")
    srv.txt("example.test", "v=spf1 ip4:192.0.2.0/24 ", "-all")
    srv.txt("example.test", "another record")
    srv.add("binary.example.test", "TXT", '"caf\\233"')  # byte 0xE9 alone: not UTF-8
    srv.txt("big.example.test", *BIG_TXT)
    srv.add("example.test", "MX", "20 mx2.example.test.")
    srv.add("example.test", "MX", "10 MX1.Example.Test.")
    srv.add("null-mx.example.test", "MX", "0 .")
    srv.add("_25._tcp.mx1.example.test", "TLSA", f"3 1 1 {KEY_HASH}")
    srv.add("ttl0.example.test", "A", "192.0.2.99", ttl=0)
    srv.add("xn--bcher-kva.test", "A", "192.0.2.77")
    srv.ptr("192.0.2.10", "Host.Example.Test")
    srv.ptr("2001:db8::10", "host.example.test")
    srv.add("odd.example.test", "MX", '5 a\\032b\\007\\255\\.\\"\\;\\\\.Example.test.')
    # A DNSBL zone: 127.0.0.2 is the conventional test listing; an IPv6 listing by nibbles.
    srv.add("2.0.0.127.zen.example", "A", "127.0.0.2")
    srv.add("2.0.0.127.zen.example", "A", "127.0.0.4")
    srv.txt("2.0.0.127.zen.example", "Listed: https://zen.example/query/ip/127.0.0.2")
    srv.add(f"{reverse_labels('2001:db8::bad')}.zen.example", "A", "127.0.0.3")
    srv.signed_zone(
        "dnssec.test",
        [("_25._tcp.mx", "TLSA", f"3 1 1 {KEY_HASH}"), ("mx", "A", "192.0.2.25")],
    )
    srv.signed_zone("bogus.test", [("_25._tcp.mx", "TLSA", f"3 1 1 {KEY_HASH}")], bogus=True)
    srv.servfail_zone("servfail.test")
    srv.drop_zone("blackhole.test")
    with srv:
        yield srv


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> type[Real]:
    return BACKENDS[request.param]


@pytest.fixture()
def resolver(server: DnsServer, backend: type[Real]) -> Real:
    return backend([server.address], timeout=0.3)


# --- values ----------------------------------------------------------------------------------


def test_a_and_aaaa(resolver: Real) -> None:
    assert sorted(run(resolver.a("host.example.test"))) == ["192.0.2.10", "192.0.2.11"]
    assert run(resolver.aaaa("HOST.example.test.")) == ["2001:db8::10"]


def test_txt_joins_the_strings_of_each_record(resolver: Real) -> None:
    assert sorted(run(resolver.txt("example.test"))) == [
        "another record",
        "v=spf1 ip4:192.0.2.0/24 -all",
    ]


def test_txt_that_is_not_utf8_is_replaced_not_raised(resolver: Real) -> None:
    assert run(resolver.txt("binary.example.test")) == ["caf\ufffd"]


def test_a_large_answer_comes_over_tcp(resolver: Real) -> None:
    assert run(resolver.txt("big.example.test")) == ["".join(BIG_TXT)]


def test_mx_sorted_and_lowercase(resolver: Real) -> None:
    assert run(resolver.mx("example.test")) == [(10, "mx1.example.test"), (20, "mx2.example.test")]
    assert run(resolver.mx("null-mx.example.test")) == [(0, ".")]


def test_names_out_escape_what_is_not_printable(resolver: Real) -> None:
    # Space, control and 8-bit bytes as \\DDD; dots, quotes, semicolons, backslashes escaped.
    assert run(resolver.mx("odd.example.test")) == [
        (5, 'a\\032b\\007\\255\\.\\"\\;\\\\.example.test')
    ]


def test_ptr_for_ipv4_and_ipv6(resolver: Real) -> None:
    assert run(resolver.ptr("192.0.2.10")) == ["host.example.test"]
    assert run(resolver.ptr("::ffff:192.0.2.10")) == ["host.example.test"]
    assert run(resolver.ptr("2001:DB8:0::10")) == ["host.example.test"]
    with pytest.raises(DnsNxDomain):
        run(resolver.ptr("192.0.2.200"))


def test_idna_names(resolver: Real) -> None:
    assert run(resolver.a("bücher.test")) == ["192.0.2.77"]


def test_dnsbl_style_lookups(resolver: Real) -> None:
    listed = f"{reverse_labels('127.0.0.2')}.zen.example"
    assert listed == "2.0.0.127.zen.example"
    assert sorted(run(resolver.a(listed))) == ["127.0.0.2", "127.0.0.4"]
    assert run(resolver.txt(listed)) == ["Listed: https://zen.example/query/ip/127.0.0.2"]
    assert run(resolver.a(f"{reverse_labels('2001:db8::bad')}.zen.example")) == ["127.0.0.3"]
    with pytest.raises(DnsNxDomain):
        run(resolver.a(f"{reverse_labels('192.0.2.1')}.zen.example"))  # not listed


# --- TLSA and DNSSEC -------------------------------------------------------------------------


def test_tlsa_from_plain_local_data_is_not_authenticated(resolver: Real) -> None:
    assert run(resolver.tlsa("_25._tcp.mx1.example.test")) == [
        Tlsa(usage=3, selector=1, mtype=1, data=bytes.fromhex(KEY_HASH), authenticated=False)
    ]


def test_tlsa_from_a_signed_zone_is_authenticated(resolver: Real) -> None:
    assert run(resolver.tlsa("_25._tcp.mx.dnssec.test")) == [
        Tlsa(usage=3, selector=1, mtype=1, data=bytes.fromhex(KEY_HASH), authenticated=True)
    ]
    assert run(resolver.a("mx.dnssec.test")) == ["192.0.2.25"]  # no DO needed elsewhere
    with pytest.raises(DnsNxDomain):
        run(resolver.tlsa("_25._tcp.other.dnssec.test"))  # an authenticated denial


def test_a_bogus_signature_is_a_temporary_failure(resolver: Real) -> None:
    with pytest.raises(DnsTempError, match="SERVFAIL"):
        run(resolver.tlsa("_25._tcp.mx.bogus.test"))


def test_cares_hands_tlsa_to_dnspython(server: DnsServer) -> None:
    # c-ares does not report the AD bit; the DnspythonResolver inside does, built on first use.
    resolver = CaresResolver([server.address], timeout=0.3)
    assert resolver._dnssec is None
    assert run(resolver.a("mx.dnssec.test")) == ["192.0.2.25"]
    assert resolver._dnssec is None  # the other types never need it
    assert [t.authenticated for t in run(resolver.tlsa("_25._tcp.mx.dnssec.test"))] == [True]
    assert resolver._dnssec is not None
    assert resolver._dnssec.stats.queries == 1
    assert resolver.stats.queries == 1  # the A lookup only: TLSA is the delegate's
    resolver.clear_cache()
    assert resolver._dnssec.stats.entries == 0


def test_names_that_are_not_host_names(resolver: Real) -> None:
    # An SPF macro can expand a local part into a label: c-ares refuses "+" or "@" in names,
    # so CaresResolver asks through dnspython; both get the server's answer.
    for name in ("a+b.example.test", "a@b.example.test", "a\\b.example.test"):
        with pytest.raises(DnsNxDomain):
            run(resolver.a(name))


def test_many_different_concurrent_lookups(server: DnsServer, backend: type[Real]) -> None:
    # About correctness under concurrency, not speed: 200 lookups at once take dnspython a few
    # hundred ms of CPU on a slow machine, more than the 0.3 s of the other tests.
    resolver = backend([server.address], timeout=5.0)

    async def many() -> list[object]:
        names = [f"{i}.0.0.10.zen.example" for i in range(200)] + ["host.example.test"] * 10
        return await asyncio.gather(*(resolver.a(n) for n in names), return_exceptions=True)

    answers = run(many())
    assert all(isinstance(a, DnsNxDomain) for a in answers[:200])
    for a in answers[200:]:
        assert isinstance(a, list) and sorted(a) == ["192.0.2.10", "192.0.2.11"]


# --- lookups without values ------------------------------------------------------------------


def test_nxdomain_and_nodata_are_told_apart(resolver: Real) -> None:
    with pytest.raises(DnsNxDomain):
        run(resolver.a("nothing.example.test"))
    with pytest.raises(DnsNoData):
        run(resolver.mx("host.example.test"))  # has A and AAAA
    with pytest.raises(DnsNoData):
        run(resolver.aaaa("ttl0.example.test"))


def test_servfail_is_temporary_and_immediate(resolver: Real) -> None:
    start = time.monotonic()
    with pytest.raises(DnsTempError, match="SERVFAIL"):
        run(resolver.a("x.servfail.test"))
    assert time.monotonic() - start < 0.25  # not the 0.3 s timeout


def test_refused_is_temporary(resolver: Real) -> None:
    with pytest.raises(DnsTempError, match="REFUSED"):
        run(resolver.a("www.example.org"))  # outside every zone of the test server


def test_timeout_is_temporary_and_bounded(resolver: Real) -> None:
    start = time.monotonic()
    with pytest.raises(DnsTempError, match=r"timed out after 0\.3s"):
        run(resolver.a("x.blackhole.test"))
    assert 0.25 < time.monotonic() - start < 0.8


def test_a_lookup_never_blocks_the_loop(resolver: Real) -> None:
    async def main() -> float:
        gaps: list[float] = []

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            last = loop.time()
            while True:
                await asyncio.sleep(0.005)
                now = loop.time()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        with pytest.raises(DnsTempError):
            await resolver.a("y.blackhole.test")
        tick.cancel()
        return max(gaps)

    assert run(main()) < 0.1


def test_a_cancelled_caller_does_not_cancel_the_shared_query(resolver: Real) -> None:
    async def main() -> None:
        first = asyncio.create_task(resolver.a("z.blackhole.test"))
        second = asyncio.create_task(resolver.a("z.blackhole.test"))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(DnsTempError, match="timed out"):
            await second
        assert resolver.stats.queries == 1  # both callers shared one query
        assert await resolver.a("host.example.test")

    run(main())


# --- the cache -------------------------------------------------------------------------------


def test_a_second_lookup_does_not_reach_the_server(resolver: Real, server: DnsServer) -> None:
    before = server.queries()
    first = run(resolver.a("host.example.test"))
    with pytest.raises(DnsNxDomain):
        run(resolver.a("absent.example.test"))
    with pytest.raises(DnsNoData):
        run(resolver.txt("host.example.test"))
    middle = server.queries()
    assert middle - before == 3
    assert run(resolver.a("Host.Example.Test.")) == first
    for _ in range(3):
        with pytest.raises(DnsNxDomain):
            run(resolver.a("absent.example.test"))
        with pytest.raises(DnsNoData):
            run(resolver.txt("host.example.test"))
    assert server.queries() == middle
    stats = resolver.stats
    assert (stats.queries, stats.hits) == (3, 7)


def test_concurrent_lookups_share_one_query(resolver: Real, server: DnsServer) -> None:
    async def many() -> list[list[str]]:
        return list(await asyncio.gather(*(resolver.a("host.example.test") for _ in range(50))))

    before = server.queries()
    answers = run(many())
    assert server.queries() - before == 1
    assert all(sorted(a) == ["192.0.2.10", "192.0.2.11"] for a in answers)


def test_temporary_failures_are_not_cached(resolver: Real, server: DnsServer) -> None:
    before = server.queries()
    for _ in range(2):
        with pytest.raises(DnsTempError):
            run(resolver.a("x.servfail.test"))
    assert server.queries() - before == 2


def test_ttl_clamps(server: DnsServer, backend: type[Real]) -> None:
    # Counted by the resolver (queries sent) rather than by unbound-control, whose own run time
    # under load could let a 0.5 s TTL run out between two lookups.
    def count(resolver: Real, lookup: Awaitable[object], pause: float = 0) -> int:
        before = resolver.stats.queries
        run(lookup)
        time.sleep(pause)
        return resolver.stats.queries - before

    # TTL 0 is not cached, unless min_ttl says so.
    plain = backend([server.address], timeout=0.3)
    floor = backend([server.address], timeout=0.3, min_ttl=60)
    assert [count(plain, plain.a("ttl0.example.test")) for _ in range(2)] == [1, 1]
    assert [count(floor, floor.a("ttl0.example.test")) for _ in range(2)] == [1, 0]
    # TTL 300 and a negative TTL of 30 are cut to max_ttl and max_negative_ttl.
    short = backend([server.address], timeout=0.3, max_ttl=0.5, max_negative_ttl=0.5)

    async def nx() -> None:
        with pytest.raises(DnsNxDomain):
            await short.a("absent.example.test")

    assert count(short, short.a("host.example.test")) == 1
    assert count(short, nx()) == 1
    assert count(short, short.a("host.example.test")) == 0
    assert count(short, nx(), pause=0.55) == 0
    assert count(short, short.a("host.example.test")) == 1
    assert count(short, nx()) == 1


def test_a_stopped_server_is_answered_from_the_cache_until_the_ttl_ends(
    tmp_path: Path, backend: type[Real]
) -> None:
    srv = DnsServer(tmp_path, negative_ttl=1)
    srv.add("short.example.test", "A", "192.0.2.1", ttl=1)
    with srv:
        resolver = backend([srv.address], timeout=0.3)
        assert run(resolver.a("short.example.test")) == ["192.0.2.1"]
        with pytest.raises(DnsNxDomain):
            run(resolver.a("absent.example.test"))
        started = time.monotonic()
    # Stopped: the cache answers both, positive and negative.
    assert run(resolver.a("short.example.test")) == ["192.0.2.1"]
    with pytest.raises(DnsNxDomain):
        run(resolver.a("absent.example.test"))
    time.sleep(max(0.0, 1.05 - (time.monotonic() - started)))
    # Expired: the server is asked, and is not there. dnspython's UDP sockets are not
    # connected, so the ICMP "port unreachable" is not seen: each lookup is a timeout. c-ares
    # connects its UDP socket, sees it, and fails at once.
    gone = "timed out" if backend is DnspythonResolver else "connection refused from 127.0.0.1"
    start = time.monotonic()
    with pytest.raises(DnsTempError, match=gone):
        run(resolver.a("short.example.test"))
    with pytest.raises(DnsTempError, match=gone):
        run(resolver.a("absent.example.test"))
    assert time.monotonic() - start < (1.0 if backend is DnspythonResolver else 0.1)


def test_changed_records_after_reload(tmp_path: Path, backend: type[Real]) -> None:
    srv = DnsServer(tmp_path)
    srv.add("moving.example.test", "A", "192.0.2.1", ttl=300)
    with srv:
        cached = backend([srv.address], timeout=0.3)
        assert run(cached.a("moving.example.test")) == ["192.0.2.1"]
        srv.remove("moving.example.test")
        srv.add("moving.example.test", "A", "192.0.2.2")
        srv.txt("new.example.test", "hello")
        srv.reload()
        fresh = backend([srv.address], timeout=0.3)
        assert run(fresh.a("moving.example.test")) == ["192.0.2.2"]
        assert run(fresh.txt("new.example.test")) == ["hello"]
        assert run(cached.a("moving.example.test")) == ["192.0.2.1"]  # the TTL still holds
        cached.clear_cache()
        assert run(cached.a("moving.example.test")) == ["192.0.2.2"]


def test_under_uvloop(server: DnsServer, backend: type[Real]) -> None:
    resolver = backend([server.address], timeout=0.3)

    async def main() -> None:
        assert run_in_loop_is_uvloop()
        assert await resolver.ptr("2001:db8::10") == ["host.example.test"]
        assert await resolver.txt("big.example.test") == ["".join(BIG_TXT)]
        with pytest.raises(DnsTempError, match="timed out"):
            await resolver.a("u.blackhole.test")
        with pytest.raises(DnsNxDomain):
            await resolver.a("nothing.example.test")

    def run_in_loop_is_uvloop() -> bool:
        return isinstance(asyncio.get_running_loop(), uvloop.Loop)

    uvloop.run(main())
