"""The greet delay: a client that talks before our banner is scored PREGREET, over a real socket."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Certs, mx_config
from support.mx import Mx
from support.net import RawClient, free_port
from support.upstream import RecordingUpstream

LISTENERS = [
    {"name": "mx", "address": "127.0.0.1", "port": 0, "tls": "starttls", "greet_delay": 0.5}
]
POLICY = {"thresholds": {"tag": 1.0, "reject": 5.0}}
ENVELOPE = b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<bob@example.com>\r\n"


def config(tmp_path: Path, certs: Certs, port: int) -> dict[str, object]:
    listeners = [LISTENERS[0] | {"port": free_port()}]
    return mx_config(tmp_path, certs, upstream_port=port, listeners=listeners, policy=POLICY)


def test_talking_before_the_banner_is_scored_and_rejected(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        with RawClient(mx.port()) as c:
            started = time.monotonic()
            c.send(b"EHLO impatient.example\r\n" + ENVELOPE)  # no wait for the 220
            assert c.reply().startswith(b"220 ")
            assert time.monotonic() - started >= 0.45  # the banner waited out the delay
            assert c.reply().startswith(b"250")  # EHLO still answered: scored, not refused
            assert c.code() == 250
            assert c.reply().startswith(b"550 5.7.1 Rejected by policy")
        assert mx.log.wait_for("reject", "rules=PREGREET(5)")
    assert up.connections == 0


def test_a_client_that_waits_for_the_banner_is_not_scored(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, up.port)) as mx:
        with RawClient(mx.port()) as c:
            assert c.reply().startswith(b"220 ")
            c.send(b"EHLO polite.example\r\n")
            c.reply()
            c.send(ENVELOPE)
            assert c.code() == 250 and c.code() == 250
        assert mx.log.wait_for(": disconnect ")
        assert not mx.log.find("PREGREET")
