"""ServerSession driven with bytes: greeting, EHLO, sequencing, pipelining, limits, STARTTLS, ids.

DATA, BDAT, smuggling and dot-stuffing live in test_smtp_data.py.
"""

from __future__ import annotations

import pytest

from spamkiller.errors import LocalProtocolError
from spamkiller.smtp import replies
from spamkiller.smtp.events import (
    Answer,
    BdatChunk,
    ConnectionClosed,
    DataCommand,
    DataRejected,
    Ehlo,
    Event,
    MailFrom,
    MessageReceived,
    NeedData,
    Quit,
    RcptTo,
    Reset,
    StartTls,
    Violation,
)
from spamkiller.smtp.limits import Limits
from spamkiller.smtp.replies import Reply
from spamkiller.smtp.server import NEED_DATA, ServerSession
from spamkiller.smtp.states import TRANSITIONS, State, Verb

SID = "T3ST"
HOST = "mx.test.example"


def make(
    limits: Limits | None = None,
    *,
    tls_active: bool = False,
    starttls_available: bool = False,
    require_tls: bool = False,
) -> ServerSession:
    """A session whose banner has been sent."""
    session = ServerSession(
        hostname=HOST,
        session_id=SID,
        limits=limits,
        tls_active=tls_active,
        starttls_available=starttls_available,
        require_tls=require_tls,
    )
    assert session.greeting() == f"220 {HOST} ESMTP\r\n".encode()
    return session


def exchange(session: ServerSession, data: bytes) -> list[tuple[Event, bytes]]:
    """Feed `data` (b"" feeds nothing: EOF is sent by hand), answer every event with its own
    reply, start TLS when asked; the (event, reply bytes) pairs."""
    if data:
        session.receive_data(data)
    out: list[tuple[Event, bytes]] = []
    while session.state is not State.CLOSED:
        event = session.next_event()
        if isinstance(event, NeedData | ConnectionClosed):
            break
        out.append((event, session.send(event.reply)))
        if session.state is State.TLS:
            session.start_tls()
    return out


def converse(session: ServerSession, data: bytes) -> list[bytes]:
    """The replies written for `data`, one bytes object per reply."""
    return [wire for _, wire in exchange(session, data)]


def err(line: str) -> bytes:
    """The wire form of an error reply of ours: every 4xx/5xx carries the session id."""
    return f"{line} (id {SID})\r\n".encode()


def one(session: ServerSession, data: bytes) -> tuple[Event, bytes]:
    """Feed one command; exactly one event must come of it. Does not start TLS."""
    session.receive_data(data)
    event = session.next_event()
    assert not isinstance(event, NeedData | ConnectionClosed), event
    wire = session.send(event.reply)
    if session.state not in (State.TLS, State.CLOSED):
        assert session.next_event() is NEED_DATA
    return event, wire


OK = b"250 2.0.0 OK\r\n"
SENDER_OK = b"250 2.1.0 Sender OK\r\n"
RECIPIENT_OK = b"250 2.1.5 Recipient OK\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
RESET_OK = b"250 2.0.0 Reset OK\r\n"
BYE = b"221 2.0.0 Bye\r\n"
READY_TLS = b"220 2.0.0 Ready to start TLS\r\n"

EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<alice@sender.example>\r\n"
RCPT = b"RCPT TO:<bob@rcpt.example>\r\n"

EHLO_LINES = [
    f"250-{HOST}".encode(),
    b"250-PIPELINING",
    b"250-SIZE 52428800",
    b"250-8BITMIME",
    b"250-SMTPUTF8",
    b"250-ENHANCEDSTATUSCODES",
]


def ehlo_wire(*, starttls: bool) -> bytes:
    """The exact EHLO reply: STARTTLS, when offered, is the last line."""
    tail = [b"250-CHUNKING", b"250 STARTTLS"] if starttls else [b"250 CHUNKING"]
    return b"".join(line + b"\r\n" for line in [*EHLO_LINES, *tail])


# Commands that reach each state from a fresh, greeted session.
_SETUP: dict[State, bytes] = {
    State.GREETED: b"",
    State.READY: EHLO,
    State.MAIL: EHLO + MAIL,
    State.RCPT: EHLO + MAIL + RCPT,
    State.BDAT: EHLO + MAIL + RCPT + b"BDAT 4\r\nabcd",
}


def session_in(state: State, **kwargs: bool) -> ServerSession:
    session = make(**kwargs)
    for _, wire in exchange(session, _SETUP[state]):
        assert wire[:1] in (b"2", b"3"), wire
    assert session.state is state
    return session


