"""Rate limits without sockets: networks, exemptions, RateLimiter against the real SQLite store
(connection and message rates, concurrency slots) and against failing or hanging stores."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any, cast

import pytest

from spamkiller.checks.ratelimit import (
    PASS,
    Outcome,
    RateLimiter,
    RateSettings,
    in_any,
    network_of,
)
from spamkiller.smtp.replies import Reply
from spamkiller.store import SlotLease, Store, StoreError, open_store
from spamkiller.store.sqlite import SqliteStore
from spamkiller.units import Rate
from support.store_clock import Clock, with_store

TROUBLE_AT_CONNECT = Reply(421, "4.3.0", "Temporary system problem, try again later")
TROUBLE_AT_MAIL = Reply(451, "4.3.0", "Temporary system problem, try again later")
REFUSED = "store error: redis://localhost:6379/0: connection refused"


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def limiter(store: Any, **settings: Any) -> RateLimiter:
    return RateLimiter(cast(Store, store), RateSettings(**settings))


# ---------------------------------------------------------------------------------------------
# network_of, in_any
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "v4", "v6", "network"),
    [
        ("192.0.2.77", 24, 64, "192.0.2.0/24"),
        ("192.0.2.77", 32, 64, "192.0.2.77/32"),
        ("192.0.2.77", 16, 64, "192.0.0.0/16"),
        ("192.0.2.77", 8, 64, "192.0.0.0/8"),
        ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 24, 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:3:4:5:6", 24, 128, "2001:db8:1:2:3:4:5:6/128"),
        ("2001:db8:1:2:3:4:5:6", 24, 16, "2001::/16"),
        ("2001:DB8::1", 24, 64, "2001:db8::/64"),  # written in its canonical form
    ],
)
def test_network_of(ip: str, v4: int, v6: int, network: str) -> None:
    assert network_of(ip, ipv4_prefix=v4, ipv6_prefix=v6) == network


def test_ipv4_mapped_clients_are_judged_as_ipv4() -> None:
    # A trusted proxy on a dual-stack socket announces IPv4 clients as ::ffff:a.b.c.d (PROXY
    # TCP6); the resolver already unmaps them (dns/resolver.py). Taken as IPv6, every IPv4
    # client falls into one "network", ::/64, sharing one per-network count and one greylist
    # network, and the default exempt list (10.0.0.0/8, ...) misses the internal ones.
    assert network_of("::ffff:192.0.2.1", ipv4_prefix=24, ipv6_prefix=64) == "192.0.2.0/24"
    assert network_of("::ffff:192.0.2.1", ipv4_prefix=24, ipv6_prefix=64) != network_of(
        "::ffff:198.51.100.1", ipv4_prefix=24, ipv6_prefix=64
    )
    assert in_any("::ffff:10.1.2.3", nets("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("ip", "networks", "inside"),
    [
        ("10.1.2.3", ("10.0.0.0/8",), True),
        ("11.1.2.3", ("10.0.0.0/8",), False),
        ("192.168.1.1", ("10.0.0.0/8", "192.168.0.0/16"), True),
        ("127.0.0.1", ("127.0.0.0/8", "::1/128"), True),
        ("::1", ("127.0.0.0/8", "::1/128"), True),
        ("fd00::5", ("fc00::/7",), True),
        ("2001:db8::1", ("10.0.0.0/8",), False),  # another family never matches
        ("10.1.2.3", (), False),
        ("?", ("0.0.0.0/0", "::/0"), False),  # no address known (no peer name): no exemption
        ("", ("0.0.0.0/0",), False),
    ],
)
def test_in_any(ip: str, networks: tuple[str, ...], inside: bool) -> None:
    assert in_any(ip, nets(*networks)) is inside


def test_exempt_clients_are_not_limited() -> None:
    rl = limiter(None, exempt=nets("127.0.0.0/8", "10.0.0.0/8", "fc00::/7"))
    assert not rl.applies("127.0.0.1")
    assert not rl.applies("10.9.8.7")
    assert not rl.applies("fd12::1")
    assert rl.applies("192.0.2.1")
    assert rl.applies("2001:db8::1")
    assert limiter(None).applies("127.0.0.1")  # an empty exempt list exempts nobody


# ---------------------------------------------------------------------------------------------
# connection rates
# ---------------------------------------------------------------------------------------------


def test_connection_rate_per_address(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, connections_per_ip=Rate(2, 60.0))
        assert await rl.admit("192.0.2.1") == PASS
        clock.now += 10
        assert await rl.admit("192.0.2.1") == PASS
        refused = await rl.admit("192.0.2.1")
        assert refused == Outcome(
            reply=Reply(
                421, "4.7.0", "Too many connections from your address, try again in 50 seconds"
            ),
            limit="connections_per_ip=2/1m",
        )
        # Another address, even a neighbour, has its own count.
        assert await rl.admit("192.0.2.2") == PASS
        # Refused attempts are not counted: the window ends on time and the count starts again.
        clock.now += 50
        assert await rl.admit("192.0.2.1") == PASS

    with_store(tmp_path, body)


def test_connection_rate_per_network(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, connections_per_network=Rate(3, 3600.0))
        for host in (1, 2, 3):
            assert await rl.admit(f"192.0.2.{host}") == PASS
        refused = await rl.admit("192.0.2.4")
        assert refused.reply == Reply(
            421, "4.7.0", "Too many connections from your network, try again in 3600 seconds"
        )
        assert refused.limit == "connections_per_network=3/1h"
        assert refused.error is None and refused.leases == ()
        assert await rl.admit("192.0.3.1") == PASS  # the next /24 is another network

    with_store(tmp_path, body)


def test_ipv6_addresses_of_one_64_share_the_network_count(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, connections_per_network=Rate(2, 60.0), ipv6_prefix=64)
        assert await rl.admit("2001:db8:1:2::1") == PASS
        assert await rl.admit("2001:db8:1:2:ffff::9") == PASS
        refused = await rl.admit("2001:db8:1:2::3")
        assert refused.reply is not None and refused.reply.code == 421
        assert await rl.admit("2001:db8:1:3::1") == PASS

    with_store(tmp_path, body)


def test_custom_prefix_widens_the_network(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, connections_per_network=Rate(1, 60.0), ipv4_prefix=16)
        assert await rl.admit("192.0.2.1") == PASS
        refused = await rl.admit("192.0.200.1")  # same /16
        assert refused.limit == "connections_per_network=1/1m"

    with_store(tmp_path, body)


def test_off_limits_touch_nothing() -> None:
    # No rate and no cap: the store is never asked (a store that fails would show otherwise).
    rl = limiter(FailingStore(), on_error="tempfail")
    assert asyncio.run(rl.admit("192.0.2.1")) == PASS
    assert asyncio.run(rl.message("192.0.2.1")) == PASS


# ---------------------------------------------------------------------------------------------
# concurrent sessions
# ---------------------------------------------------------------------------------------------


def test_concurrency_slots_per_address(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, concurrent_per_ip=2)
        first = await rl.admit("192.0.2.1")
        second = await rl.admit("192.0.2.1")
        assert first.reply is None and second.reply is None
        assert len(first.leases) == len(second.leases) == 1
        assert [lease.in_use for lease in (*first.leases, *second.leases)] == [1, 2]
        third = await rl.admit("192.0.2.1")
        assert third == Outcome(
            reply=Reply(421, "4.7.0", "Too many sessions from your address, try again later"),
            limit="concurrent_per_ip=2",
        )
        assert (await rl.admit("192.0.2.2")).reply is None  # its own slots
        # A session ends: its slot lets the next one in.
        assert await rl.release(first.leases) is None
        fourth = await rl.admit("192.0.2.1")
        assert fourth.reply is None and len(fourth.leases) == 1
        # Releasing twice does nothing.
        assert await rl.release(first.leases) is None
        assert (await rl.admit("192.0.2.1")).reply is not None

    with_store(tmp_path, body)


def test_a_refused_network_slot_gives_the_address_slot_back(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, concurrent_per_ip=1, concurrent_per_network=2)
        a = await rl.admit("192.0.2.1")
        b = await rl.admit("192.0.2.2")
        assert len(a.leases) == len(b.leases) == 2  # an address slot and a network slot each
        refused = await rl.admit("192.0.2.3")
        assert refused.reply == Reply(
            421, "4.7.0", "Too many sessions from your network, try again later"
        )
        assert refused.limit == "concurrent_per_network=2"
        assert refused.leases == ()
        await rl.release(a.leases)
        # 192.0.2.3 may hold one slot of its own: had the refused attempt kept it, this would be
        # refused by the address cap.
        again = await rl.admit("192.0.2.3")
        assert again.reply is None and len(again.leases) == 2

    with_store(tmp_path, body)


def test_a_refused_address_slot_gives_the_network_slot_back(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, concurrent_per_ip=1, concurrent_per_network=2)
        held = await rl.admit("192.0.2.1")
        assert held.reply is None
        refused = await rl.admit("192.0.2.1")
        assert refused.limit == "concurrent_per_ip=1"
        # The network has 2 slots, one held: a neighbour must still get the other.
        assert (await rl.admit("192.0.2.2")).reply is None

    with_store(tmp_path, body)


def test_slots_expire_after_slot_ttl(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, concurrent_per_ip=1, slot_ttl=600.0)
        assert (await rl.admit("192.0.2.1")).reply is None  # never released (a crashed worker)
        assert (await rl.admit("192.0.2.1")).reply is not None
        clock.now += 601
        assert (await rl.admit("192.0.2.1")).reply is None

    with_store(tmp_path, body)


def test_a_rate_refusal_takes_no_slot(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, connections_per_ip=Rate(1, 60.0), concurrent_per_ip=1)
        held = await rl.admit("192.0.2.1")
        assert held.reply is None
        await rl.release(held.leases)
        refused = await rl.admit("192.0.2.1")
        assert refused.limit == "connections_per_ip=1/1m" and refused.leases == ()
        clock.now += 60
        assert (await rl.admit("192.0.2.1")).reply is None  # the slot was free all along

    with_store(tmp_path, body)


# ---------------------------------------------------------------------------------------------
# message rates
# ---------------------------------------------------------------------------------------------


def test_message_rate_per_address(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, messages_per_ip=Rate(2, 3600.0))
        assert await rl.message("192.0.2.1") == PASS
        assert await rl.message("192.0.2.1") == PASS
        refused = await rl.message("192.0.2.1")
        assert refused == Outcome(
            reply=Reply(
                451, "4.7.1", "Too many messages from your address, try again in 3600 seconds"
            ),
            limit="messages_per_ip=2/1h",
        )
        assert await rl.message("192.0.2.2") == PASS

    with_store(tmp_path, body)


def test_message_rate_per_network(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, messages_per_network=Rate(3, 86400.0))
        for host in (1, 2, 3):
            assert await rl.message(f"192.0.2.{host}") == PASS
        refused = await rl.message("192.0.2.4")
        assert refused.reply == Reply(
            451, "4.7.1", "Too many messages from your network, try again in 86400 seconds"
        )
        assert refused.limit == "messages_per_network=3/1d"
        assert await rl.message("198.51.100.1") == PASS

    with_store(tmp_path, body)


@pytest.mark.parametrize("stage", ["admit", "message"])
def test_refusals_of_one_address_do_not_use_up_its_networks_allowance(
    tmp_path: Path, stage: str
) -> None:
    # One host hammering past its own limit must not lock its neighbours out: the attempts
    # its address limit refused were never let in, so they should not count for the network
    # either (the store counts no denied hit; the limiter asks both keys at once and the
    # network key counts the hit the address key denied).
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(
            store,
            connections_per_ip=Rate(2, 60.0),
            connections_per_network=Rate(5, 60.0),
            messages_per_ip=Rate(2, 60.0),
            messages_per_network=Rate(5, 60.0),
        )
        attempt = rl.admit if stage == "admit" else rl.message
        outcomes = [await attempt("192.0.2.1") for _ in range(10)]
        assert [o.reply is None for o in outcomes] == [True, True] + [False] * 8
        # Two attempts of the network got in; a neighbour is well within its 5.
        neighbour = await attempt("192.0.2.2")
        assert neighbour.reply is None, neighbour.limit

    with_store(tmp_path, body)


def test_connections_and_messages_are_counted_apart(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        rl = limiter(store, connections_per_ip=Rate(1, 60.0), messages_per_ip=Rate(1, 60.0))
        assert await rl.admit("192.0.2.1") == PASS
        assert await rl.message("192.0.2.1") == PASS
        assert (await rl.message("192.0.2.1")).limit == "messages_per_ip=1/1m"
        assert (await rl.admit("192.0.2.1")).limit == "connections_per_ip=1/1m"

    with_store(tmp_path, body)


def test_two_limiters_on_one_file_share_the_counts(tmp_path: Path) -> None:
    # Two workers (or two hosts on one Redis) each have their own store object.
    async def main() -> None:
        url = "sqlite:///" + str(tmp_path / "s.db")
        one, two = await open_store(url), await open_store(url)
        try:
            settings: dict[str, Any] = {"connections_per_ip": Rate(2, 60.0)}
            assert (await limiter(one, **settings).admit("192.0.2.1")).reply is None
            assert (await limiter(two, **settings).admit("192.0.2.1")).reply is None
            assert (await limiter(one, **settings).admit("192.0.2.1")).reply is not None
        finally:
            await one.close()
            await two.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# store trouble
# ---------------------------------------------------------------------------------------------


class FailingStore:
    """A dead backend: every operation raises StoreError."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def hit_rate(self, key: str, **kwargs: Any) -> None:
        self.calls.append(f"hit_rate {key}")
        raise StoreError("redis://localhost:6379/0: connection refused")

    async def acquire_slot(self, key: str, **kwargs: Any) -> None:
        self.calls.append(f"acquire_slot {key}")
        raise StoreError("redis://localhost:6379/0: connection refused")

    async def release_slot(self, lease: SlotLease) -> None:
        self.calls.append(f"release_slot {lease.key}")
        raise StoreError("redis://localhost:6379/0: connection refused")


