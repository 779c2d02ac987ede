"""ClientSession (the relay's side): reply parsing, sequencing, injection defences, and a full
conversation against ServerSession with no socket in between."""

from __future__ import annotations

import pytest

from spamkiller.errors import LocalProtocolError, RemoteProtocolError
from spamkiller.smtp.client import ClientSession
from spamkiller.smtp.events import (
    NEED_DATA,
    ConnectionClosed,
    MessageReceived,
    NeedData,
)
from spamkiller.smtp.limits import Limits
from spamkiller.smtp.replies import Reply
from spamkiller.smtp.server import ServerSession
from spamkiller.smtp.states import State

EHLO_REPLY = (
    b"250-upstream.example Hello\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-STARTTLS\r\n"
    b"250-8BITMIME\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)


def replies_for(client: ClientSession, data: bytes) -> list[Reply]:
    """Feed `data`; every complete reply, parsed, in order."""
    client.receive_data(data)
    out: list[Reply] = []
    while True:
        reply = client.next_reply()
        if isinstance(reply, NeedData | ConnectionClosed):
            return out
        out.append(reply)


def greeted() -> ClientSession:
    client = ClientSession()
    assert replies_for(client, b"220 upstream.example ESMTP\r\n") == [
        Reply(220, "", "upstream.example ESMTP")
    ]
    assert client.state is State.GREETED
    return client


def ready() -> ClientSession:
    client = greeted()
    assert client.ehlo("mx.test.example") == b"EHLO mx.test.example\r\n"
    [reply] = replies_for(client, EHLO_REPLY)
    assert reply.code == 250
    assert client.state is State.READY
    return client


def in_data() -> ClientSession:
    client = ready()
    client.mail("a@sender.example")
    client.rcpt("b@rcpt.example")
    client.data()
    assert [r.code for r in replies_for(client, b"250 ok\r\n250 ok\r\n354 go\r\n")] == [
        250,
        250,
        354,
    ]
    return client


# ---------------------------------------------------------------------------------------------
# parsing replies
# ---------------------------------------------------------------------------------------------


def test_greeting_then_ehlo_extensions() -> None:
    client = greeted()
    client.ehlo("mx.test.example")
    [reply] = replies_for(client, EHLO_REPLY)
    assert reply.code == 250
    assert reply.enhanced == ""
    assert reply.lines[0] == "upstream.example Hello"
    assert len(reply.lines) == 6
    assert client.extensions == {
        "PIPELINING": "",
        "SIZE": "10240000",
        "STARTTLS": "",
        "8BITMIME": "",
        "ENHANCEDSTATUSCODES": "",
    }


def test_helo_clears_extensions() -> None:
    client = ready()
    client.helo("mx.test.example")
    replies_for(client, b"250 upstream.example\r\n")
    assert client.extensions == {}


def test_enhanced_code_is_split_off() -> None:
    client = ready()
    client.mail("a@sender.example")
    client.rcpt("b@rcpt.example")
    parsed = replies_for(
        client, b"250 2.1.0 Sender ok\r\n550-5.1.1 No such\r\n550 5.1.1 user here\r\n"
    )
    assert parsed == [
        Reply(250, "2.1.0", "Sender ok"),
        Reply(550, "5.1.1", ("No such", "user here")),
    ]


@pytest.mark.parametrize(
    ("line", "enhanced", "text"),
    [
        (b"250 2.0.0\r\n", "2.0.0", ""),
        (b"250 2.999.999 odd\r\n", "2.999.999", "odd"),
        (b"250 5.0.0 class differs from code\r\n", "", "5.0.0 class differs from code"),
        (b"250 2.0.0x not a code\r\n", "", "2.0.0x not a code"),
        (b"250 2.0 short\r\n", "", "2.0 short"),
        (b"250\r\n", "", ""),
    ],
)
def test_enhanced_code_only_when_well_formed(line: bytes, enhanced: str, text: str) -> None:
    client = ready()
    client.noop()
    assert replies_for(client, line) == [Reply(250, enhanced, text)]


def test_pipelined_replies_match_commands_in_order() -> None:
    client = ready()
    sent = (
        client.mail("a@sender.example", "SIZE=100")
        + client.rcpt("b@rcpt.example")
        + client.rcpt("c@rcpt.example")
        + client.data()
    )
    assert sent == (
        b"MAIL FROM:<a@sender.example> SIZE=100\r\n"
        b"RCPT TO:<b@rcpt.example>\r\n"
        b"RCPT TO:<c@rcpt.example>\r\n"
        b"DATA\r\n"
    )
    assert client.waiting == 4
    parsed = replies_for(
        client, b"250 2.1.0 ok\r\n550 5.1.1 no\r\n250 2.1.5 ok\r\n354 go ahead\r\n"
    )
    assert [r.code for r in parsed] == [250, 550, 250, 354]
    assert client.waiting == 0
    assert client.state is State.DATA
    assert client.message(b"hi\r\n") == b"hi\r\n.\r\n"
    assert client.state is State.READY
    assert replies_for(client, b"250 2.0.0 queued as X\r\n") == [Reply(250, "2.0.0", "queued as X")]


def test_replies_split_byte_by_byte() -> None:
    client = greeted()
    client.ehlo("mx.test.example")
    parsed: list[Reply] = []
    for i in range(len(EHLO_REPLY)):
        parsed += replies_for(client, EHLO_REPLY[i : i + 1])
        if i < len(EHLO_REPLY) - 1:
            assert parsed == []
    assert len(parsed) == 1
    assert client.extensions["SIZE"] == "10240000"


def test_rejected_pipelined_mail_returns_to_ready() -> None:
    client = ready()
    client.mail("a@sender.example")
    client.rcpt("b@rcpt.example")
    client.data()
    parsed = replies_for(client, b"550 5.7.1 no\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n")
    assert [r.code for r in parsed] == [550, 503, 503]
    assert client.state is State.READY
    with pytest.raises(LocalProtocolError):
        client.message(b"x\r\n")
    assert client.mail("a@sender.example").startswith(b"MAIL ")


def test_data_refused_returns_to_ready() -> None:
    client = ready()
    client.mail("a@sender.example")
    client.rcpt("b@rcpt.example")
    client.data()
    replies_for(client, b"250 ok\r\n250 ok\r\n554 5.5.1 no valid recipients\r\n")
    assert client.state is State.READY


def test_421_closes() -> None:
    client = ready()
    client.noop()
    assert replies_for(client, b"421 4.3.2 going down\r\n")[0].code == 421
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.noop()


@pytest.mark.parametrize("banner", [b"554 5.7.1 go away\r\n", b"421 busy\r\n"])
def test_refusing_banner_closes(banner: bytes) -> None:
    client = ClientSession()
    replies_for(client, banner)
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.ehlo("mx.test.example")


def test_eof_is_connection_closed() -> None:
    client = ready()
    client.noop()
    client.receive_data(b"250 partial")
    assert client.next_reply() is NEED_DATA
    client.receive_data(b"")
    assert client.next_reply() == ConnectionClosed()


# ---------------------------------------------------------------------------------------------
# malformed replies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"2x0 bad code\r\n",
        b"abc\r\n",
        b"600 out of range\r\n",
        b"199 out of range\r\n",
        b"099 out of range\r\n",
        b"25\r\n",
        b"250x no separator\r\n",
        b"2500 four digits\r\n",
        b"250-first\r\n251 second\r\n",
        b"250-first\r\n550 second\r\n",
        b"250 bare\nLF inside\r\n",
        b"250 bare\rCR inside\r\n",
        b"250 NUL\0inside\r\n",
        b"250-ok\r\n25\r\n",
        b"250-ok\r\n250+bad\r\n",
    ],
)
def test_malformed_reply_is_remote_error(data: bytes) -> None:
    client = ready()
    client.noop()
    with pytest.raises(RemoteProtocolError):
        replies_for(client, data)