# ---------------------------------------------------------------------------------------------
# greeting, EHLO, HELO
# ---------------------------------------------------------------------------------------------


def test_greeting_is_220_with_hostname_and_waits_for_ehlo() -> None:
    session = ServerSession(hostname=HOST, session_id=SID)
    assert session.state is State.START
    assert session.greeting() == b"220 mx.test.example ESMTP\r\n"
    assert session.state is State.GREETED
    assert session.next_event() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply(554, "5.7.1", "Access denied"), err("554 5.7.1 Access denied")),
        (Reply(421, "4.7.0", "Too busy"), err("421 4.7.0 Too busy")),
    ],
)
def test_refusing_banner_carries_id_and_closes(reply: Reply, wire: bytes) -> None:
    session = ServerSession(hostname=HOST, session_id=SID)
    assert session.greeting(reply) == wire
    assert session.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        session.next_event()


def test_greeting_twice_and_events_before_greeting_are_local_errors() -> None:
    session = ServerSession(hostname=HOST, session_id=SID)
    with pytest.raises(LocalProtocolError):
        session.next_event()
    session.greeting()
    with pytest.raises(LocalProtocolError):
        session.greeting()


def test_ehlo_lists_extensions_in_order() -> None:
    session = make()
    [(event, wire)] = exchange(session, EHLO)
    assert isinstance(event, Ehlo)
    assert (event.name, event.extended) == ("client.example", True)
    assert wire == ehlo_wire(starttls=False)
    assert session.state is State.READY
    assert session.helo_name == "client.example"
    assert session.esmtp is True


def test_ehlo_size_is_the_configured_limit() -> None:
    session = make(Limits(max_message_size=1000))
    [wire] = converse(session, EHLO)
    assert b"\r\n250-SIZE 1000\r\n" in wire


@pytest.mark.parametrize(
    ("available", "active", "listed"),
    [(False, False, False), (True, False, True), (True, True, False), (False, True, False)],
)
def test_starttls_listed_only_when_available_and_not_active(
    available: bool, active: bool, listed: bool
) -> None:
    session = make(starttls_available=available, tls_active=active)
    assert converse(session, EHLO) == [ehlo_wire(starttls=listed)]


def test_helo_is_one_line_and_not_esmtp() -> None:
    session = make()
    [(event, wire)] = exchange(session, b"HELO client.example\r\n")
    assert isinstance(event, Ehlo)
    assert event.extended is False
    assert wire == b"250 mx.test.example\r\n"
    assert session.state is State.READY
    assert session.esmtp is False
    assert session.helo_name == "client.example"


@pytest.mark.parametrize(
    "name", [b"client.example", b"[192.0.2.1]", b"[IPv6:2001:db8::1]", b"x", b"a" * 255]
)
def test_ehlo_accepts_names_and_literals(name: bytes) -> None:
    session = make()
    [(event, wire)] = exchange(session, b"EHLO " + name + b"\r\n")
    assert isinstance(event, Ehlo)
    assert event.name == name.decode()
    assert wire.startswith(b"250-mx.test.example\r\n")


def test_ehlo_name_surrounding_spaces_are_trimmed() -> None:
    session = make()
    [(event, _)] = exchange(session, b"EHLO   client.example  \r\n")
    assert isinstance(event, Ehlo)
    assert event.name == "client.example"


@pytest.mark.parametrize(
    ("line", "verb"),
    [
        (b"EHLO\r\n", "EHLO"),
        (b"EHLO \r\n", "EHLO"),
        (b"HELO\r\n", "HELO"),
        (b"HELO two words\r\n", "HELO"),
        (b"EHLO tab\there\r\n", "EHLO"),
        (b"EHLO ctl\x01char\r\n", "EHLO"),
        (b"EHLO " + b"a" * 256 + b"\r\n", "EHLO"),
    ],
)
def test_bad_helo_name_is_501_and_state_unchanged(line: bytes, verb: str) -> None:
    session = make()
    [(event, wire)] = exchange(session, line)
    assert isinstance(event, Violation)
    assert wire == err(f"501 5.5.4 Syntax: {verb} hostname")
    assert session.state is State.GREETED
    assert session.helo_name is None
    assert session.bad_commands == 1


def test_non_ascii_helo_is_500_5_5_2() -> None:
    session = make()
    assert converse(session, "EHLO exämple.example\r\n".encode()) == [
        err("500 5.5.2 Command must be ASCII")
    ]
    assert session.state is State.GREETED


