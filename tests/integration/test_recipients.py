"""Recipient checks over real sockets: the per-domain lists, live verification at the upstream,
and the cap on unknown recipients per session (directory-harvest defence)."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Certs, mx_config
from support.mx import Mx
from support.net import RawClient
from support.sink import SmtpSink
from support.upstream import Behaviour, RecordingUpstream

MESSAGE = b"Subject: recipients\r\n\r\nhello\r\n"
KNOWN = {"known": {"example.com": ["alice", "bob"]}}  # example.org has no list


def recipients_config(tmp_path: Path, certs: Certs, port: int, **recipients: Any) -> dict[str, Any]:
    return mx_config(tmp_path, certs, upstream_port=port, recipients=KNOWN | recipients)


def asked_upstream(up: RecordingUpstream) -> bytes:
    """Every command the upstream received, all connections together."""
    return b"".join(up.raw)


def open_transaction(c: RawClient) -> None:
    c.reply()
    c.send(b"EHLO client.sender.example\r\n")
    c.reply()
    c.send(b"MAIL FROM:<a@sender.example>\r\n")
    assert c.code() == 250


def rcpt(c: RawClient, address: str) -> bytes:
    c.send(f"RCPT TO:<{address}>\r\n".encode())
    return c.reply()


def closed_by_us(c: RawClient) -> bool:
    """The server closed the connection (EOF) with nothing more to say."""
    c.sock.settimeout(5)
    return c.buf == b"" and c.sock.recv(1) == b""


def test_known_recipient_is_relayed_and_unknown_never_reaches_the_upstream(
    tmp_path: Path, certs: Certs
) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, recipients_config(tmp_path, certs, up.port)) as mx,
        smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp,
    ):
        smtp.ehlo("client.sender.example")
        assert smtp.mail("a@sender.example")[0] == 250
        code, text = smtp.rcpt("carol@example.com")
        assert code == 550
        assert text.startswith(
            b"5.1.1 <carol@example.com>: Recipient address rejected: user unknown"
        )
        assert b"(id " in text
        assert smtp.rcpt("alice@example.com")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
        assert mx.log.wait_for(
            "reject",
            "stage=rcpt",
            "from=<a@sender.example>",
            "to=<carol@example.com>",
            'reason="not in recipients list"',
        )
    assert [m.rcpts for m in up.messages] == [["alice@example.com"]]
    assert b"carol" not in asked_upstream(up)


def test_sub_addresses_case_and_postmaster_are_known(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, recipients_config(tmp_path, certs, up.port)) as mx,
        smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp,
    ):
        smtp.ehlo("client.sender.example")
        smtp.mail("a@sender.example")
        for address in (
            "alice+newsletter@example.com",
            "ALICE@Example.COM",
            "Bob+x+y@example.com",
            "postmaster@example.com",  # never listed, always there (RFC 5321 4.5.1)
            "postmaster",
        ):
            code, text = smtp.rcpt(address)
            assert code == 250, (address, text)
        assert smtp.rcpt("carol+alice@example.com")[0] == 550  # the tag does not make it known
        assert smtp.data(MESSAGE)[0] == 250
    # Relayed as the client wrote them (the domain in lower case, as parsed): the upstream
    # does its own sub-address handling.
    assert up.messages[0].rcpts == [
        "alice+newsletter@example.com",
        "ALICE@example.com",
        "Bob+x+y@example.com",
        "postmaster@example.com",
        "postmaster",
    ]


def test_sub_addressing_off_refuses_tagged_addresses(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, recipients_config(tmp_path, certs, up.port, delimiter="")) as mx,
        smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp,
    ):
        smtp.ehlo("client.sender.example")
        smtp.mail("a@sender.example")
        assert smtp.rcpt("alice+newsletter@example.com")[0] == 550
        assert smtp.rcpt("alice@example.com")[0] == 250
    assert b"newsletter" not in asked_upstream(up)


def test_unlisted_domain_is_verified_live_at_the_upstream(tmp_path: Path, certs: Certs) -> None:
    behaviour = Behaviour(rcpt_replies={"nobody@example.org": b"550 5.1.1 No such user here"})
    with (
        RecordingUpstream(behaviour=behaviour) as up,
        Mx(tmp_path, recipients_config(tmp_path, certs, up.port)) as mx,
        smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp,
    ):
        smtp.ehlo("client.sender.example")
        smtp.mail("a@sender.example")
        code, text = smtp.rcpt("nobody@example.org")
        assert code == 550 and text.startswith(b"5.1.1 No such user here (id ")
        assert smtp.rcpt("anyone@example.org")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
        assert mx.log.wait_for(
            "reject", "stage=rcpt", "to=<nobody@example.org>", 'reason="unknown at upstream"'
        )
    assert b"RCPT TO:<nobody@example.org>" in asked_upstream(up)
    assert up.messages[0].rcpts == ["anyone@example.org"]


def test_harvest_cap_counts_ours_and_the_upstreams_and_closes(tmp_path: Path, certs: Certs) -> None:
    behaviour = Behaviour(
        rcpt_replies={
            "gone@example.org": b"550 5.1.1 No such user",
            "old@example.org": b"551 User not local",  # no enhanced code: 551 counts
            "blocked@example.org": b"550 5.7.1 Policy refusal",  # not "unknown": not counted
        }
    )
    with (
        RecordingUpstream(behaviour=behaviour) as up,
        Mx(tmp_path, recipients_config(tmp_path, certs, up.port, max_unknown=3)) as mx,
        RawClient(mx.port()) as c,
    ):
        open_transaction(c)
        assert rcpt(c, "carol@example.com").startswith(b"550 5.1.1 ")  # ours: 1
        assert rcpt(c, "gone@example.org").startswith(b"550 5.1.1 ")  # the upstream's: 2
        assert rcpt(c, "blocked@example.org").startswith(b"550 5.7.1 ")  # not counted
        assert rcpt(c, "alice@example.com").startswith(b"250 ")
        c.send(b"RSET\r\n")  # the count is per session, not per transaction
        assert c.code() == 250
        c.send(b"MAIL FROM:<a@sender.example>\r\n")
        assert c.code() == 250
        assert rcpt(c, "old@example.org").startswith(b"551 ")  # 3: still answered
        reply = rcpt(c, "dave@example.com")  # 4: past the cap
        assert reply.startswith(b"421 4.7.0 Too many unknown recipients, closing connection (id ")
        assert closed_by_us(c)
        assert mx.log.wait_for(
            "defer",
            "stage=rcpt",
            "to=<dave@example.com>",
            "too many unknown recipients (4)",
            'reply="421 4.7.0 ',
        )
        assert mx.log.wait_for("disconnect", 'reason="too many unknown recipients"')
    assert up.messages == []  # the open transaction was abandoned, never delivered
    assert b"dave" not in asked_upstream(up)


def test_cap_past_upstream_refusal_answers_421(tmp_path: Path, certs: Certs) -> None:
    behaviour = Behaviour(rcpt_replies={"gone@example.org": b"550 5.1.1 No such user"})
    with (
        RecordingUpstream(behaviour=behaviour) as up,
        Mx(tmp_path, recipients_config(tmp_path, certs, up.port, max_unknown=1)) as mx,
        RawClient(mx.port()) as c,
    ):
        open_transaction(c)
        assert rcpt(c, "carol@example.com").startswith(b"550 5.1.1 ")
        # The upstream refuses this one too; being the one past the cap, it gets our 421.
        assert rcpt(c, "gone@example.org").startswith(b"421 4.7.0 ")
        assert closed_by_us(c)
        assert mx.log.wait_for("defer", "to=<gone@example.org>", "unknown at upstream")
    assert b"RCPT TO:<gone@example.org>" in asked_upstream(up)


def test_max_unknown_zero_is_no_cap(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, recipients_config(tmp_path, certs, up.port, max_unknown=0)) as mx,
        RawClient(mx.port()) as c,
    ):
        open_transaction(c)
        for n in range(30):
            assert rcpt(c, f"guess{n}@example.com").startswith(b"550 5.1.1 ")
        assert rcpt(c, "bob@example.com").startswith(b"250 ")
    assert up.connections == 1


def test_real_mta_refusal_that_is_not_unknown_user_is_not_counted(
    tmp_path: Path, certs: Certs
) -> None:
    # Postfix's smtp-sink refuses every RCPT with "500 5.3.0 Error: command failed".
    with (
        SmtpSink(["-f", "rcpt"]) as sink,
        Mx(tmp_path, recipients_config(tmp_path, certs, sink.port, max_unknown=1)) as mx,
        RawClient(mx.port()) as c,
    ):
        open_transaction(c)
        for n in range(4):
            assert rcpt(c, f"user{n}@example.org").startswith(b"500 5.3.0 ")
        c.send(b"NOOP\r\n")
        assert c.code() == 250  # the session goes on


def test_address_file_is_read_at_start_and_on_reload(tmp_path: Path, certs: Certs) -> None:
    users = tmp_path / "users.txt"
    users.write_text("# staff\nalice@example.com\n")
    recipients = {"known": {}, "files": ["users.txt"]}  # relative to the config file
    with (
        RecordingUpstream() as up,
        Mx(
            tmp_path, mx_config(tmp_path, certs, upstream_port=up.port, recipients=recipients)
        ) as mx,
    ):
        with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp.ehlo("client.sender.example")
            smtp.mail("a@sender.example")
            assert smtp.rcpt("alice@example.com")[0] == 250
            assert smtp.rcpt("carol@example.com")[0] == 550
        users.write_text("alice@example.com\ncarol@example.com\n")
        mx.reload()
        assert mx.log.wait_for("reload", "status=ok")
        with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp.ehlo("client.sender.example")
            smtp.mail("a@sender.example")
            assert smtp.rcpt("carol@example.com")[0] == 250
        users.unlink()  # a reload that cannot read the file keeps the old lists
        mx.reload()
        assert mx.log.wait_for("reload", "status=refused", "recipients.files.0: ")
        with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp.ehlo("client.sender.example")
            smtp.mail("a@sender.example")
            assert smtp.rcpt("carol@example.com")[0] == 250
            assert smtp.rcpt("dave@example.com")[0] == 550


@pytest.mark.parametrize(
    ("recipients", "expected"),
    [
        ({"known": {"example.net": ["a"]}}, "recipients.known.example.net: is not one of domains"),
        ({"known": {"example.com": ["a b"]}}, "recipients.known.example.com.0: "),
        ({"delimiter": "@"}, "recipients.delimiter: "),
        ({"max_unknown": -1}, "recipients.max_unknown: must be at least 0"),
        ({"files": ["missing.txt"]}, "recipients.files.0: "),
    ],
)
def test_check_config_names_the_recipients_key(
    tmp_path: Path, certs: Certs, recipients: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(mx_config(tmp_path, certs, upstream_port=2526, recipients=recipients))
    )
    for command in ("check-config", "run"):
        out = subprocess.run(
            [sys.executable, "-m", "spamkiller", command, "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1, (command, out.stderr)
        assert expected in out.stderr, (command, out.stderr)
        assert "Traceback" not in out.stderr + out.stdout
