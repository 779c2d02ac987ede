"""CaresResolver's pieces that need no DNS server: settings, the channel's options, the event
loop plumbing (a silent UDP socket stands in for a nameserver that never answers), and close().
The answers themselves are proven against unbound in tests/integration/test_dns_resolver.py."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from spamkiller.dns.cares import CaresResolver
from spamkiller.dns.resolver import DnsInvalidName, DnsTempError
from spamkiller.errors import ConfigError


@pytest.fixture()
def silent() -> Iterator[str]:
    """A UDP "nameserver" that receives and never answers: every query times out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_constructor_reports_every_problem_with_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        CaresResolver(["127.0.0.1", "resolver.example"], timeout=0, cache_size=-1, max_ttl=-1)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "dns.nameservers.1",
        "dns.timeout",
        "dns.cache_size",
        "dns.max_ttl",
    ]


def test_nameservers_as_given() -> None:
    r = CaresResolver(["127.0.0.1:5353", "[::1]:53", "192.0.2.53"])
    assert r.nameservers == ["127.0.0.1:5353", "[::1]:53", "192.0.2.53:53"]
    r.close()


def test_the_system_resolver_is_read() -> None:
    # /etc/resolv.conf names at least one nameserver on every machine this suite runs on.
    assert CaresResolver().nameservers


@pytest.mark.parametrize(
    ("timeout", "servers", "tries"),
    [(0.3, 1, 2), (1.0, 1, 4), (5.0, 1, 6), (5.0, 3, 6), (0.1, 1, 1)],
)
def test_enough_tries_to_last_the_timeout(timeout: float, servers: int, tries: int) -> None:
    # c-ares' per-try timeout adapts down to 250 ms; it must not give up before our deadline.
    r = CaresResolver([f"127.0.0.{i + 1}" for i in range(servers)], timeout=timeout)
    assert r._tries == tries
    r.close()


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_silent_server_times_out_without_blocking_the_loop(
    silent: str, runner: Callable[[Coroutine[Any, Any, float]], float]
) -> None:
    r = CaresResolver([silent], timeout=0.2)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(loop.time())
                await asyncio.sleep(0.005)

        tick = asyncio.create_task(ticker())
        with pytest.raises(DnsTempError, match=r"timed out after 0\.2s"):
            await r.a("example.test")
        tick.cancel()
        return max(b - a for a, b in itertools.pairwise(ticks))

    assert runner(main()) < 0.1


def test_close_ends_queries_in_flight(silent: str) -> None:
    r = CaresResolver([silent], timeout=5)

    async def main() -> None:
        lookup = asyncio.create_task(r.a("example.test"))
        await asyncio.sleep(0.02)
        r.close()
        with pytest.raises(DnsTempError, match="resolver closed"):
            await lookup
        with pytest.raises(DnsTempError, match="resolver closed"):
            await r.txt("example.test")

    asyncio.run(asyncio.wait_for(main(), 1))


def test_a_new_loop_takes_over_the_sockets(silent: str) -> None:
    # One loop per worker in production; a loop per call here. A query left in flight by a
    # closed loop must not stop the next loop's queries from being watched.
    r = CaresResolver([silent], timeout=0.1)
    for _ in range(3):
        with pytest.raises(DnsTempError, match="timed out"):
            asyncio.run(r.a("example.test"))
    assert r.stats.queries == 3


def test_invalid_names_are_refused_before_any_query() -> None:
    r = CaresResolver(["127.0.0.1"])
    with pytest.raises(DnsInvalidName):
        asyncio.run(r.a("a..b"))
    with pytest.raises(DnsInvalidName):
        asyncio.run(r.ptr("not-an-address"))
    assert r.stats.queries == 0


def test_the_configured_backend_is_built() -> None:
    from spamkiller.config import Config
    from spamkiller.dns.dnspython import DnspythonResolver
    from spamkiller.server.app import build_resolver

    dns = {"nameservers": ["127.0.0.1:5353"], "timeout": "2s", "cache_size": 7}
    default = build_resolver(Config.model_validate({"dns": dns}))
    assert isinstance(default, CaresResolver)
    assert (default.nameservers, default.timeout, default._cache.max_entries) == (
        ["127.0.0.1:5353"],
        2.0,
        7,
    )
    chosen = build_resolver(Config.model_validate({"dns": dns | {"backend": "dnspython"}}))
    assert isinstance(chosen, DnspythonResolver)
    with pytest.raises(ValueError, match="backend"):
        Config.model_validate({"dns": {"backend": "aiodns"}})