def test_verbs_are_case_insensitive() -> None:
    session = make()
    replies_ = converse(
        session,
        b"ehlo client.example\r\nmail from:<a@b.example>\r\nrcpt to:<c@d.example>\r\nrset\r\n",
    )
    assert replies_[1:] == [SENDER_OK, RECIPIENT_OK, RESET_OK]


# ---------------------------------------------------------------------------------------------
# sequencing: every TRANSITIONS row, the complement, the typical mistakes
# ---------------------------------------------------------------------------------------------

_COMMAND: dict[Verb, tuple[bytes, type, bytes]] = {
    Verb.EHLO: (EHLO, Ehlo, ehlo_wire(starttls=True)),
    Verb.HELO: (b"HELO client.example\r\n", Ehlo, b"250 mx.test.example\r\n"),
    Verb.MAIL: (b"MAIL FROM:<carol@sender.example>\r\n", MailFrom, SENDER_OK),
    Verb.RCPT: (b"RCPT TO:<dave@rcpt.example>\r\n", RcptTo, RECIPIENT_OK),
    Verb.DATA: (b"DATA\r\n", DataCommand, GO_AHEAD),
    Verb.BDAT: (b"BDAT 3\r\nxyz", BdatChunk, b"250 2.0.0 3 octets received\r\n"),
    Verb.RSET: (b"RSET\r\n", Reset, RESET_OK),
    Verb.NOOP: (b"NOOP\r\n", Answer, OK),
    Verb.QUIT: (b"QUIT\r\n", Quit, BYE),
    Verb.VRFY: (
        b"VRFY someone\r\n",
        Answer,
        b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n",
    ),
    # EXPN is in sequence everywhere but not implemented: 502, and not counted as an error.
    Verb.EXPN: (b"EXPN staff\r\n", Answer, err("502 5.5.1 Command not implemented")),
    Verb.HELP: (b"HELP\r\n", Answer, b"214 2.0.0 See RFC 5321\r\n"),
    Verb.STARTTLS: (b"STARTTLS\r\n", StartTls, READY_TLS),
}


def _pair_id(pair: tuple[State, Verb]) -> str:
    return f"{pair[0].name}-{pair[1].name}"


@pytest.mark.parametrize("pair", sorted(TRANSITIONS, key=_pair_id), ids=_pair_id)
def test_every_transition_row_is_accepted(pair: tuple[State, Verb]) -> None:
    state, verb = pair
    session = session_in(state, starttls_available=True)
    data, event_type, expected = _COMMAND[verb]
    event, wire = one(session, data)
    assert isinstance(event, event_type)
    assert wire == expected
    # QUIT stays put in the table (the client's view); the server ends the session after 221.
    assert session.state is (State.CLOSED if verb is Verb.QUIT else TRANSITIONS[pair])
    assert session.bad_commands == 0


_OUT_OF_SEQUENCE = sorted(
    ((state, verb) for state in _SETUP for verb in Verb if (state, verb) not in TRANSITIONS),
    key=_pair_id,
)


@pytest.mark.parametrize("pair", _OUT_OF_SEQUENCE, ids=_pair_id)
def test_every_missing_row_is_503_and_keeps_state(pair: tuple[State, Verb]) -> None:
    state, verb = pair
    session = session_in(state, starttls_available=True)
    data, _, _ = _COMMAND[verb]
    event, wire = one(session, data)
    assert isinstance(event, Violation)
    assert wire.startswith(b"503 5.5.1 ")
    assert wire.endswith(f" (id {SID})\r\n".encode())
    assert session.state is state
    assert session.bad_commands == 1


@pytest.mark.parametrize(
    ("state", "line", "expected"),
    [
        (State.GREETED, MAIL, "503 5.5.1 Send EHLO or HELO first"),
        (State.GREETED, RCPT, "503 5.5.1 Send EHLO or HELO first"),
        (State.READY, RCPT, "503 5.5.1 Send MAIL first"),
        (State.READY, b"DATA\r\n", "503 5.5.1 Send MAIL first"),
        (State.MAIL, b"DATA\r\n", "503 5.5.1 Send RCPT first"),
        (State.MAIL, MAIL, "503 5.5.1 Sender already given"),
        (State.RCPT, MAIL, "503 5.5.1 Sender already given"),
        (State.BDAT, b"DATA\r\n", "503 5.5.1 DATA not allowed after BDAT"),
        (State.MAIL, b"STARTTLS\r\n", "503 5.5.1 Bad sequence of commands"),
        (State.RCPT, b"STARTTLS\r\n", "503 5.5.1 Bad sequence of commands"),
        (State.GREETED, b"STARTTLS\r\n", "503 5.5.1 Send EHLO or HELO first"),
    ],
)
def test_typical_out_of_sequence_replies(state: State, line: bytes, expected: str) -> None:
    session = session_in(state, starttls_available=True)
    assert converse(session, line) == [err(expected)]
    assert session.state is state


