"""Before-queue relay over real sockets: what the upstream receives, and what the client is told.

The promise under test: the client gets 250 after end of data only when the upstream said 250;
the upstream's refusals become ours at the same stage; every upstream failure is a 4xx.
"""

from __future__ import annotations

import datetime as dt
import smtplib
import ssl
from pathlib import Path

import pytest
import trustme

from conftest import Certs, _write, mx_config
from support.mx import Mx
from support.net import RawClient, free_port
from support.sink import SmtpSink
from support.upstream import Behaviour, RecordingUpstream

MESSAGE = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: relay test\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"\r\n"
    b"Bye.\r\n"
)


def client_tls(certs: Certs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    ctx.check_hostname = False
    return ctx


def send(
    port: int,
    certs: Certs,
    rcpts: list[str],
    msg: bytes = MESSAGE,
    *,
    tls: bool = True,
    sender: str = "alice@sender.example",
) -> tuple[int, bytes]:
    """One transaction with smtplib; the (code, text) of the end-of-data reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.sender.example")
        if tls:
            smtp.starttls(context=client_tls(certs))
            smtp.ehlo("client.sender.example")
        smtp.mail(sender)
        for r in rcpts:
            code, text = smtp.rcpt(r)
            assert code == 250, (r, code, text)
        return smtp.data(msg)


def test_message_arrives_byte_exact_with_our_received_header(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        code, text = send(mx.port(), certs, ["bob@example.com"])
        assert code == 250 and b"Message accepted" in text
        assert len(up.messages) == 1
        got = up.messages[0]
        assert got.mail_from == "alice@sender.example" and got.rcpts == ["bob@example.com"]
        header, _, rest = got.data.partition(b"\r\nFrom: Alice")
        # Exactly the client's message after our header, still dot-stuffed on the wire.
        stuffed = MESSAGE.replace(b"\r\n.", b"\r\n..")
        assert b"From: Alice" + rest == stuffed
        text_header = header.decode()
        assert text_header.startswith("Received: from client.sender.example (unknown [127.0.0.1])")
        assert "(using TLSv1.3 with cipher TLS_" in text_header
        assert "by mx.test.example (Spam Killer) with ESMTPS id " in text_header
        assert "for <bob@example.com>;" in text_header
        # One header: every line after the first is a continuation (starts with TAB).
        assert all(line.startswith("\t") for line in text_header.split("\r\n")[1:])
        assert mx.log.wait_for("status=sent", "upstream_id=UP123")


def test_plaintext_session_gets_esmtp_without_tls_clause(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        code, _ = send(mx.port(), certs, ["bob@example.com"], tls=False)
        assert code == 250
        header = up.messages[0].data.split(b"\r\nFrom: Alice")[0].decode()
        assert "with ESMTP id" in header and "using TLS" not in header
        assert mx.log.wait_for("disconnect", "tls=none", "starttls_unused=1")


def test_only_crlf_and_stuffed_dots_reach_the_upstream(tmp_path: Path, certs: Certs) -> None:
    body = b"Subject: big\r\n\r\n" + b"".join(b".%05d line of text\r\n" % i for i in range(5000))
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        code, _ = send(mx.port(), certs, ["bob@example.com"], body)
        assert code == 250
        data = up.messages[0].data
        assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
        assert data.endswith(body.replace(b"\r\n.", b"\r\n.."))


def test_several_messages_share_one_upstream_session(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp.ehlo("c.example")
            for i in range(3):
                smtp.sendmail("a@sender.example", [f"u{i}@example.com"], MESSAGE)
            smtp.mail("a@sender.example")
            assert smtp.rcpt("x@example.com")[0] == 250
            assert smtp.rset()[0] == 250
            smtp.sendmail("a@sender.example", ["last@example.com"], MESSAGE)
        assert up.connections == 1
        assert [m.rcpts for m in up.messages] == [
            ["u0@example.com"],
            ["u1@example.com"],
            ["u2@example.com"],
            ["last@example.com"],
        ]
        assert b"RSET\r\n" in up.raw[0]


def test_idle_upstream_sessions_are_reused_across_inbound_sessions(
    tmp_path: Path, certs: Certs
) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        for i in range(3):
            assert send(mx.port(), certs, [f"u{i}@example.com"])[0] == 250
        assert len(up.messages) == 3
        assert up.connections == 1  # one greeting, EHLO and handshake for three clients


def test_stale_pooled_upstream_session_is_replaced_transparently(
    tmp_path: Path, certs: Certs
) -> None:
    # The upstream hangs up after every message, as one with a short idle timeout would.
    with (
        RecordingUpstream(behaviour=Behaviour(close_after_message=True)) as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        for i in range(3):
            assert send(mx.port(), certs, [f"u{i}@example.com"])[0] == 250
        assert len(up.messages) == 3 and up.connections == 3


def test_pooled_session_refused_with_421_is_retried_on_a_new_one(
    tmp_path: Path, certs: Certs
) -> None:
    # The pooled session looks fine until it is used: the upstream timed it out meanwhile.
    behaviour = Behaviour(refuse_second_mail=b"421 4.4.2 idle too long")
    with (
        RecordingUpstream(behaviour=behaviour) as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        for i in range(3):
            assert send(mx.port(), certs, [f"u{i}@example.com"])[0] == 250
        assert len(up.messages) == 3 and up.connections == 3  # each reuse met a 421


@pytest.mark.parametrize("stage", ["rcpt", "final"])
def test_upstream_421_is_a_451_and_the_client_session_goes_on(
    tmp_path: Path, certs: Certs, stage: str
) -> None:
    behaviour = Behaviour()
    if stage == "rcpt":
        behaviour.rcpt_replies = {"first@example.com": b"421 4.3.2 shutting down"}
    else:
        behaviour.final_reply = b"421 4.3.2 shutting down"
    with (
        RecordingUpstream(behaviour=behaviour) as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
        smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp,
    ):
        smtp.ehlo("c.example")
        smtp.mail("a@sender.example")
        if stage == "rcpt":
            code, text = smtp.rcpt("first@example.com")
        else:
            assert smtp.rcpt("first@example.com")[0] == 250
            code, text = smtp.data(MESSAGE)
        assert code == 451 and text.startswith(b"4.4.1 "), (code, text)
        # Our session is still open: a new transaction works once the upstream is back.
        behaviour.rcpt_replies = {}
        behaviour.final_reply = b"250 2.0.0 Ok: queued as UP123"
        assert smtp.rset()[0] == 250
        smtp.mail("a@sender.example")
        assert smtp.rcpt("second@example.com")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
        assert up.messages[-1].rcpts == ["second@example.com"]


def test_upstream_recipient_refusal_is_ours_at_rcpt_time(tmp_path: Path, certs: Certs) -> None:
    behaviour = Behaviour(rcpt_replies={"nobody@example.com": b"550 5.1.1 No such user"})
    with (
        RecordingUpstream(behaviour=behaviour) as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp.ehlo("c.example")
            smtp.mail("a@sender.example")
            code, text = smtp.rcpt("nobody@example.com")
            assert code == 550 and text.startswith(b"5.1.1 No such user (id ")
            assert smtp.rcpt("bob@example.com")[0] == 250
            assert smtp.data(MESSAGE)[0] == 250
        assert up.messages[0].rcpts == ["bob@example.com"]


def test_recipient_outside_our_domains_is_relay_denied(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        with RawClient(mx.port()) as c:
            c.reply()
            c.send(b"EHLO c.example\r\n")
            c.reply()
            c.send(b"MAIL FROM:<a@sender.example>\r\n")
            assert c.code() == 250
            for rcpt in (
                b"<victim@elsewhere.example>",
                b"<victim%elsewhere.example@example.com>",
                b'<"victim@elsewhere.example"@example.com>',
                b"<@example.com:victim@elsewhere.example>",
                b"<elsewhere.example!victim@example.com>",
                b"<victim@[127.0.0.1]>",
                b"<victim@example.com.elsewhere.example>",
            ):
                c.send(b"RCPT TO:" + rcpt + b"\r\n")
                reply = c.reply()
                assert reply.startswith(b"550 5.7.1 "), (rcpt, reply)
        assert up.connections == 0  # nothing was even asked of the upstream


def test_null_sender_and_bare_postmaster_are_accepted(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp.ehlo("c.example")
            assert smtp.mail("")[0] == 250  # smtplib sends MAIL FROM:<>
            assert smtp.rcpt("postmaster")[0] == 250
            assert smtp.data(MESSAGE)[0] == 250
        assert up.messages[0].mail_from == "" and up.messages[0].rcpts == ["postmaster"]


def test_upstream_hosts_are_tried_in_order(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up:
        # 127.0.0.2 has nothing listening on that port: refused, then the next host is tried.
        config = mx_config(
            tmp_path,
            certs,
            upstream_port=up.port,
            upstream={"host": None, "hosts": ["127.0.0.2", "127.0.0.1"]},
        )
        with Mx(tmp_path, config) as mx:
            assert send(mx.port(), certs, ["bob@example.com"])[0] == 250
        assert len(up.messages) == 1


def never_250(port: int, certs: Certs) -> tuple[int, bytes]:
    """Run a transaction that must not end in 250; return the first non-250 reply seen."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as smtp:
        smtp.ehlo("c.example")
        smtp.mail("a@sender.example")
        code, text = smtp.rcpt("bob@example.com")
        if code != 250:
            return code, text
        code, text = smtp.data(MESSAGE)
        assert code != 250, "the client was told 250 though the upstream did not accept"
        return code, text


def test_upstream_down_gives_4xx_at_rcpt(tmp_path: Path, certs: Certs) -> None:
    with Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=free_port())) as mx:
        code, text = never_250(mx.port(), certs)
        assert code == 451 and text.startswith(b"4.4.1 ") and b"(id " in text


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["-r", "."], 4),  # 4xx at end of data
        (["-f", "."], 5),  # 5xx at end of data: passed through
        (["-q", "."], 4),  # disconnect without a reply at end of data
        (["-r", "rcpt"], 4),  # 4xx at RCPT
        (["-f", "rcpt"], 5),  # 5xx at RCPT
        (["-q", "mail"], 4),  # disconnect at MAIL
        (["-f", "ehlo"], 4),  # upstream refuses our EHLO: cannot relay
        (["-b", "421 4.3.2 closing", "-r", "rcpt"], 4),  # 421 at RCPT
        (["-b", "421 4.3.2 closing", "-r", "."], 4),  # 421 at end of data
        (["-w", "5"], 4),  # slow: 5 s before the DATA reply, past our 3 s upstream timeout
    ],
)
def test_smtp_sink_faults_never_give_250(
    tmp_path: Path, certs: Certs, flags: list[str], expect: int
) -> None:
    with (
        SmtpSink(flags) as sink,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=sink.port)) as mx,
    ):
        code, _ = never_250(mx.port(), certs)
        assert code // 100 == expect


