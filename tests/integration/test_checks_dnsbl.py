"""DNSBL over real sockets: a real DNS server (unbound) and PROXY-announced public clients."""

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
    server.zone("bl.example.")
    server.zone("wl.example.")
    server.add("66.113.0.203.bl.example", "A", "127.0.0.2")
    server.add("77.113.0.203.wl.example", "A", "127.0.0.2")
    server.add("77.113.0.203.bl.example", "A", "127.0.0.2")
    server.servfail_zone("down.example.")
    with server:
        yield server


def config(tmp_path: Path, certs: Certs, dns: DnsServer, port: int, **dnsbl: Any) -> dict[str, Any]:
    listeners = proxied_listener()
    checks = {
        "dnsbl": {
            "zones": [
                {"zone": "bl.example", "weight": 10.0},
                {"zone": "wl.example", "weight": -6.0},
            ]
        }
        | dnsbl
    }
    return mx_config(
        tmp_path,
        certs,
        upstream_port=port,
        listeners=listeners,
        checks=checks,
        dns={"nameservers": [dns.address], "timeout": "1s"},
        policy={"thresholds": {"tag": 3.0, "reject": 8.0}},
    )


def transaction(port: int, client_ip: str) -> bytes:
    """Connect through the 'proxy' as `client_ip`; the reply to RCPT."""
    client, reply = proxied_envelope(port, client_ip)
    client.close()
    return reply


def test_listed_client_is_rejected_at_rcpt(tmp_path: Path, certs: Certs, dns: DnsServer) -> None:
    with RecordingUpstream() as up, Mx(tmp_path, config(tmp_path, certs, dns, up.port)) as mx:
        reply = transaction(mx.port(), "203.0.113.66")
        assert reply.startswith(b"550 5.7.1 Rejected by policy")
        assert mx.log.wait_for("reject", "rules=DNSBL_LISTED(10)")
        # Listed on both: the allow list's -6 keeps it under the reject threshold.
        assert transaction(mx.port(), "203.0.113.77").startswith(b"250 ")
        # Not listed anywhere.
        assert transaction(mx.port(), "203.0.113.88").startswith(b"250 ")
    assert up.connections >= 1


def test_dns_failure_follows_on_error(tmp_path: Path, certs: Certs, dns: DnsServer) -> None:
    zones = {"zones": [{"zone": "down.example", "weight": 10.0}]}
    with RecordingUpstream() as up:
        accept = config(tmp_path, certs, dns, up.port, **zones)
        with Mx(tmp_path, accept) as mx:
            assert transaction(mx.port(), "203.0.113.66").startswith(b"250 ")
            assert mx.log.wait_for(": disconnect ")
            assert not mx.log.find("reject")  # scored 0 by default: the failure passes as unlisted
        (tmp_path / "b").mkdir()
        tempfail = config(tmp_path / "b", certs, dns, up.port, on_error="tempfail", **zones)
        with Mx(tmp_path / "b", tempfail) as mx:
            reply = transaction(mx.port(), "203.0.113.66")
            assert reply.startswith(b"451 4.7.1 ")
            assert mx.log.wait_for("defer", "stage=rcpt", 'reason="dnsbl: error"')