def test_rset_returns_to_ready_and_forgets_the_transaction() -> None:
    session = session_in(State.RCPT)
    assert session.recipients == 1
    assert converse(session, b"RSET\r\n") == [RESET_OK]
    assert session.state is State.READY
    assert session.recipients == 0
    assert converse(session, RCPT + b"DATA\r\n" + MAIL) == [
        err("503 5.5.1 Send MAIL first"),
        err("503 5.5.1 Send MAIL first"),
        SENDER_OK,
    ]


def test_rset_before_ehlo_still_needs_ehlo() -> None:
    session = make()
    assert converse(session, b"RSET\r\n" + MAIL) == [
        RESET_OK,
        err("503 5.5.1 Send EHLO or HELO first"),
    ]
    assert session.state is State.GREETED


def test_ehlo_mid_transaction_resets_it() -> None:
    session = session_in(State.READY)
    assert converse(session, b"MAIL FROM:<x@y.example> SMTPUTF8\r\n" + RCPT) == [
        SENDER_OK,
        RECIPIENT_OK,
    ]
    assert session.mail_params.smtputf8 is True
    [wire] = converse(session, b"EHLO other.example\r\n")
    assert wire == ehlo_wire(starttls=False)
    assert session.state is State.READY
    assert session.recipients == 0
    assert session.mail_params.smtputf8 is False
    assert session.helo_name == "other.example"
    assert converse(session, b"DATA\r\n") == [err("503 5.5.1 Send MAIL first")]


def test_refused_mail_and_rcpt_do_not_advance() -> None:
    session = session_in(State.READY)
    session.receive_data(MAIL)
    event = session.next_event()
    assert isinstance(event, MailFrom)
    assert session.send(Reply(550, "5.7.1", "Sender refused")) == err("550 5.7.1 Sender refused")
    assert session.state is State.READY
    exchange(session, MAIL)
    session.receive_data(RCPT)
    assert isinstance(session.next_event(), RcptTo)
    assert session.send(Reply(550, "5.1.1", "No such user")) == err("550 5.1.1 No such user")
    assert session.state is State.MAIL
    assert session.recipients == 0
    assert converse(session, b"DATA\r\n") == [err("503 5.5.1 Send RCPT first")]


def test_quit_closes_and_ignores_what_follows() -> None:
    session = session_in(State.READY)
    assert converse(session, b"QUIT\r\nNOOP\r\n") == [BYE]
    assert session.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        session.next_event()


def test_unknown_command_and_data_arguments() -> None:
    session = session_in(State.RCPT)
    assert converse(session, b"FOO bar\r\n\r\nDATA now\r\nVRFY\r\nVRFY  \r\n") == [
        err("500 5.5.1 Command unrecognized"),
        err("500 5.5.1 Command unrecognized"),
        err("501 5.5.4 No parameters allowed"),
        err("501 5.5.4 Syntax: VRFY address"),
        err("501 5.5.4 Syntax: VRFY address"),
    ]
    assert session.state is State.RCPT
    assert session.bad_commands == 5


def test_verb_must_be_ascii_even_where_utf8_arguments_are_allowed() -> None:
    """ "MA\u0131L" (dotless i) upper-cases to "MAIL"; the upstream would call it unknown, so a
    filter that accepts it parses a different conversation than the next hop."""
    session = session_in(State.READY)
    [(event, wire)] = exchange(session, "MA\u0131L FROM:<a@b.example>\r\n".encode())
    assert not isinstance(event, MailFrom)
    assert wire[:4] == b"500 "
    assert session.state is State.READY


def test_non_utf8_command_is_500_5_5_2() -> None:
    session = session_in(State.READY)
    assert converse(session, b"NOOP \xff\xfe\r\n") == [err("500 5.5.2 Command must be ASCII")]


def test_send_without_event_and_next_event_before_reply_are_local_errors() -> None:
    session = make()
    with pytest.raises(LocalProtocolError):
        session.send(replies.OK)
    session.receive_data(b"NOOP\r\nNOOP\r\n")
    assert isinstance(session.next_event(), Answer)
    with pytest.raises(LocalProtocolError):
        session.next_event()
    assert session.send(replies.NOOP_OK) == OK
    assert isinstance(session.next_event(), Answer)


