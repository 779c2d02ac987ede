"""PROXY protocol on a listener over real sockets: the real client address drives everything."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from conftest import Certs, mx_config
from support.mx import Mx
from support.net import RawClient, free_port
from support.proxy import proxied_listener
from support.upstream import RecordingUpstream


def test_real_client_address_is_logged_and_put_in_received(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up:
        config = mx_config(tmp_path, certs, upstream_port=up.port, listeners=proxied_listener())
        with Mx(tmp_path, config) as mx, RawClient(mx.port()) as c:
            c.send(b"PROXY TCP4 203.0.113.7 192.0.2.25 51234 25\r\n")
            assert c.reply().startswith(b"220 ")
            c.send(b"EHLO mail.sender.example\r\nMAIL FROM:<a@sender.example>\r\n")
            c.reply()
            assert c.code() == 250
            c.send(b"RCPT TO:<bob@example.com>\r\nDATA\r\n")
            assert c.code() == 250 and c.code() == 354
            c.send(b"Subject: proxied\r\n\r\nhi\r\n.\r\n")
            assert c.reply().startswith(b"250 ")
            assert mx.log.wait_for("connect", "client=[203.0.113.7]:51234", "proxy=127.0.0.1:")
    header = up.messages[0].data.split(b"\r\nSubject")[0].decode()
    assert header.startswith("Received: from mail.sender.example (unknown [203.0.113.7])")


def test_helo_literal_is_judged_against_the_real_address(tmp_path: Path, certs: Certs) -> None:
    policy = {"thresholds": {"tag": 1.0, "reject": 3.0}}
    with RecordingUpstream() as up:
        config = mx_config(
            tmp_path, certs, upstream_port=up.port, listeners=proxied_listener(), policy=policy
        )
        with Mx(tmp_path, config) as mx, RawClient(mx.port()) as c:
            c.send(b"PROXY TCP4 203.0.113.7 192.0.2.25 51234 25\r\n")
            c.reply()
            c.send(b"EHLO [127.0.0.1]\r\n")  # the proxy's address, not the client's
            c.reply()
            c.send(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<bob@example.com>\r\n")
            assert c.code() == 250
            assert c.reply().startswith(b"550 5.7.1 Rejected by policy")
            assert mx.log.wait_for("reject", "rules=HELO_LITERAL_MISMATCH(3)")
    assert up.connections == 0


def test_untrusted_proxy_and_bad_headers_are_refused(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(tmp_path, certs, upstream_port=free_port(), listeners=proxied_listener())
    with Mx(tmp_path, config) as mx:
        port = mx.port()
        # From 127.0.0.2, which is not a trusted proxy: closed before any banner.
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        s.settimeout(5)
        s.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.25 51234 25\r\n")
        with contextlib.suppress(ConnectionResetError):  # our close may meet its unread bytes
            assert s.recv(100) == b""
        s.close()
        assert mx.log.wait_for("refused", "client=[127.0.0.2]", "untrusted proxy")
        # A trusted peer that sends SMTP instead of a header: closed, never greeted.
        with RawClient(port) as c:
            c.send(b"EHLO sneaky.example\r\n")
            assert c.nothing_more(1.0) == b""
        assert mx.log.wait_for("bad PROXY header")


def test_per_ip_cap_counts_the_real_clients(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(
        tmp_path,
        certs,
        upstream_port=free_port(),
        listeners=proxied_listener(),
        limits={"max_connections_per_ip": 2, "max_connections": 10},
    )
    with Mx(tmp_path, config) as mx:
        clients: list[RawClient] = []
        greetings: list[bytes] = []
        for source in ("203.0.113.7", "203.0.113.7", "203.0.113.7", "198.51.100.1"):
            c = RawClient(mx.port())
            clients.append(c)
            c.send(f"PROXY TCP4 {source} 192.0.2.25 40000 25\r\n".encode())
            greetings.append(c.reply()[:9])
        # All four come from the proxy's 127.0.0.1; the cap counts the addresses behind it.
        assert greetings == [b"220 mx.te", b"220 mx.te", b"421 4.7.0", b"220 mx.te"]
        for c in clients:
            c.close()


def test_shutdown_answers_a_connection_still_waiting_for_its_header(
    tmp_path: Path, certs: Certs
) -> None:
    """A connection the proxy opened but has not announced yet is turned away at once when the
    server stops, not left to its header timeout."""
    config = mx_config(
        tmp_path,
        certs,
        upstream_port=free_port(),
        listeners=proxied_listener(),
        shutdown_timeout="10s",
    )
    with Mx(tmp_path, config) as mx, RawClient(mx.port()) as waiting:
        assert waiting.nothing_more(0.2) == b""  # no header sent: nothing said yet
        assert mx.worker is not None
        mx.call(mx.worker.stop)
        assert waiting.reply().startswith(b"421 4.3.2 ")
        assert mx.log.wait_for("disconnect", 'reason="shutdown before the PROXY header"')
