"""Greylisting without sockets: how senders are normalised, what the key and the reputation key
are made of, and GreylistSession.check against the real SQLite store and against failing ones."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any, cast

import pytest

from spamkiller.checks.base import CheckContext
from spamkiller.checks.greylist import (
    Greylister,
    GreylistSettings,
    GreyOutcome,
    normalised_sender,
)
from spamkiller.smtp.replies import Reply
from spamkiller.store import Store, StoreError, TlsHistory, open_store
from spamkiller.store.sqlite import SqliteStore
from spamkiller.tls.facts import TlsFacts, TlsStart
from support.store_clock import Clock, with_store

PLAIN = TlsFacts.plaintext(starttls_offered=False)
TLS = TlsFacts(
    began=TlsStart.STARTTLS,
    version="TLSv1.3",
    cipher="TLS_AES_256_GCM_SHA384",
    bits=256,
    starttls_offered=True,
)
MTLS = TlsFacts(
    began=TlsStart.STARTTLS,
    version="TLSv1.3",
    cipher="TLS_AES_256_GCM_SHA384",
    bits=256,
    peer_cert_sha256="sha256/" + "A" * 43 + "=",
    starttls_offered=True,
)
TEMPFAIL_STORE = Reply(451, "4.3.0", "Temporary system problem, try again later")
RCPT = "bob@example.com"


def context(
    ip: str = "192.0.2.10",
    sender: str | None = "alice@example.net",
    *,
    domain: str | None = None,
    tls: TlsFacts = PLAIN,
    history: TlsHistory | None = None,
) -> CheckContext:
    return CheckContext(
        client_ip=ip,
        listener="mx",
        our_hostname="mx.example.com",
        our_domains=frozenset({"example.com"}),
        tls=tls,
        authenticated_domain=domain,
        tls_history=history,
        mail_from=sender,
    )


def greylister(store: Any = None, **settings: Any) -> Greylister:
    return Greylister(cast(Store, store), GreylistSettings(**settings))


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# ---------------------------------------------------------------------------------------------
# normalised_sender
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "normalised"),
    [
        ("", "<>"),  # the null sender (bounces)
        ("Alice@Example.NET", "alice@example.net"),
        ("alice@example.net", "alice@example.net"),
        # BATV (draft-levine-smtp-batv): prvs=<tag>=<local>, Microsoft's msprvs1=
        ("prvs=0891a9abd5=bounce@example.net", "bounce@example.net"),
        ("PRVS=0891A9ABD5=Bounce@Example.NET", "bounce@example.net"),
        ("msprvs1=17abcdEF0uV2=bounces-x@example.net", "bounces-x@example.net"),
        # SRS0=<hash>=<time>=<original domain>=<original local>@<forwarder>: hash and time go,
        # the original address and the forwarder stay.
        (
            "SRS0=HHxy=TT=orig.example=alice@forwarder.example",
            "srs#=orig.example=alice@forwarder.example",
        ),
        (
            "srs0+Ab3c=Z9=orig.example=alice@forwarder.example",
            "srs#=orig.example=alice@forwarder.example",
        ),
        (
            "SRS0-q1w2=e3=orig.example=alice@forwarder.example",
            "srs#=orig.example=alice@forwarder.example",
        ),
        # BATV applied on top of SRS by the forwarder
        (
            "prvs=1234abcd=SRS0=h=t=orig.example=bob@fwd.example",
            "srs#=orig.example=bob@fwd.example",
        ),
        # VERP and per-message ids: every digit run is one '#', in the local part only
        ("bounce-12345-67@lists.example", "bounce-#-#@lists.example"),
        ("bounce-99999-1@lists.example", "bounce-#-#@lists.example"),
        ("user2024@mail2.example", "user#@mail2.example"),
    ],
)
def test_normalised_sender(sender: str, normalised: str) -> None:
    assert normalised_sender(sender) == normalised


def test_two_messages_of_one_batv_sender_share_a_form() -> None:
    first = normalised_sender("prvs=0891a9abd5=news@example.net")
    second = normalised_sender("prvs=7f3e000c12=news@example.net")
    assert first == second == "news@example.net"


def test_two_messages_of_one_srs_forwarder_share_a_form() -> None:
    first = normalised_sender("SRS0=abcd=T1=orig.example=alice@fwd.example")
    second = normalised_sender("SRS0=wxyz=U7=orig.example=alice@fwd.example")
    assert first == second


def test_different_senders_stay_different() -> None:
    assert normalised_sender("alice@example.net") != normalised_sender("bob@example.net")
    assert normalised_sender("alice@example.net") != normalised_sender("alice@example.org")
    # SRS keeps the original address: two forwarded senders are two senders.
    assert normalised_sender("SRS0=h=t=one.example=alice@fwd.example") != normalised_sender(
        "SRS0=h=t=two.example=alice@fwd.example"
    )


def test_barracuda_batv_is_stripped() -> None:
    # Barracuda writes its BATV tag with doubled separators: btv1==<hex>==<local>@<domain>
    # (seen in the wild as e.g. btv1==760cdc7c545==name@heig-vd.ch). The hex tag changes per
    # message, so unless it is removed every new message of such a sender is a new triplet.
    assert normalised_sender("btv1==760cdc7c545==Julian@example.net") == "julian@example.net"
    assert normalised_sender("btv1==34826e458e2==julian@example.net") == normalised_sender(
        "btv1==0777abbcc85==julian@example.net"
    )


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


def test_key_without_an_authenticated_domain_is_network_sender_recipient() -> None:
    g = greylister()
    key = g.key(context("192.0.2.10", "Alice@Example.NET"), "Bob@Example.COM")
    assert key == "grey:net:192.0.2.0/24|alice@example.net|bob@example.com"


def test_key_uses_the_normalised_sender_and_the_null_sender() -> None:
    g = greylister()
    ctx = context(sender="bounce-12345@lists.example")
    assert g.key(ctx, RCPT) == "grey:net:192.0.2.0/24|bounce-#@lists.example|bob@example.com"
    assert g.key(context(sender=""), RCPT) == "grey:net:192.0.2.0/24|<>|bob@example.com"
    # Before MAIL there is no sender at all; it is keyed like the null sender, not "None".
    assert g.key(context(sender=None), RCPT) == "grey:net:192.0.2.0/24|<>|bob@example.com"


def test_ipv4_neighbours_share_a_key_other_networks_do_not() -> None:
    g = greylister()
    key = g.key(context("192.0.2.10"), RCPT)
    assert g.key(context("192.0.2.250"), RCPT) == key
    assert g.key(context("192.0.3.10"), RCPT) != key


def test_ipv6_clients_are_keyed_by_their_64() -> None:
    g = greylister()
    key = g.key(context("2001:db8:1:2::5"), RCPT)
    assert key == "grey:net:2001:db8:1:2::/64|alice@example.net|bob@example.com"
    assert g.key(context("2001:db8:1:2:ffff:ffff:ffff:ffff"), RCPT) == key
    assert g.key(context("2001:db8:1:3::5"), RCPT) != key


def test_custom_prefixes() -> None:
    g = greylister(ipv4_prefix=16, ipv6_prefix=48)
    assert g.network("192.0.2.10") == "192.0.0.0/16"
    assert g.network("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert g.key(context("192.0.200.1"), RCPT) == g.key(context("192.0.2.10"), RCPT)
    exact = greylister(ipv4_prefix=32, ipv6_prefix=128)
    assert exact.network("192.0.2.10") == "192.0.2.10/32"
    assert exact.network("2001:db8::1") == "2001:db8::1/128"
    assert exact.key(context("192.0.2.11"), RCPT) != exact.key(context("192.0.2.10"), RCPT)


def test_key_with_an_authenticated_domain_ignores_the_client_address() -> None:
    g = greylister()
    ctx = context("192.0.2.10", "prvs=0891a9abd5=News@Example.NET", domain="Example.NET")
    key = g.key(ctx, "Bob@Example.COM")
    assert key == "grey:dom:example.net|news@example.net|bob@example.com"
    # The same sender retrying from anywhere in its pool is recognised.
    elsewhere = context("203.0.113.99", "prvs=12345678ab=news@example.net", domain="example.net")
    assert g.key(elsewhere, RCPT) == key
    assert g.key(context("2001:db8::1", "news@example.net", domain="example.net"), RCPT) == key


def test_authenticated_and_network_keys_never_collide() -> None:
    g = greylister()
    assert g.key(context(domain="example.net"), RCPT).startswith("grey:dom:")
    assert g.key(context(), RCPT).startswith("grey:net:")


def test_reputation_key() -> None:
    g = greylister()
    assert g.reputation_key(context("192.0.2.10")) == "rep:net:192.0.2.0/24"
    assert g.reputation_key(context("192.0.2.200")) == "rep:net:192.0.2.0/24"
    assert g.reputation_key(context("2001:db8:1:2::5")) == "rep:net:2001:db8:1:2::/64"
    assert g.reputation_key(context(domain="Example.NET")) == "rep:dom:example.net"
    # Per network or domain, not per sender or recipient.
    assert g.reputation_key(context(sender="other@example.org")) == "rep:net:192.0.2.0/24"


# ---------------------------------------------------------------------------------------------
# GreylistSession.check against the SQLite store
# ---------------------------------------------------------------------------------------------


async def check(
    g: Greylister, ctx: CheckContext, rcpt: str = RCPT, score: float = 0.0
) -> GreyOutcome:
    """One RCPT of a new session (auto-pass is judged once per session)."""
    return await g.session(ctx).check(rcpt, score)


def test_open_store_url_works_for_greylisting(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store("sqlite:///" + str(tmp_path / "s.db"))
        try:
            g = greylister(store, auto_pass_accepted=0)
            first = await check(g, context())
            assert first.status == "new" and first.reply is not None
            assert first.reply.code == 451
        finally:
            await store.close()

    asyncio.run(main())


def test_first_attempt_early_retry_and_timely_retry(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, delay=300.0, auto_pass_accepted=0)
        first = await check(g, context())
        assert first == GreyOutcome(
            status="new",
            reply=Reply(451, "4.7.1", "Greylisted, please try again in 300 seconds"),
        )
        clock.now += 100.5
        early = await check(g, context("192.0.2.77"))  # a neighbour retries: same key
        assert early.status == "early"
        assert early.reply == Reply(451, "4.7.1", "Greylisted, please try again in 200 seconds")
        clock.now += 200
        passed = await check(g, context())
        assert passed == GreyOutcome(status="passed")
        # Once passed, later messages of this triplet pass at once.
        clock.now += 86400
        assert (await check(g, context())).status == "passed"
        # Another recipient, sender or network is another triplet.
        assert (await check(g, context(), "carol@example.com")).status == "new"
        assert (await check(g, context(sender="eve@example.net"))).status == "new"
        assert (await check(g, context("198.51.100.1"))).status == "new"

    with_store(tmp_path, body)


def test_a_retry_after_the_window_starts_again(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, delay=60.0, retry_window=3600.0, auto_pass_accepted=0)
        assert (await check(g, context())).status == "new"
        clock.now += 3601
        again = await check(g, context())
        assert again.status == "new"
        assert again.reply is not None and "in 60 seconds" in str(again.reply.text)

    with_store(tmp_path, body)


def test_recipients_of_one_session_are_greylisted_each(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, auto_pass_accepted=0)
        session = g.session(context())
        assert (await session.check("a@example.com", 0.0)).status == "new"
        assert (await session.check("b@example.com", 0.0)).status == "new"
        clock.now += 1
        again = await session.check("A@example.com", 0.0)  # the first one's key
        assert again.status == "early"
        assert again.reply is not None and "in 299 seconds" in str(again.reply.text)

    with_store(tmp_path, body)


def test_exempt_networks_are_never_greylisted_nor_asked_about() -> None:
    g = greylister(
        FailingStore(), on_error="tempfail", exempt=nets("192.0.2.0/24", "2001:db8::/32")
    )

    async def main() -> None:
        assert await check(g, context("192.0.2.10")) == GreyOutcome(status="skip:exempt")
        assert await check(g, context("2001:db8:5::1")) == GreyOutcome(status="skip:exempt")
        # Outside them the (failing) store is asked.
        outside = await check(g, context("198.51.100.1"))
        assert outside.status == "error" and outside.reply == TEMPFAIL_STORE

    asyncio.run(main())


def test_min_score_skips_sessions_scoring_below_it(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, min_score=0.0, auto_pass_accepted=0)
        assert await check(g, context(), score=-0.5) == GreyOutcome(status="skip:score")
        assert (await check(g, context(), score=0.0)).status == "new"  # at it: greylisted
        high = greylister(store, min_score=2.0, auto_pass_accepted=0)
        assert (await check(high, context(), "x@example.com", score=1.9)).status == "skip:score"
        assert (await check(high, context(), "x@example.com", score=2.0)).status == "new"

    with_store(tmp_path, body)


def test_a_client_certificate_skips_greylisting(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, auto_pass_accepted=0)
        skipped = await check(g, context(tls=MTLS))
        assert skipped == GreyOutcome(status="skip:client-certificate")
        # TLS without a client certificate is greylisted like plaintext.
        assert (await check(g, context(tls=TLS))).status == "new"

    with_store(tmp_path, body)


def test_auto_pass_after_accepted_mail_from_the_network(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, auto_pass_accepted=3)
        assert (await check(g, context())).status == "new"
        for _ in range(2):
            assert await g.record_accepted(context()) is None
        assert (await check(g, context(), "x@example.com")).status == "new"  # 2 < 3
        await store.record_outcome(g.reputation_key(context()), "accepted", expire=3600)
        skipped = await check(g, context(), "y@example.com")
        assert skipped == GreyOutcome(status="skip:history")
        # The record is the network's: a neighbour with another sender passes too ...
        neighbour = context("192.0.2.99", "someone@else.example")
        assert (await check(g, neighbour, "z@example.com")).status == "skip:history"
        # ... another network does not.
        assert (await check(g, context("198.51.100.1"))).status == "new"

    with_store(tmp_path, body)


def test_auto_pass_by_authenticated_domain(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, auto_pass_accepted=1)
        ctx = context("192.0.2.10", domain="example.net")
        await g.record_accepted(ctx)
        assert await store.reputation("rep:dom:example.net") is not None
        other_pool = context("203.0.113.5", domain="example.net")
        assert (await check(g, other_pool)).status == "skip:history"
        # The network record was not touched.
        assert (await check(g, context("192.0.2.10"))).status == "new"

    with_store(tmp_path, body)


def test_auto_pass_accepted_zero_never_passes_on_history(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, auto_pass_accepted=0)
        for _ in range(50):
            await g.record_accepted(context())
        assert (await check(g, context())).status == "new"

    with_store(tmp_path, body)


def steady(with_tls: int, without_tls: int = 0) -> TlsHistory:
    return TlsHistory(
        first_seen=1.0,
        last_seen=2.0,
        with_tls=with_tls,
        without_tls=without_tls,
        best_version="TLSv1.3",
        floor=None,
    )


@pytest.mark.parametrize(
    ("tls", "history", "status"),
    [
        (TLS, steady(3), "skip:tls-history"),
        (TLS, steady(10), "skip:tls-history"),
        (TLS, steady(2), "new"),  # not enough sessions yet
        (TLS, steady(10, without_tls=1), "new"),  # came once without TLS
        (PLAIN, steady(10), "new"),  # this session is not TLS
        (TLS, None, "new"),  # no history recorded
    ],
)
def test_auto_pass_on_a_steady_tls_history(
    tmp_path: Path, tls: TlsFacts, history: TlsHistory | None, status: str
) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, auto_pass_accepted=0, auto_pass_tls_sessions=3)
        assert (await check(g, context(tls=tls, history=history))).status == status

    with_store(tmp_path, body)


def test_tls_history_auto_pass_is_off_by_default(tmp_path: Path) -> None:
    async def body(store: SqliteStore, clock: Clock) -> None:
        g = greylister(store, auto_pass_accepted=0)
        assert GreylistSettings().auto_pass_tls_sessions == 0
        assert (await check(g, context(tls=TLS, history=steady(1000)))).status == "new"

    with_store(tmp_path, body)


# ---------------------------------------------------------------------------------------------
# store trouble: on_error, never a silent pass
# ---------------------------------------------------------------------------------------------


class FailingStore:
    """Every operation the greylist uses fails as a dead backend does."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def reputation(self, key: str) -> None:
        self.calls.append("reputation")
        raise StoreError("redis://localhost:6379/0: connection refused")

    async def greylist(self, key: str, **kwargs: Any) -> None:
        self.calls.append("greylist")
        raise StoreError("redis://localhost:6379/0: connection refused")

    async def record_outcome(self, key: str, outcome: str, *, expire: float) -> None:
        self.calls.append("record_outcome")
        raise StoreError("redis://localhost:6379/0: connection refused")