def test_policy_reply_replaces_the_default() -> None:
    session = session_in(State.MAIL)
    session.receive_data(RCPT)
    event = session.next_event()
    assert isinstance(event, RcptTo)
    assert str(event.recipient) == "bob@rcpt.example"
    assert session.send(Reply(450, "4.7.1", "Greylisted")) == err("450 4.7.1 Greylisted")
    assert session.state is State.MAIL


def test_421_from_the_driver_closes() -> None:
    session = session_in(State.READY)
    session.receive_data(b"NOOP\r\nNOOP\r\n")
    session.next_event()
    assert session.send(replies.SHUTTING_DOWN) == err(
        "421 4.3.2 Service shutting down, try again later"
    )
    assert session.state is State.CLOSED


def test_counts_tally_ok_and_total_per_verb() -> None:
    session = make()
    converse(session, MAIL + EHLO + MAIL + MAIL + RCPT + b"FOO\r\nRSET\r\n")
    assert session.counts == {
        "mail": [1, 3],
        "ehlo": [1, 1],
        "rcpt": [1, 1],
        "rset": [1, 1],
    }


# ---------------------------------------------------------------------------------------------
# end of input
# ---------------------------------------------------------------------------------------------


def test_eof_between_commands() -> None:
    session = session_in(State.READY)
    session.receive_data(b"")
    assert session.next_event() == ConnectionClosed(mid_data=False)


def test_eof_after_partial_command_is_closed_not_executed() -> None:
    session = session_in(State.READY)
    session.receive_data(b"QUIT")
    assert session.next_event() is NEED_DATA
    session.receive_data(b"")
    assert session.next_event() == ConnectionClosed(mid_data=False)
    assert session.state is State.READY


def test_eof_in_data_and_in_bdat_chunk_is_mid_data() -> None:
    session = session_in(State.RCPT)
    exchange(session, b"DATA\r\nSubject: x\r\n")
    session.receive_data(b"")
    assert session.next_event() == ConnectionClosed(mid_data=True)

    session = session_in(State.RCPT)
    session.receive_data(b"BDAT 100\r\nonly a few")
    assert session.next_event() is NEED_DATA
    session.receive_data(b"")
    assert session.next_event() == ConnectionClosed(mid_data=True)


# ---------------------------------------------------------------------------------------------
# pipelining
# ---------------------------------------------------------------------------------------------

PIPELINED = (
    EHLO
    + MAIL
    + b"RCPT TO:<one@rcpt.example>\r\n"
    + b"RCPT TO:<two@rcpt.example>\r\n"
    + b"DATA\r\n"
    + b"Subject: hi\r\n\r\nbody\r\n.\r\n"
    + b"RSET\r\nNOOP\r\nQUIT\r\n"
)
PIPELINED_REPLIES = [
    ehlo_wire(starttls=False),
    SENDER_OK,
    RECIPIENT_OK,
    RECIPIENT_OK,
    GO_AHEAD,
    b"250 2.0.0 Message accepted\r\n",
    RESET_OK,
    OK,
    BYE,
]


def test_pipelined_commands_give_events_in_order() -> None:
    session = make()
    events = exchange(session, PIPELINED)
    assert [type(event) for event, _ in events] == [
        Ehlo,
        MailFrom,
        RcptTo,
        RcptTo,
        DataCommand,
        MessageReceived,
        Reset,
        Answer,
        Quit,
    ]
    assert [str(event.recipient) for event, _ in events if isinstance(event, RcptTo)] == [
        "one@rcpt.example",
        "two@rcpt.example",
    ]
    message = events[5][0]
    assert isinstance(message, MessageReceived)
    assert message.data.content() == b"Subject: hi\r\n\r\nbody\r\n"
    assert [wire for _, wire in events] == PIPELINED_REPLIES
    assert session.state is State.CLOSED


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
def test_split_input_gives_the_same_replies(step: int) -> None:
    session = make()
    written: list[bytes] = []
    for i in range(0, len(PIPELINED), step):
        written += converse(session, PIPELINED[i : i + step])
    assert written == PIPELINED_REPLIES


def test_buffered_counts_unprocessed_command_octets() -> None:
    session = make()
    session.receive_data(EHLO + b"NOOP\r\n")
    assert session.buffered == len(EHLO) + 6
    event = session.next_event()
    assert session.buffered == 6
    assert isinstance(event, Ehlo)
    session.send(event.reply)


# ---------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------


def test_command_of_exactly_max_length_is_accepted() -> None:
    session = session_in(State.READY)
    line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(line) == 512
    assert converse(session, line) == [OK]