def test_over_long_reply_line_is_remote_error() -> None:
    client = ready()
    client.noop()
    line = b"250 " + b"x" * 2045 + b"\r\n"  # 2049 octets before CRLF
    with pytest.raises(RemoteProtocolError, match="too long"):
        replies_for(client, line)


def test_reply_line_at_the_limit_is_fine() -> None:
    client = ready()
    client.noop()
    [reply] = replies_for(client, b"250 " + b"x" * 2044 + b"\r\n")  # 2048 octets
    assert reply.code == 250


def test_endless_line_without_newline_is_remote_error_early() -> None:
    client = ready()
    client.noop()
    client.receive_data(b"250 " + b"x" * 1000)
    assert client.next_reply() is NEED_DATA
    client.receive_data(b"x" * 2000)
    with pytest.raises(RemoteProtocolError, match="too long"):
        client.next_reply()


def test_too_many_reply_lines_is_remote_error() -> None:
    client = ready()
    client.noop()
    with pytest.raises(RemoteProtocolError, match="too many lines"):
        replies_for(client, b"250-x\r\n" * 100 + b"250 end\r\n")


def test_reply_with_the_maximum_number_of_lines_is_fine() -> None:
    client = ready()
    client.noop()
    [reply] = replies_for(client, b"250-x\r\n" * 99 + b"250 end\r\n")
    assert len(reply.lines) == 100


