"""Shared rate limits and concurrency caps end to end: real sockets, clients announced through a
trusted PROXY hop, counts in the SQLite store of the test's data directory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from conftest import NO_RATE_LIMITS, Certs, mx_config
from support.attempt import attempt
from support.mx import Mx
from support.net import RawClient
from support.proxy import proxied_listener
from support.upstream import RecordingUpstream


def config(tmp_path: Path, certs: Certs, port: int, **limits: Any) -> dict[str, Any]:
    return mx_config(
        tmp_path,
        certs,
        upstream_port=port,
        listeners=proxied_listener(),
        rate_limits=NO_RATE_LIMITS | limits,
    )


def connect(port: int, ip: str) -> tuple[RawClient, bytes]:
    c = RawClient(port)
    c.send(f"PROXY TCP4 {ip} 192.0.2.25 40000 25\r\n".encode())
    return c, c.reply()


def test_connection_rate_per_address(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, config(tmp_path, certs, up.port, connections_per_ip="3/1m")) as mx,
    ):
        for _ in range(3):
            c, banner = connect(mx.port(), "198.51.100.1")
            assert banner.startswith(b"220 ")
            c.close()
        c, banner = connect(mx.port(), "198.51.100.1")
        assert banner.startswith(b"421 4.7.0 Too many connections from your address, try again in ")
        wait = re.search(rb"try again in (\d+) seconds", banner)
        assert wait and 1 <= int(wait.group(1)) <= 60
        assert c.nothing_more() == b""  # and the connection is closed
        c.close()
        assert mx.log.wait_for("refused", "limit=connections_per_ip=3/1m")
        # Another address of the same network has its own count.
        c, banner = connect(mx.port(), "198.51.100.2")
        assert banner.startswith(b"220 ")
        c.close()


def test_connection_rate_per_network(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, config(tmp_path, certs, up.port, connections_per_network="2/1m")) as mx,
    ):
        for ip in ("203.0.113.1", "203.0.113.2"):
            c, banner = connect(mx.port(), ip)
            assert banner.startswith(b"220 ")
            c.close()
        c, banner = connect(mx.port(), "203.0.113.3")
        assert banner.startswith(b"421 4.7.0 Too many connections from your network")
        c.close()
        c, banner = connect(mx.port(), "198.51.100.3")  # another /24
        assert banner.startswith(b"220 ")
        c.close()


def test_concurrent_sessions_per_address_are_capped_and_given_back(
    tmp_path: Path, certs: Certs
) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, config(tmp_path, certs, up.port, concurrent_per_ip=2)) as mx,
    ):
        held = [connect(mx.port(), "198.51.100.9") for _ in range(2)]
        assert all(banner.startswith(b"220 ") for _, banner in held)
        c, banner = connect(mx.port(), "198.51.100.9")
        assert banner.startswith(b"421 4.7.0 Too many sessions from your address")
        c.close()
        assert mx.log.wait_for("refused", "limit=concurrent_per_ip=2")
        first, _ = held.pop()
        first.send(b"QUIT\r\n")
        assert first.code() == 221
        first.close()
        assert mx.log.wait_for("disconnect", "reason=quit")
        # The slot comes back once the session ended (released right after the disconnect).
        for _ in range(50):
            c, banner = connect(mx.port(), "198.51.100.9")
            c.close()
            if banner.startswith(b"220 "):
                break
        assert banner.startswith(b"220 ")
        for client, _ in held:
            client.close()


def test_message_rate_per_address_answers_451_at_mail(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, config(tmp_path, certs, up.port, messages_per_ip="2/1h")) as mx,
    ):
        ip = "198.51.100.20"
        assert attempt(mx.port(), ip).delivered
        assert attempt(mx.port(), ip).delivered
        third = attempt(mx.port(), ip)
        assert third.rcpt.startswith(b"451 4.7.1 Too many messages from your address, try again")
        assert len(up.messages) == 2
        assert mx.log.wait_for("defer", "stage=mail", "limit=messages_per_ip=2/1h")


def test_internal_clients_are_exempt(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, config(tmp_path, certs, up.port, connections_per_ip="1/1m")) as mx,
    ):
        for _ in range(3):
            c, banner = connect(mx.port(), "10.0.0.5")
            assert banner.startswith(b"220 ")
            c.close()


def test_an_unreachable_store_follows_on_error(tmp_path: Path, certs: Certs) -> None:
    from support.net import free_port

    cfg = config(tmp_path, certs, 0, connections_per_ip="100/1m", on_error="tempfail")
    cfg["state"] = f"redis://127.0.0.1:{free_port()}/0"
    cfg["pass_cache"] = {"enabled": False}
    cfg["state_timeout"] = "300ms"
    cfg["rate_limits"]["timeout"] = "300ms"
    with RecordingUpstream() as up:
        cfg["upstream"]["port"] = up.port
        with Mx(tmp_path, cfg) as mx:
            c, banner = connect(mx.port(), "198.51.100.30")
            assert banner.startswith(b"421 4.3.0 Temporary system problem")
            c.close()
            assert mx.log.wait_for("store", "status=error", "for=rate_limits", "errors=1")
            # The MX keeps answering: an exempt client is served without the store.
            c, banner = connect(mx.port(), "10.0.0.1")
            assert banner.startswith(b"220 ")
            c.close()


def test_an_ipv4_mapped_address_is_the_same_client(tmp_path: Path, certs: Certs) -> None:
    """A dual-stack proxy may announce ::ffff:198.51.100.44; it is 198.51.100.44 for every
    count, check and log line."""
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, config(tmp_path, certs, up.port, connections_per_ip="1/1m")) as mx,
    ):
        c, banner = connect(mx.port(), "198.51.100.44")
        assert banner.startswith(b"220 ")
        c.close()
        with RawClient(mx.port()) as c6:
            c6.send(b"PROXY TCP6 ::ffff:198.51.100.44 2001:db8::25 40000 25\r\n")
            assert c6.reply().startswith(b"421 4.7.0 Too many connections from your address")
        assert mx.log.wait_for("refused", "client=[198.51.100.44]")