def test_command_one_octet_over_max_length_is_500() -> None:
    session = session_in(State.READY)
    line = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
    assert len(line) == 513
    assert converse(session, line + b"NOOP\r\n") == [err("500 5.5.2 Line too long"), OK]


def test_command_length_boundary_is_the_same_byte_by_byte() -> None:
    for length, expected in ((512, OK), (513, err("500 5.5.2 Line too long"))):
        session = session_in(State.READY)
        line = b"NOOP " + b"x" * (length - 7) + b"\r\n"
        written = [
            wire for byte in range(len(line)) for wire in converse(session, line[byte : byte + 1])
        ]
        assert written == [expected]


def test_max_command_length_is_configurable() -> None:
    session = make(Limits(max_command_length=20))
    assert converse(session, b"NOOP " + b"x" * 13 + b"\r\n") == [OK]
    assert converse(session, b"NOOP " + b"x" * 14 + b"\r\n") == [err("500 5.5.2 Line too long")]


def test_10k_command_without_newline_is_answered_once_and_skipped() -> None:
    session = session_in(State.READY)
    assert converse(session, b"X" * 10240) == [err("500 5.5.2 Line too long")]
    assert len(session._buf) == 0
    assert session.buffered == 0
    assert converse(session, b"Y" * 10240) == []
    assert len(session._buf) == 0
    # The rest of that line, up to its LF, is dropped unread; the next line is a command again.
    assert converse(session, b"QUIT still the same line\r\nNOOP\r\n") == [OK]
    assert session.bad_commands == 1
    assert session.state is State.READY


def test_10k_command_in_small_pieces_is_answered_once() -> None:
    session = session_in(State.READY)
    written: list[bytes] = []
    for _ in range(10):
        written += converse(session, b"Z" * 1024)
        assert len(session._buf) <= session.limits.max_command_length
    written += converse(session, b"\r\nNOOP\r\n")
    assert written == [err("500 5.5.2 Line too long"), OK]


def test_too_many_recipients_is_452() -> None:
    session = session_in(State.MAIL)
    session.limits = Limits(max_recipients=2)
    assert converse(
        session,
        b"RCPT TO:<a@r.example>\r\nRCPT TO:<b@r.example>\r\nRCPT TO:<c@r.example>\r\n",
    ) == [RECIPIENT_OK, RECIPIENT_OK, err("452 4.5.3 Too many recipients")]
    assert session.recipients == 2
    assert session.state is State.RCPT


def test_refused_recipients_do_not_count_towards_the_limit() -> None:
    session = make(Limits(max_recipients=1))
    exchange(session, EHLO + MAIL)
    session.receive_data(RCPT)
    assert isinstance(session.next_event(), RcptTo)
    session.send(Reply(550, "5.1.1", "No such user"))
    assert converse(session, RCPT + RCPT) == [RECIPIENT_OK, err("452 4.5.3 Too many recipients")]


def test_default_recipient_limit_is_100() -> None:
    session = session_in(State.MAIL)
    lines = b"".join(f"RCPT TO:<u{i}@r.example>\r\n".encode() for i in range(101))
    written = converse(session, lines)
    assert written[:100] == [RECIPIENT_OK] * 100
    assert written[100] == err("452 4.5.3 Too many recipients")


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1_048_576, SENDER_OK),
        (1_048_577, err("552 5.3.4 Message size exceeds fixed limit")),
    ],
)
def test_declared_size_over_limit_is_552(size: int, expected: bytes) -> None:
    session = make(Limits(max_message_size=1_048_576))
    exchange(session, EHLO)
    assert converse(session, f"MAIL FROM:<a@b.example> SIZE={size}\r\n".encode()) == [expected]
    assert session.state is (State.MAIL if expected == SENDER_OK else State.READY)
    assert session.bad_commands == 0


@pytest.mark.parametrize("limit", [3, 20])
def test_too_many_bad_commands_is_421_and_closed(limit: int) -> None:
    session = make(Limits(max_bad_commands=limit) if limit != 20 else None)
    written = converse(session, b"FOO\r\n" * limit + b"NOOP\r\n")
    assert written == [err("500 5.5.1 Command unrecognized")] * (limit - 1) + [
        err("421 4.7.0 Too many errors, closing connection")
    ]
    assert session.state is State.CLOSED


def test_every_kind_of_fault_counts_towards_421() -> None:
    session = make(Limits(max_bad_commands=5))
    [*_, (last, wire)] = exchange(
        session, MAIL + b"FOO\r\nNOOP\n" + b"NO\rOP\r\n" + b"EHLO\r\nNOOP\r\n"
    )
    assert isinstance(last, Violation)
    assert last.close is True
    assert wire == err("421 4.7.0 Too many errors, closing connection")
    assert session.state is State.CLOSED


