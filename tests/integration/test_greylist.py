"""Greylisting end to end: real sockets, clients announced through a trusted PROXY hop (so they
have public-looking addresses), the SQLite store in the test's data directory."""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Certs, mx_config
from support.attempt import attempt
from support.mx import Mx
from support.proxy import proxied_listener
from support.upstream import RecordingUpstream

DELAY = 1.0


def config(tmp_path: Path, certs: Certs, port: int, **greylist: Any) -> dict[str, Any]:
    settings = {"enabled": True, "delay": f"{DELAY}s", "auto_pass_accepted": 0} | greylist
    return mx_config(
        tmp_path, certs, upstream_port=port, listeners=proxied_listener(), greylist=settings
    )


def retry_after(reply: bytes) -> int:
    found = re.search(rb"try again in (\d+) seconds", reply)
    assert found, reply
    return int(found.group(1))


def test_first_attempt_is_deferred_and_a_timely_retry_is_delivered(
    tmp_path: Path, certs: Certs
) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        first = attempt(mx.port(), "198.51.100.7")
        assert first.rcpt.startswith(b"451 4.7.1 Greylisted, please try again in ")
        assert retry_after(first.rcpt) == 1
        assert mx.log.wait_for("defer", "stage=rcpt", 'reason="greylist new"')

        too_early = attempt(mx.port(), "198.51.100.7")
        assert too_early.rcpt.startswith(b"451 4.7.1 Greylisted")
        assert mx.log.wait_for('reason="greylist early"')
        assert up.messages == []  # nothing reached the upstream while greylisted

        time.sleep(DELAY + 0.2)
        retry = attempt(mx.port(), "198.51.100.7")
        assert retry.delivered, retry
        assert len(up.messages) == 1
        # Once passed, the triplet passes every time.
        assert attempt(mx.port(), "198.51.100.7").delivered


def test_retry_from_another_address_of_the_same_network_passes(
    tmp_path: Path, certs: Certs
) -> None:
    """Large senders retry from another address of their pool: the key is the /24."""
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        assert attempt(mx.port(), "203.0.113.10").rcpt.startswith(b"451 ")
        time.sleep(DELAY + 0.2)
        assert attempt(mx.port(), "203.0.113.200").delivered
        # Another network is a new sender as far as greylisting knows.
        assert attempt(mx.port(), "198.51.100.10").rcpt.startswith(b"451 ")