def test_smtp_sink_accepts_what_we_relay(tmp_path: Path, certs: Certs) -> None:
    with (
        SmtpSink() as sink,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=sink.port)) as mx,
    ):
        assert send(mx.port(), certs, ["bob@example.com"])[0] == 250
        assert mx.log.wait_for("status=sent", f"relay=127.0.0.1[127.0.0.1]:{sink.port}")


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "final"])
def test_upstream_that_hangs_gives_4xx(tmp_path: Path, certs: Certs, stage: str) -> None:
    with RecordingUpstream(behaviour=Behaviour(hang_at=stage)) as up:
        config = mx_config(
            tmp_path, certs, upstream_port=up.port, upstream={"timeout": "1s", "data_timeout": "1s"}
        )
        with Mx(tmp_path, config) as mx:
            code, _ = never_250(mx.port(), certs)
            assert code == 451


@pytest.mark.parametrize("stage", ["rcpt", "final"])
def test_upstream_that_closes_gives_4xx(tmp_path: Path, certs: Certs, stage: str) -> None:
    with (
        RecordingUpstream(behaviour=Behaviour(close_at=stage)) as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        assert never_250(mx.port(), certs)[0] == 451


def test_upstream_2xx_other_than_250_is_not_acceptance(tmp_path: Path, certs: Certs) -> None:
    behaviour = Behaviour(final_reply=b"251 2.1.5 odd but positive")
    with (
        RecordingUpstream(behaviour=behaviour) as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        assert never_250(mx.port(), certs)[0] == 451


# ---- TLS to the upstream -----------------------------------------------------------------------


def upstream_tls(certs: Certs, pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = pair or certs.upstream
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def tls_upstream_config(
    tmp_path: Path, certs: Certs, port: int, **upstream: object
) -> dict[str, object]:
    settings: dict[str, object] = {
        "use_tls": True,
        "verify_cert": True,
        "ca_file": str(certs.ca_file),
    }
    settings.update(upstream)
    return mx_config(tmp_path, certs, upstream_port=port, upstream=settings)


def test_relay_uses_verified_tls(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream(upstream_tls(certs)) as up,
        Mx(tmp_path, tls_upstream_config(tmp_path, certs, up.port, host="localhost")) as mx,
    ):
        assert send(mx.port(), certs, ["bob@example.com"])[0] == 250
        assert up.messages[0].tls
        assert mx.log.wait_for("status=sent", "relay_tls=TLSv1.3/")


@pytest.mark.parametrize("problem", ["wrong-ca", "wrong-name", "expired", "no-starttls"])
def test_upstream_tls_failures_give_4xx_and_no_plaintext(
    tmp_path: Path, certs: Certs, problem: str
) -> None:
    pair = certs.upstream
    behaviour = Behaviour()
    settings: dict[str, object] = {"host": "localhost"}
    if problem == "wrong-ca":
        settings["ca_file"] = str(certs.wrong_ca_file)
    elif problem == "wrong-name":
        settings["server_name"] = "not-the-upstream.example"
    elif problem == "expired":
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        leaf = certs.ca.issue_cert(
            "localhost", not_before=past - dt.timedelta(days=30), not_after=past
        )
        pair = _write(tmp_path, "expired", leaf)
    else:
        behaviour.offer_starttls = False
    with (
        RecordingUpstream(upstream_tls(certs, pair), behaviour) as up,
        Mx(tmp_path, tls_upstream_config(tmp_path, certs, up.port, **settings)) as mx,
    ):
        code, _ = never_250(mx.port(), certs)
        assert code == 451
        assert not up.messages
        # No envelope went out in plaintext or over an unverified channel.
        assert all(b"MAIL FROM" not in raw for raw in up.raw)
        assert mx.log.wait_for("upstream", "status=unavailable")


def test_upstream_starttls_response_injection_is_discarded(tmp_path: Path, certs: Certs) -> None:
    # A hostile upstream (or a man in the middle) appends a reply to its 220 in plaintext.
    # Were it kept, our EHLO over TLS would read the forged 550 and the relay would fail.
    behaviour = Behaviour(after_starttls_220=b"550 5.7.1 injected before TLS\r\n")
    with (
        RecordingUpstream(upstream_tls(certs), behaviour) as up,
        Mx(tmp_path, tls_upstream_config(tmp_path, certs, up.port, host="localhost")) as mx,
    ):
        assert send(mx.port(), certs, ["bob@example.com"])[0] == 250
        assert up.messages and up.messages[0].tls


def test_unverified_tls_when_admin_says_so(tmp_path: Path, certs: Certs) -> None:
    other_ca = trustme.CA()
    pair = _write(tmp_path, "selfish", other_ca.issue_cert("localhost"))
    with (
        RecordingUpstream(upstream_tls(certs, pair)) as up,
        Mx(
            tmp_path,
            tls_upstream_config(
                tmp_path, certs, up.port, host="localhost", verify_cert=False, ca_file=None
            ),
        ) as mx,
    ):
        assert send(mx.port(), certs, ["bob@example.com"])[0] == 250
        assert up.messages[0].tls