# ---------------------------------------------------------------------------------------------
# bare CR, bare LF, NUL in commands
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"NOOP\n", "500 5.5.2 Bare LF in command; lines must end with CRLF"),
        (b"\n", "500 5.5.2 Bare LF in command; lines must end with CRLF"),
        (b"NO\rOP\r\n", "500 5.5.2 Bare CR in command"),
        (b"NOOP\r\r\n", "500 5.5.2 Bare CR in command"),
        (b"NOOP\0\r\n", "500 5.5.2 NUL in command"),
        (b"MAIL FROM:<a@b.example>\0\r\n", "500 5.5.2 NUL in command"),
    ],
)
def test_bare_cr_lf_nul_in_command_is_500_5_5_2(data: bytes, expected: str) -> None:
    session = session_in(State.READY)
    assert converse(session, data) == [err(expected)]
    assert session.state is State.READY


def test_bare_cr_cannot_hide_a_second_command() -> None:
    session = session_in(State.READY)
    events = exchange(session, b"NOOP\rMAIL FROM:<evil@x>\r\n")
    assert [type(event) for event, _ in events] == [Violation]
    assert session.state is State.READY


def test_bare_lf_cannot_hide_a_second_command() -> None:
    session = session_in(State.READY)
    events = exchange(session, b"RSET\nMAIL FROM:<evil@x>\r\n")
    # Two lines as far as LF goes: the first is refused, the second is a real, well-formed command.
    assert [type(event) for event, _ in events] == [Violation, MailFrom]
    assert events[0][1] == err("500 5.5.2 Bare LF in command; lines must end with CRLF")


# ---------------------------------------------------------------------------------------------
# STARTTLS
# ---------------------------------------------------------------------------------------------


def test_starttls_drops_pipelined_plaintext() -> None:
    session = session_in(State.READY, starttls_available=True)
    events = exchange(session, b"STARTTLS\r\nNOOP\r\n")
    assert [wire for _, wire in events] == [READY_TLS]
    assert isinstance(events[0][0], StartTls)
    assert session.discarded_after_starttls == len(b"NOOP\r\n")
    assert session.tls_active is True
    assert session.state is State.GREETED
    assert session.helo_name is None
    assert session.esmtp is False
    # EHLO again; STARTTLS is no longer offered.
    assert converse(session, MAIL) == [err("503 5.5.1 Send EHLO or HELO first")]
    assert converse(session, EHLO) == [ehlo_wire(starttls=False)]


def test_data_fed_after_the_220_is_tls_data_and_is_kept() -> None:
    """The driver switches to TLS before reading again, so bytes fed between the 220 and
    start_tls() came through TLS (a client's EHLO riding with its handshake Finished)."""
    session = session_in(State.READY, starttls_available=True)
    event, wire = one(session, b"STARTTLS\r\n")
    assert isinstance(event, StartTls)
    assert wire == READY_TLS
    assert session.state is State.TLS
    with pytest.raises(LocalProtocolError):
        session.next_event()
    session.receive_data(b"EHLO client.example\r\n")
    session.start_tls()
    assert session.discarded_after_starttls == 0
    event = session.next_event()
    assert isinstance(event, Ehlo) and event.name == "client.example"


def test_refused_starttls_keeps_pipelined_commands() -> None:
    session = session_in(State.READY, starttls_available=True)
    session.receive_data(b"STARTTLS\r\nNOOP\r\n")
    assert isinstance(session.next_event(), StartTls)
    assert session.send(Reply(454, "4.7.0", "TLS not available now")) == err(
        "454 4.7.0 TLS not available now"
    )
    assert session.state is State.READY
    assert session.discarded_after_starttls == 0
    assert converse(session, b"") == [OK]
    with pytest.raises(LocalProtocolError):
        session.start_tls()


def test_starttls_with_parameter_is_501() -> None:
    session = session_in(State.READY, starttls_available=True)
    assert converse(session, b"STARTTLS now\r\n") == [err("501 5.5.4 No parameters allowed")]
    assert session.state is State.READY
    assert session.tls_active is False


def test_starttls_under_tls_is_503() -> None:
    session = session_in(State.READY, starttls_available=True, tls_active=True)
    assert converse(session, b"STARTTLS\r\n") == [err("503 5.5.1 TLS already active")]
    assert session.state is State.READY


def test_starttls_not_available_is_502() -> None:
    session = session_in(State.READY)
    assert converse(session, b"STARTTLS\r\n") == [err("502 5.5.1 STARTTLS not available")]
    assert session.state is State.READY