class HangingStore:
    """A backend that took the request and never answers."""

    async def hit_rate(self, key: str, **kwargs: Any) -> None:
        await asyncio.sleep(3600)

    async def acquire_slot(self, key: str, **kwargs: Any) -> None:
        await asyncio.sleep(3600)


class NetworkSlotsFail:
    """The real store, except that taking a network slot fails (after the address slot was
    taken): the address slot must not be left behind."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.released: list[str] = []

    async def acquire_slot(self, key: str, *, limit: int, ttl: float) -> SlotLease | None:
        if key.startswith("conc:net:"):
            await asyncio.sleep(0.01)  # the address slot is taken first
            raise StoreError("connection reset")
        return await self.store.acquire_slot(key, limit=limit, ttl=ttl)

    async def release_slot(self, lease: SlotLease) -> None:
        self.released.append(lease.key)
        await self.store.release_slot(lease)


RATES: dict[str, Any] = {
    "connections_per_ip": Rate(100, 60.0),
    "messages_per_ip": Rate(100, 3600.0),
}


def test_store_failure_with_on_error_accept_goes_on_and_says_so() -> None:
    rl = limiter(FailingStore(), on_error="accept", **RATES)
    at_connect = asyncio.run(rl.admit("192.0.2.1"))
    assert at_connect == Outcome(error=REFUSED)
    at_mail = asyncio.run(rl.message("192.0.2.1"))
    assert at_mail == Outcome(error=REFUSED)


def test_store_failure_with_on_error_tempfail() -> None:
    rl = limiter(FailingStore(), on_error="tempfail", **RATES)
    at_connect = asyncio.run(rl.admit("192.0.2.1"))
    assert at_connect == Outcome(reply=TROUBLE_AT_CONNECT, error=REFUSED)
    at_mail = asyncio.run(rl.message("192.0.2.1"))
    assert at_mail == Outcome(reply=TROUBLE_AT_MAIL, error=REFUSED)


@pytest.mark.parametrize("on_error", ["accept", "tempfail"])
def test_slot_failure_follows_on_error(on_error: str) -> None:
    store = FailingStore()
    rl = limiter(store, on_error=on_error, concurrent_per_ip=5, concurrent_per_network=50)
    outcome = asyncio.run(rl.admit("192.0.2.1"))
    assert outcome.error == REFUSED
    assert outcome.leases == ()
    assert outcome.reply == (TROUBLE_AT_CONNECT if on_error == "tempfail" else None)
    assert sorted(store.calls) == [
        "acquire_slot conc:ip:192.0.2.1",
        "acquire_slot conc:net:192.0.2.0/24",
    ]


def test_a_failed_network_slot_gives_the_address_slot_back(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        flaky = NetworkSlotsFail(store)
        rl = limiter(flaky, on_error="accept", concurrent_per_ip=1, concurrent_per_network=10)
        outcome = await rl.admit("192.0.2.1")
        assert outcome.error == "store error: connection reset"
        assert outcome.reply is None and outcome.leases == ()
        assert flaky.released == ["conc:ip:192.0.2.1"]
        # The one address slot is free again.
        assert await store.acquire_slot("conc:ip:192.0.2.1", limit=1, ttl=60) is not None

    with_store(tmp_path, body)


@pytest.mark.parametrize(
    ("on_error", "settings"),
    [
        ("accept", {"connections_per_ip": Rate(1, 60.0)}),
        ("tempfail", {"connections_per_ip": Rate(1, 60.0)}),
        ("accept", {"concurrent_per_ip": 1}),
        ("tempfail", {"concurrent_per_ip": 1}),
    ],
    ids=["rate-accept", "rate-tempfail", "slot-accept", "slot-tempfail"],
)
def test_a_store_that_hangs_past_the_timeout_is_an_error(
    on_error: str, settings: dict[str, Any]
) -> None:
    rl = limiter(HangingStore(), on_error=on_error, timeout=0.05, **settings)

    async def main() -> Outcome:
        async with asyncio.timeout(5):
            return await rl.admit("192.0.2.1")

    outcome = asyncio.run(main())
    assert outcome.error == "store timed out after 50ms"
    assert outcome.reply == (TROUBLE_AT_CONNECT if on_error == "tempfail" else None)


def test_a_hanging_store_at_mail() -> None:
    rl = limiter(HangingStore(), on_error="tempfail", timeout=0.05, **RATES)

    async def main() -> Outcome:
        async with asyncio.timeout(5):
            return await rl.message("192.0.2.1")

    assert asyncio.run(main()) == Outcome(reply=TROUBLE_AT_MAIL, error="store timed out after 50ms")


def test_release_reports_a_store_failure() -> None:
    store = FailingStore()
    rl = limiter(store)
    lease = SlotLease(key="conc:ip:192.0.2.1", token="t", in_use=1)
    assert asyncio.run(rl.release([lease])) == REFUSED
    assert asyncio.run(rl.release([])) is None
    assert store.calls == ["release_slot conc:ip:192.0.2.1"]