def test_endless_multi_line_reply_is_cut_off_while_still_arriving() -> None:
    client = ready()
    client.noop()
    with pytest.raises(RemoteProtocolError):
        for _ in range(200):
            replies_for(client, b"250-more\r\n")


def test_reply_limits_follow_configuration() -> None:
    client = ClientSession(limits=Limits(max_reply_lines=3, max_reply_line_length=20))
    replies_for(client, b"220 hi\r\n")
    client.noop()
    with pytest.raises(RemoteProtocolError):
        replies_for(client, b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n")
    client = ClientSession(limits=Limits(max_reply_lines=3, max_reply_line_length=20))
    with pytest.raises(RemoteProtocolError):
        replies_for(client, b"220 " + b"y" * 17 + b"\r\n")


def test_incomplete_reply_over_the_total_bound_is_remote_error() -> None:
    client = ClientSession(limits=Limits(max_reply_lines=3, max_reply_line_length=10))
    client.receive_data(b"250-a\r\n" + b"b\n" + b"c" * 20)
    assert client.next_reply() is NEED_DATA
    client.receive_data(b"c" * 20)
    with pytest.raises(RemoteProtocolError, match="reply too long"):
        client.next_reply()


def test_unsolicited_reply_is_remote_error() -> None:
    client = ready()
    with pytest.raises(RemoteProtocolError, match="unexpected reply"):
        replies_for(client, b"250 nobody asked\r\n")


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\0b", "x\r\nRCPT TO:<evil@x>"])
def test_cr_lf_nul_in_arguments_are_refused(bad: str) -> None:
    client = ready()
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        client.mail(bad)
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        client.mail("a@b.example", f"SIZE=1 {bad}")
    assert client.state is State.READY  # a refused command changes nothing
    assert client.waiting == 0
    client.mail("a@b.example")
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        client.rcpt(bad)
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        greeted().ehlo(bad)
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        greeted().helo(bad)


def test_commands_out_of_turn_are_refused() -> None:
    client = ClientSession()
    with pytest.raises(LocalProtocolError):
        client.ehlo("early.example")  # before the greeting
    client = greeted()
    with pytest.raises(LocalProtocolError):
        client.mail("a@b.example")  # before EHLO
    with pytest.raises(LocalProtocolError):
        client.starttls()  # before EHLO
    client = ready()
    for command in (lambda: client.rcpt("a@b.example"), client.data):
        with pytest.raises(LocalProtocolError):
            command()
    client.mail("a@b.example")
    with pytest.raises(LocalProtocolError):
        client.data()
    with pytest.raises(LocalProtocolError):
        client.mail("again@b.example")
    with pytest.raises(LocalProtocolError):
        client.starttls()
    with pytest.raises(LocalProtocolError):
        client.message(b"x\r\n")


def test_nothing_may_follow_starttls_until_tls_is_up() -> None:
    client = ready()
    assert client.starttls() == b"STARTTLS\r\n"
    for command in (client.noop, client.rset, client.quit, lambda: client.ehlo("x.example")):
        with pytest.raises(LocalProtocolError):
            command()


def test_message_must_end_with_crlf() -> None:
    client = in_data()
    with pytest.raises(LocalProtocolError, match="CRLF"):
        client.message(b"no newline")
    assert client.state is State.DATA
    assert client.message(b"") == b".\r\n"


def test_message_with_a_header_in_front_is_one_piece_of_text() -> None:
    client = in_data()
    with pytest.raises(LocalProtocolError, match="header"):
        client.message(b"body\r\n", header=b"Received: from x")  # would glue onto the body
    assert client.state is State.DATA
    sent = client.message(b"Subject: hi\r\n\r\nbody\r\n", header=b"Received: from x\r\n")
    assert sent == b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"


def test_message_only_after_354() -> None:
    """DATA's reply decides whether the next bytes are text or commands: text sent before the
    354 is read as commands by an upstream that refuses DATA (outbound smuggling)."""
    client = ready()
    client.mail("a@sender.example")
    client.rcpt("b@rcpt.example")
    client.data()
    with pytest.raises(LocalProtocolError):
        client.message(b"RSET\r\nMAIL FROM:<evil@x>\r\n")


def test_start_tls_only_after_220() -> None:
    """start_tls() before the upstream's answer to STARTTLS would take a 454 (stripping) as TLS."""
    client = ready()
    client.starttls()
    with pytest.raises(LocalProtocolError):
        client.start_tls()


def test_quit_rset_noop_bytes() -> None:
    client = ready()
    assert client.noop() == b"NOOP\r\n"
    assert client.rset() == b"RSET\r\n"
    assert client.quit() == b"QUIT\r\n"
    assert client.waiting == 3


# ---------------------------------------------------------------------------------------------
# STARTTLS response injection
# ---------------------------------------------------------------------------------------------


def test_start_tls_drops_replies_injected_after_220() -> None:
    client = ready()
    client.starttls()
    client.receive_data(b"220 go\r\n250 injected\r\n")
    assert client.next_reply() == Reply(220, "", "go")
    assert client.unread == len(b"250 injected\r\n")
    assert client.state is State.TLS
    client.start_tls()
    assert client.unread == 0
    assert client.extensions == {}
    assert client.state is State.GREETED
    client.ehlo("mx.test.example")
    assert client.next_reply() is NEED_DATA
    [reply] = replies_for(client, b"250-upstream.example\r\n250 SIZE 5\r\n")
    assert reply.lines == ("upstream.example", "SIZE 5")
    assert client.extensions == {"SIZE": "5"}


def test_refused_starttls_returns_to_ready() -> None:
    client = ready()
    client.starttls()
    assert replies_for(client, b"454 4.7.0 TLS not available\r\n")[0].code == 454
    assert client.state is State.READY
    with pytest.raises(LocalProtocolError):
        client.start_tls()
    assert client.extensions["STARTTLS"] == ""  # the caller decides; nothing was dropped


# ---------------------------------------------------------------------------------------------
# client against server
# ---------------------------------------------------------------------------------------------


def pump(server: ServerSession, data: bytes) -> tuple[bytes, list[MessageReceived]]:
    """Feed the server, answer with default replies; the bytes written and any messages."""
    server.receive_data(data)
    out = b""
    messages: list[MessageReceived] = []
    while server.state not in (State.CLOSED, State.TLS):
        event = server.next_event()
        if isinstance(event, NeedData | ConnectionClosed):
            break
        if isinstance(event, MessageReceived):
            messages.append(event)
        out += server.send(event.reply)
    return out, messages


def test_client_and_server_agree_on_a_pipelined_transaction() -> None:
    server = ServerSession(hostname="mx.test.example", session_id="PAIR", starttls_available=True)
    client = ClientSession()
    assert replies_for(client, server.greeting())[0].code == 220
    wire, _ = pump(server, client.ehlo("relay.example"))
    [ehlo] = replies_for(client, wire)
    assert ehlo.code == 250
    assert set(client.extensions) == {
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    }
    wire, _ = pump(
        server,
        client.mail("a@sender.example", "BODY=8BITMIME")
        + client.rcpt("b@rcpt.example")
        + client.rcpt("postmaster")
        + client.data(),
    )
    assert [(r.code, r.enhanced) for r in replies_for(client, wire)] == [
        (250, "2.1.0"),
        (250, "2.1.5"),
        (250, "2.1.5"),
        (354, ""),
    ]
    original = b"Subject: t\r\n\r\n.leading dot\r\n.\r\nend\r\n"
    stuffed = original.replace(b"\r\n.", b"\r\n..")
    wire, messages = pump(server, client.message(stuffed))
    assert [r.code for r in replies_for(client, wire)] == [250]
    [message] = messages
    assert message.data.content() == original
    assert message.data.stuffed() == stuffed
    wire, _ = pump(server, client.quit())
    assert replies_for(client, wire) == [Reply(221, "2.0.0", "Bye")]
    assert server.state is State.CLOSED


def test_client_and_server_agree_on_starttls() -> None:
    server = ServerSession(hostname="mx.test.example", session_id="PAIR", starttls_available=True)
    client = ClientSession()
    replies_for(client, server.greeting())
    replies_for(client, pump(server, client.ehlo("relay.example"))[0])
    wire, _ = pump(server, client.starttls())
    assert replies_for(client, wire) == [Reply(220, "2.0.0", "Ready to start TLS")]
    assert server.state is State.TLS
    server.start_tls()
    client.start_tls()
    replies_for(client, pump(server, client.ehlo("relay.example"))[0])
    assert "STARTTLS" not in client.extensions
    assert "CHUNKING" in client.extensions


def test_server_error_replies_parse_with_their_id() -> None:
    server = ServerSession(hostname="mx.test.example", session_id="PAIR")
    client = ClientSession()
    replies_for(client, server.greeting())
    replies_for(client, pump(server, client.ehlo("relay.example"))[0])
    client.mail("a@sender.example", "SIZE=999999999999")
    wire, _ = pump(server, b"MAIL FROM:<a@sender.example> SIZE=999999999999\r\n")
    assert replies_for(client, wire) == [
        Reply(552, "5.3.4", "Message size exceeds fixed limit (id PAIR)")
    ]
    assert client.state is State.READY