class HangingStore:
    """A backend that never answers (a Redis that accepted the connection and went silent)."""

    async def reputation(self, key: str) -> None:
        await asyncio.sleep(3600)

    async def greylist(self, key: str, **kwargs: Any) -> None:
        await asyncio.sleep(3600)


@pytest.mark.parametrize("auto_pass_accepted", [0, 5], ids=["greylist-call", "reputation-call"])
def test_store_error_with_on_error_accept_goes_on_but_says_so(auto_pass_accepted: int) -> None:
    store = FailingStore()
    g = greylister(store, on_error="accept", auto_pass_accepted=auto_pass_accepted)
    outcome = asyncio.run(check(g, context()))
    assert outcome.status == "error"
    assert outcome.reply is None
    assert outcome.error == "store error: redis://localhost:6379/0: connection refused"
    assert store.calls == (["reputation"] if auto_pass_accepted else ["greylist"])


@pytest.mark.parametrize("auto_pass_accepted", [0, 5], ids=["greylist-call", "reputation-call"])
def test_store_error_with_on_error_tempfail_answers_451_430(auto_pass_accepted: int) -> None:
    g = greylister(FailingStore(), on_error="tempfail", auto_pass_accepted=auto_pass_accepted)
    outcome = asyncio.run(check(g, context()))
    assert outcome.status == "error"
    assert outcome.reply == TEMPFAIL_STORE
    assert outcome.error is not None and "connection refused" in outcome.error


@pytest.mark.parametrize("on_error", ["accept", "tempfail"])
def test_a_store_that_hangs_past_the_timeout_is_an_error(on_error: str) -> None:
    g = greylister(HangingStore(), on_error=on_error, timeout=0.05)

    async def main() -> GreyOutcome:
        async with asyncio.timeout(5):
            return await check(g, context())

    outcome = asyncio.run(main())
    assert outcome.status == "error"
    assert outcome.error == "store timed out after 50ms"
    assert outcome.reply == (TEMPFAIL_STORE if on_error == "tempfail" else None)


def test_a_failed_auto_pass_lookup_is_asked_again_on_the_next_recipient() -> None:
    store = FailingStore()
    g = greylister(store, auto_pass_accepted=5)

    async def main() -> None:
        session = g.session(context())
        await session.check("a@example.com", 0.0)
        await session.check("b@example.com", 0.0)

    asyncio.run(main())
    assert store.calls == ["reputation", "reputation"]


def test_record_accepted_reports_the_store_error() -> None:
    g = greylister(FailingStore())
    error = asyncio.run(g.record_accepted(context()))
    assert error == "store error: redis://localhost:6379/0: connection refused"
