"""FCrDNS over real sockets: PTR and A records on a real unbound, clients announced by PROXY."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Certs, mx_config
from support.dns_server import DnsServer
from support.mx import Mx
from support.proxy import proxied_envelope, proxied_listener
from support.upstream import RecordingUpstream


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    server = DnsServer(tmp_path_factory.mktemp("unbound"))
    server.ptr("203.0.113.7", "mail.sender.test")
    server.add("mail.sender.test", "A", "203.0.113.7")
    server.ptr("203.0.113.9", "liar.sender.test")
    server.add("liar.sender.test", "A", "198.51.100.1")
    server.zone("113.0.203.in-addr.arpa.")  # 203.0.113.8 has no PTR: NXDOMAIN
    with server:
        yield server


def config(tmp_path: Path, certs: Certs, dns: DnsServer, port: int) -> dict[str, Any]:
    listeners = proxied_listener()
    return mx_config(
        tmp_path,
        certs,
        upstream_port=port,
        listeners=listeners,
        checks={"fcrdns": {"enabled": True}},
        dns={"nameservers": [dns.address], "timeout": "1s"},
        policy={"thresholds": {"tag": 1.0, "reject": 2.0}},
    )


def deliver(port: int, client_ip: str) -> bytes:
    """A transaction as `client_ip`; the reply to RCPT (or to the message, when accepted)."""
    c, reply = proxied_envelope(port, client_ip, helo="mail.sender.test", sender="a@sender.test")
    with c:
        if not reply.startswith(b"250"):
            return reply
        c.send(b"DATA\r\n")
        assert c.code() == 354
        c.send(b"Subject: fcrdns\r\n\r\nhi\r\n.\r\n")
        return c.reply()


def test_confirmed_name_goes_into_received(tmp_path: Path, certs: Certs, dns: DnsServer) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, dns, up.port)) as mx:
        assert deliver(mx.port(), "203.0.113.7").startswith(b"250 2.0.0 Message accepted")
    header = up.messages[0].data.split(b"\r\nSubject")[0].decode()
    assert header.startswith("Received: from mail.sender.test (mail.sender.test [203.0.113.7])")


def test_missing_and_mismatched_reverse_names_are_scored(
    tmp_path: Path, certs: Certs, dns: DnsServer
) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, dns, up.port)) as mx:
        assert deliver(mx.port(), "203.0.113.8").startswith(b"550 5.7.1 Rejected by policy")
        assert mx.log.wait_for("reject", "rules=RDNS_NONE(2)")
        reply = deliver(mx.port(), "203.0.113.9")  # 1.5: tagged, not rejected
        assert reply.startswith(b"250 2.0.0 Message accepted")
        assert mx.log.wait_for("status=sent", "rules=FCRDNS_MISMATCH(1.5)")
    header = up.messages[0].data.split(b"\r\nSubject")[0].decode()
    assert "(unknown [203.0.113.9])" in header
