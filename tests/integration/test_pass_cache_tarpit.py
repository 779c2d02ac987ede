"""The pass cache (clients that passed the connect-stage tests skip them for a while) and the
tarpit (badly scoring clients get slow replies), over real sockets with PROXY-announced clients."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import Certs, mx_config
from support.attempt import attempt
from support.mx import Mx
from support.net import RawClient
from support.proxy import proxied_listener
from support.upstream import RecordingUpstream

ENVELOPE = b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<bob@example.com>\r\n"


def config(tmp_path: Path, certs: Certs, port: int, **extra: Any) -> dict[str, Any]:
    return mx_config(
        tmp_path,
        certs,
        upstream_port=port,
        listeners=proxied_listener(greet_delay=0.5),
        policy={"thresholds": {"tag": 1.0, "reject": 5.0}},  # PREGREET alone rejects
        **extra,
    )


def impatient(port: int, ip: str) -> bytes:
    """Talk before the banner (what the greet delay catches); the reply to RCPT."""
    with RawClient(port) as c:
        c.send(f"PROXY TCP4 {ip} 192.0.2.25 40000 25\r\n".encode())
        c.send(b"EHLO mail.sender.example\r\n" + ENVELOPE)
        assert c.reply().startswith(b"220 ")
        c.reply()
        assert c.code() == 250
        return c.reply()


def test_a_client_that_passed_skips_the_greet_test_until_the_ttl_runs_out(
    tmp_path: Path, certs: Certs
) -> None:
    cfg = config(tmp_path, certs, 0, pass_cache={"ttl": "2s"})
    with RecordingUpstream() as up:
        cfg["upstream"]["port"] = up.port
        with Mx(tmp_path, cfg) as mx:
            assert attempt(mx.port(), "198.51.100.5").delivered  # waits for the banner: passes
            assert mx.log.wait_for("disconnect", "pass_cache=stored")
            # Cached (the write runs beside the session, so allow it a moment): no greet delay,
            # so talking first is not caught.
            for _ in range(20):
                if impatient(mx.port(), "198.51.100.5").startswith(b"250 "):
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the client that passed was not in the pass cache")
            assert mx.log.wait_for("disconnect", "pass_cache=hit")
            # A client that never passed is caught as usual.
            assert impatient(mx.port(), "198.51.100.6").startswith(b"550 5.7.1")
            time.sleep(2.2)  # past the TTL the tests run again
            assert impatient(mx.port(), "198.51.100.5").startswith(b"550 5.7.1")


def test_a_client_with_findings_is_not_cached(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        assert impatient(mx.port(), "198.51.100.7").startswith(b"550 ")
        assert attempt(mx.port(), "198.51.100.7").delivered  # polite this time: checked again
        assert mx.log.wait_for("disconnect", "pass_cache=stored")
        assert not mx.log.find("pass_cache=hit")
        assert len(mx.log.find("pass_cache=stored")) == 1  # only after the polite session


def test_pass_cache_off(tmp_path: Path, certs: Certs) -> None:
    cfg = config(tmp_path, certs, 0, pass_cache={"enabled": False})
    with RecordingUpstream() as up:
        cfg["upstream"]["port"] = up.port
        with Mx(tmp_path, cfg) as mx:
            assert attempt(mx.port(), "198.51.100.8").delivered
            assert impatient(mx.port(), "198.51.100.8").startswith(b"550 ")
            assert len(mx.log.wait_for(": disconnect ", count=2)) == 2
            assert not mx.log.find("pass_cache=")


def tarpit_config(tmp_path: Path, certs: Certs, port: int) -> dict[str, Any]:
    return mx_config(
        tmp_path,
        certs,
        upstream_port=port,
        tarpit={"enabled": True, "min_score": 1.0, "delay": "1s"},
    )


def test_a_client_that_scores_badly_gets_slow_replies(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, tarpit_config(tmp_path, certs, up.port)) as mx:
        with RawClient(mx.port()) as c:
            assert c.reply().startswith(b"220 ")
            c.send(b"EHLO nodots\r\n")  # HELO_NOT_FQDN: 1 point, scored at RCPT
            c.reply()
            c.send(ENVELOPE)
            assert c.code() == 250
            assert c.nothing_more(0.6) == b""  # the RCPT reply is held back ...
            assert c.reply().startswith(b"250 ")  # ... then given: slowed, not refused
            c.send(b"NOOP\r\n")
            assert c.nothing_more(0.6) == b""  # and so is every reply after it
            assert c.code() == 250
        assert mx.log.wait_for("disconnect", "tarpit=1s")


def test_a_clean_client_is_not_tarpitted(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, tarpit_config(tmp_path, certs, up.port)) as mx:
        assert attempt(mx.port(), "127.0.0.1", proxy=False).delivered
        assert mx.log.wait_for("disconnect", "reason=")
        assert not mx.log.find("tarpit=")


def test_a_client_caught_before_the_banner_gets_a_slow_banner(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(
        tmp_path,
        certs,
        upstream_port=0,
        listeners=proxied_listener(greet_delay=0.3),
        policy={"thresholds": {"tag": 1.0, "reject": 50.0}},  # scored, not refused
        tarpit={"enabled": True, "min_score": 5.0, "delay": "1s"},
    )
    with RecordingUpstream() as up:
        config["upstream"]["port"] = up.port
        with Mx(tmp_path, config) as mx, RawClient(mx.port()) as c:
            started = time.monotonic()
            c.send(b"PROXY TCP4 198.51.100.77 192.0.2.25 40000 25\r\nEHLO early.example\r\n")
            assert c.reply().startswith(b"220 ")
            # The greet delay, then the tarpit's delay on top: PREGREET scored 5.
            assert time.monotonic() - started >= 1.25
            assert c.nothing_more(0.6) == b""  # the EHLO reply waits too
            assert c.reply().startswith(b"250")
        assert mx.log.wait_for("disconnect", "tarpit=1s")
