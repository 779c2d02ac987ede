"""SMTP smuggling over a real socket: no end-of-data variant can slip a second message upstream.

CVE-2023-51764 (Postfix), -51765 (sendmail), -51766 (Exim), CVE-2024-27305 (aiosmtpd): a client
ends DATA with a non-standard sequence, then pipelines a forged envelope. A receiver that takes
the variant as the end sees two messages where the next hop sees one (or the reverse).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Certs, mx_config
from support.mx import Mx
from support.net import RawClient
from support.upstream import RecordingUpstream

ENDINGS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\0.\r\n",
    b"\r\n.\0\r\n",
]
SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\npay the invoice\r\n"
)


def open_transaction(port: int) -> RawClient:
    c = RawClient(port)
    c.reply()
    c.send(b"EHLO attacker.example\r\n")
    c.reply()
    c.send(b"MAIL FROM:<a@attacker.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert c.code() == 250 and c.code() == 250 and c.code() == 354
    return c


@pytest.mark.parametrize("ending", ENDINGS, ids=lambda e: repr(e)[2:-1])
def test_smuggling_ending_is_refused_and_nothing_reaches_the_upstream(
    tmp_path: Path, certs: Certs, ending: bytes
) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
        open_transaction(mx.port()) as c,
    ):
        c.send(b"Subject: hello\r\n\r\nfirst part" + ending + SMUGGLED + b"\r\n.\r\n")
        reply = c.reply()
        assert reply.startswith(b"550 5.5.2 Message contains a "), reply
        # Exactly one answer for the whole thing: the smuggled MAIL/RCPT/DATA were never commands.
        assert c.nothing_more() == b""
        # The session goes on normally afterwards.
        c.send(b"MAIL FROM:<a@attacker.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        assert [c.code(), c.code(), c.code()] == [250, 250, 354]
        c.send(b"Subject: honest\r\n\r\nclean\r\n.\r\n")
        assert c.reply().startswith(b"250 2.0.0 Message accepted")
        c.send(b"QUIT\r\n")
        assert c.code() == 221
    # Only the honest message arrived, and no smuggled byte was ever sent upstream.
    assert len(up.messages) == 1 and up.messages[0].rcpts == ["bob@example.com"]
    assert all(b"pay the invoice" not in raw and b"ceo@example.com" not in raw for raw in up.raw)
    assert mx.log.wait_for("status=rejected")


def test_bare_lf_inside_headers_is_refused(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
        open_transaction(mx.port()) as c,
    ):
        c.send(b"Subject: a\nX-Injected: yes\r\n\r\nbody\r\n.\r\n")
        assert c.reply().startswith(b"550 5.5.2 Message contains a bare LF")
    assert not up.messages


def test_bare_lf_ending_a_command_is_refused_not_executed(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
        RawClient(mx.port()) as c,
    ):
        c.reply()
        c.send(b"EHLO a.example\nMAIL FROM:<x@attacker.example>\r\n")
        assert c.reply().startswith(b"500 5.5.2 Bare LF")
        assert c.reply().startswith(b"503 5.5.1 Send EHLO or HELO first")
    assert up.connections == 0


def test_what_the_upstream_receives_is_crlf_only_and_one_message(
    tmp_path: Path, certs: Certs
) -> None:
    # A message full of lines that look like the end of data once unstuffed.
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.\r\n.MAIL FROM:<x@y>\r\nend\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
        open_transaction(mx.port()) as c,
    ):
        c.send(stuffed + b".\r\n")
        assert c.reply().startswith(b"250 ")
    raw = up.raw[0]
    assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
    assert raw.count(b"\r\n.\r\n") == 1  # one end of data on the upstream wire
    assert up.messages[0].data.endswith(stuffed)