def test_ipv6_clients_are_keyed_on_their_64(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        assert attempt(mx.port(), "2001:db8:1:2::10").rcpt.startswith(b"451 ")
        time.sleep(DELAY + 0.2)
        assert attempt(mx.port(), "2001:db8:1:2:ffff::1").delivered
        assert attempt(mx.port(), "2001:db8:1:3::10").rcpt.startswith(b"451 ")


def test_the_triplet_includes_sender_and_recipient(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        ip = "198.51.100.20"
        assert attempt(mx.port(), ip).rcpt.startswith(b"451 ")
        time.sleep(DELAY + 0.2)
        assert attempt(mx.port(), ip).delivered
        assert attempt(mx.port(), ip, sender="carol@sender.example").rcpt.startswith(b"451 ")
        assert attempt(mx.port(), ip, recipient="dave@example.com").rcpt.startswith(b"451 ")


def test_per_message_return_paths_keep_their_greylist_entry(tmp_path: Path, certs: Certs) -> None:
    """BATV tags and VERP numbers change with every message; the retry must still match."""
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        ip = "198.51.100.30"
        assert attempt(mx.port(), ip, sender="prvs=0123abcd=news@sender.example").rcpt.startswith(
            b"451 "
        )
        time.sleep(DELAY + 0.2)
        assert attempt(mx.port(), ip, sender="prvs=9876fedc=news@sender.example").delivered
        assert attempt(mx.port(), ip, sender="bounce-123@lists.example").rcpt.startswith(b"451 ")
        time.sleep(DELAY + 0.2)
        assert attempt(mx.port(), ip, sender="bounce-456@lists.example").delivered


def test_a_network_with_accepted_mail_skips_greylisting(tmp_path: Path, certs: Certs) -> None:
    cfg = config(tmp_path, certs, 0, auto_pass_accepted=2)
    with RecordingUpstream() as up:
        cfg["upstream"]["port"] = up.port
        with Mx(tmp_path, cfg) as mx:
            ip = "203.0.113.40"
            for sender in ("one@sender.example", "two@sender.example"):
                assert attempt(mx.port(), ip, sender=sender).rcpt.startswith(b"451 ")
            time.sleep(DELAY + 0.2)
            for sender in ("one@sender.example", "two@sender.example"):
                assert attempt(mx.port(), ip, sender=sender).delivered
            # Two accepted messages: a new sender from that network is not greylisted.
            assert mx.log.wait_for("message", "status=sent", "from=<two@sender.example>")
            # The reputation write runs after the reply: a new sender from that network may be
            # greylisted until it has landed, then passes without waiting out the delay.
            for _ in range(20):
                if attempt(mx.port(), ip, sender="three@sender.example").delivered:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("a network with accepted mail was still greylisted")
            assert mx.log.wait_for("from=<three@sender.example>", "status=sent")
            assert len(up.messages) == 3


def test_a_client_with_a_steady_tls_history_skips_greylisting(tmp_path: Path, certs: Certs) -> None:
    tls = ssl.create_default_context(cafile=str(certs.ca_file))
    cfg = config(tmp_path, certs, 0, auto_pass_tls_sessions=3)
    with RecordingUpstream() as up:
        cfg["upstream"]["port"] = up.port
        with Mx(tmp_path, cfg) as mx:
            ip = "198.51.100.50"
            for n in range(2):
                sender = f"s{n}x@sender.example"
                assert attempt(mx.port(), ip, sender=sender, tls=tls).rcpt.startswith(b"451 ")
            # The third session with TLS, none without: a steady TLS sender.
            assert attempt(mx.port(), ip, sender="new@sender.example", tls=tls).delivered
            assert mx.log.wait_for("message", "status=sent", "from=<new@sender.example>")
            # Without TLS the same client is a stranger again ...
            assert attempt(mx.port(), ip, sender="other@sender.example").rcpt.startswith(b"451 ")
            # ... and having come once without TLS, its history is no longer steady.
            reply = attempt(mx.port(), ip, sender="next@sender.example", tls=tls).rcpt
            assert reply.startswith(b"451 ")


def test_clients_scoring_below_min_score_are_not_greylisted(tmp_path: Path, certs: Certs) -> None:
    cfg = config(tmp_path, certs, 0)
    cfg["policy"] = {"weights": {"HELO_NOT_FQDN": -1.0}}  # stands in for an allow list
    with RecordingUpstream() as up:
        cfg["upstream"]["port"] = up.port
        with Mx(tmp_path, cfg) as mx:
            assert attempt(mx.port(), "198.51.100.60", helo="trusted").delivered
            assert attempt(mx.port(), "198.51.100.61").rcpt.startswith(b"451 ")


def test_internal_clients_are_not_greylisted(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        assert attempt(mx.port(), "10.1.2.3").delivered
        assert attempt(mx.port(), "192.168.1.1").delivered


@pytest.mark.parametrize(
    ("on_error", "expected"), [("accept", b"250 "), ("tempfail", b"451 4.3.0")]
)
def test_an_unreachable_store_follows_on_error(
    tmp_path: Path, certs: Certs, on_error: str, expected: bytes
) -> None:
    from support.net import free_port

    cfg = config(tmp_path, certs, 0, on_error=on_error, timeout="300ms")
    cfg["state"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    cfg["rate_limits"] = {"enabled": False}
    cfg["pass_cache"] = {"enabled": False}
    with RecordingUpstream() as up:
        cfg["upstream"]["port"] = up.port
        with Mx(tmp_path, cfg) as mx:
            result = attempt(mx.port(), "198.51.100.70")
            assert result.rcpt.startswith(expected), result
            assert mx.log.wait_for("store", "status=error", "for=greylist", "errors=")
            if on_error == "accept":
                assert result.delivered
            else:
                assert up.messages == []