def test_start_tls_without_starttls_is_a_local_error() -> None:
    session = session_in(State.READY, starttls_available=True)
    with pytest.raises(LocalProtocolError):
        session.start_tls()


MUST_TLS = err("530 5.7.0 Must issue a STARTTLS command first")


def test_require_tls_refuses_mail_until_tls() -> None:
    session = make(require_tls=True, starttls_available=True)
    assert converse(session, MAIL) == [MUST_TLS]
    assert converse(session, EHLO + b"NOOP\r\nHELP\r\n") == [
        ehlo_wire(starttls=True),
        OK,
        b"214 2.0.0 See RFC 5321\r\n",
    ]
    assert (
        converse(
            session,
            MAIL + RCPT + b"DATA\r\nVRFY bob\r\nEXPN staff\r\nBDAT 6\r\nRSET\r\n",
        )
        == [MUST_TLS] * 6
    )
    assert session.state is State.READY
    assert converse(session, b"STARTTLS\r\n") == [READY_TLS]
    assert converse(session, EHLO + MAIL) == [ehlo_wire(starttls=False), SENDER_OK]


def test_require_tls_still_allows_quit() -> None:
    session = make(require_tls=True, starttls_available=True)
    assert converse(session, EHLO + b"QUIT\r\n") == [ehlo_wire(starttls=True), BYE]
    assert session.state is State.CLOSED


def test_require_tls_is_satisfied_by_implicit_tls() -> None:
    session = make(require_tls=True, tls_active=True)
    assert converse(session, EHLO + MAIL) == [ehlo_wire(starttls=False), SENDER_OK]


# ---------------------------------------------------------------------------------------------
# every 4xx/5xx carries the session id
# ---------------------------------------------------------------------------------------------

_ZOO = [
    MAIL,
    b"FOO\r\n",
    b"NOOP\n",
    b"NO\rOP\r\n",
    b"NOOP\0\r\n",
    b"NOOP \xff\r\n",
    b"EHLO\r\n",
    b"STARTTLS\r\n",
    EHLO,
    b"EXPN staff\r\n",
    b"VRFY\r\n",
    RCPT,
    b"DATA\r\n",
    b"MAIL FROM:<bad>\r\n",
    b"MAIL FROM:<a@b.example> RET=FULL\r\n",
    b"MAIL FROM:<a@b.example> SIZE=99999999999\r\n",
    b"MAIL FROM:<a@b.example> SIZE=x\r\n",
    MAIL,
    MAIL,
    b"RCPT TO:<bad>\r\n",
    b"RCPT TO:<a@b.example> NOTIFY=NEVER\r\n",
    b"A" * 600 + b"\r\n",
    b"B" * 600,
    b"\r\n",
    RCPT,
    RCPT,
    b"DATA extra\r\n",
    b"DATA\r\n",
    b"bare\nlf\r\n.\r\n",
    MAIL + RCPT + b"BDAT 0\r\nDATA\r\n",
    b"RSET\r\n",
    b"BDAT 5\r\nhello",
    b"BDAT x\r\n",
]


def test_every_error_reply_ends_with_the_session_id() -> None:
    session = make(Limits(max_recipients=1, max_message_size=10_000_000, max_bad_commands=100))
    written: list[bytes] = []
    for data in _ZOO:
        written += converse(session, data)
    assert session.state is State.CLOSED  # BDAT x closed it
    codes = {int(wire[:3]) for wire in written}
    assert {500, 501, 502, 503, 550, 552, 555, 452}.issubset(codes), codes
    assert 421 not in codes
    for wire in written:
        last = wire.rstrip(b"\r\n").split(b"\r\n")[-1]
        if int(wire[:3]) >= 400:
            assert last.endswith(f" (id {SID})".encode()), wire
        else:
            assert b"(id " not in wire, wire


def test_421_on_too_many_errors_carries_the_id() -> None:
    session = make(Limits(max_bad_commands=1))
    assert converse(session, b"FOO\r\n") == [err("421 4.7.0 Too many errors, closing connection")]


def test_violation_and_rejected_events_say_why() -> None:
    session = session_in(State.RCPT)
    [(bad, _)] = exchange(session, b"NOOP\n")
    assert isinstance(bad, Violation)
    assert bad.reason == "bare LF in command"
    assert bad.close is False
    [_, (rejected, _)] = exchange(session, b"DATA\r\nx\ny\r\n.\r\n")
    assert isinstance(rejected, DataRejected)
    assert rejected.reason == "bare LF in message"
