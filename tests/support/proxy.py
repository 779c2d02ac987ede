"""Clients that arrive through a trusted PROXY-protocol hop, so checks see a public address."""

from __future__ import annotations

from typing import Any

from support.net import RawClient, free_port


def proxied_listener(**extra: Any) -> list[dict[str, Any]]:
    """One STARTTLS listener that expects a PROXY header from 127.0.0.1."""
    base = {
        "name": "mx",
        "address": "127.0.0.1",
        "port": free_port(),
        "tls": "starttls",
        "proxy_protocol": True,
        "trusted_proxies": ["127.0.0.1"],
    }
    return [base | extra]


def proxied_envelope(
    port: int,
    client_ip: str,
    *,
    helo: str = "mail.sender.example",
    sender: str = "a@sender.example",
) -> tuple[RawClient, bytes]:
    """Connect as `client_ip`, EHLO, MAIL and RCPT to bob@example.com: the open client and the
    reply to RCPT (the caller closes the client)."""
    c = RawClient(port)
    c.send(f"PROXY TCP4 {client_ip} 192.0.2.25 40000 25\r\n".encode())
    assert c.reply().startswith(b"220 ")
    c.send(f"EHLO {helo}\r\n".encode())
    c.reply()
    c.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<bob@example.com>\r\n".encode())
    assert c.code() == 250
    return c, c.reply()
