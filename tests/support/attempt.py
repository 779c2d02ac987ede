"""One delivery attempt from a given client address (through a trusted PROXY hop), as a sending
MTA makes it: the reply to RCPT, and the reply to the message when RCPT was accepted."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from support.net import RawClient


@dataclass
class Attempt:
    rcpt: bytes
    final: bytes = b""  # b"" when the message was not sent

    @property
    def delivered(self) -> bool:
        return self.final.startswith(b"250 ")


def attempt(
    port: int,
    client_ip: str,
    *,
    sender: str = "alice@sender.example",
    recipient: str = "bob@example.com",
    helo: str = "mail.sender.example",
    proxy: bool = True,
    tls: ssl.SSLContext | None = None,
) -> Attempt:
    """Connect (as `client_ip` if `proxy`), optionally STARTTLS, and try to send one message."""
    with RawClient(port) as c:
        if proxy:
            family = "TCP6" if ":" in client_ip else "TCP4"
            dest = "2001:db8::25" if family == "TCP6" else "192.0.2.25"
            c.send(f"PROXY {family} {client_ip} {dest} 40000 25\r\n".encode())
        banner = c.reply()
        if not banner.startswith(b"220 "):
            return Attempt(rcpt=banner)
        c.send(f"EHLO {helo}\r\n".encode())
        c.reply()
        if tls is not None:
            c.send(b"STARTTLS\r\n")
            assert c.code() == 220
            c.sock = tls.wrap_socket(c.sock, server_hostname="mx.test.example")
            c.send(f"EHLO {helo}\r\n".encode())
            c.reply()
        c.send(f"MAIL FROM:<{sender}>\r\n".encode())
        mail = c.reply()
        if not mail.startswith(b"250"):
            return Attempt(rcpt=mail)
        c.send(f"RCPT TO:<{recipient}>\r\n".encode())
        rcpt = c.reply()
        if not rcpt.startswith(b"250"):
            c.send(b"QUIT\r\n")
            return Attempt(rcpt=rcpt)
        c.send(b"DATA\r\n")
        assert c.code() == 354
        c.send(b"Subject: greylist test\r\n\r\nhello\r\n.\r\n")
        final = c.reply()
        c.send(b"QUIT\r\n")
        return Attempt(rcpt=rcpt, final=final)
