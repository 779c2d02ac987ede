"""ServerSession message transfer: DATA, dot-stuffing, smuggling, size and line limits, BDAT."""

from __future__ import annotations

import pytest

from spamkiller.smtp.events import (
    Answer,
    BdatChunk,
    ConnectionClosed,
    DataCommand,
    DataRejected,
    Event,
    MailFrom,
    MessageData,
    MessageReceived,
    NeedData,
    Quit,
    RcptTo,
    Reset,
    Violation,
)
from spamkiller.smtp.limits import Limits, MiB
from spamkiller.smtp.replies import Reply
from spamkiller.smtp.server import NEED_DATA, ServerSession
from spamkiller.smtp.states import State

SID = "D4TA"
ENVELOPE = (
    b"EHLO client.example\r\nMAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@rcpt.example>\r\n"
)
ACCEPTED = b"250 2.0.0 Message accepted\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"


def exchange(session: ServerSession, data: bytes) -> list[tuple[Event, bytes]]:
    """Feed `data` (b"" feeds nothing), answer each event with its own reply; (event, wire)."""
    if data:
        session.receive_data(data)
    out: list[tuple[Event, bytes]] = []
    while session.state is not State.CLOSED:
        event = session.next_event()
        if isinstance(event, NeedData | ConnectionClosed):
            break
        out.append((event, session.send(event.reply)))
    return out


def converse(session: ServerSession, data: bytes) -> list[bytes]:
    return [wire for _, wire in exchange(session, data)]


def err(line: str) -> bytes:
    return f"{line} (id {SID})\r\n".encode()


def in_rcpt(limits: Limits | None = None) -> ServerSession:
    """A session with one accepted recipient, ready for DATA or BDAT."""
    session = ServerSession(hostname="mx.test.example", session_id=SID, limits=limits)
    session.greeting()
    assert len(converse(session, ENVELOPE)) == 3
    assert session.state is State.RCPT
    return session


def in_data(limits: Limits | None = None) -> ServerSession:
    session = in_rcpt(limits)
    assert converse(session, b"DATA\r\n") == [GO_AHEAD]
    assert session.state is State.DATA
    return session


def only_message(events: list[tuple[Event, bytes]]) -> MessageReceived:
    [(event, wire)] = events
    assert isinstance(event, MessageReceived)
    assert wire == ACCEPTED
    return event


def rfc5321_unstuff(wire: bytes) -> bytes:
    """What any RFC 5321 4.5.2 receiver (the upstream) makes of dot-stuffed text."""
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


# ---------------------------------------------------------------------------------------------
# DATA and dot-stuffing
# ---------------------------------------------------------------------------------------------


def test_data_message_is_received_and_transaction_ends() -> None:
    session = in_data()
    message = only_message(exchange(session, b"Subject: hi\r\n\r\nHello.\r\n.\r\n"))
    assert message.data.content() == b"Subject: hi\r\n\r\nHello.\r\n"
    assert message.data.stuffed() == b"Subject: hi\r\n\r\nHello.\r\n"
    assert message.data.size == len(b"Subject: hi\r\n\r\nHello.\r\n")
    assert session.state is State.READY
    assert session.recipients == 0
    assert converse(session, b"RCPT TO:<x@y.example>\r\n") == [err("503 5.5.1 Send MAIL first")]


def test_only_the_final_dot_is_an_empty_message() -> None:
    session = in_data()
    message = only_message(exchange(session, b".\r\n"))
    assert message.data.content() == b""
    assert message.data.stuffed() == b""
    assert message.data.size == 0


def test_leading_dot_lines_are_unstuffed_and_kept_stuffed_for_relay() -> None:
    session = in_data()
    wire = b"..first\r\nplain\r\n..\r\n...\r\nmid.dle\r\n..\r\n"
    message = only_message(exchange(session, wire + b".\r\n"))
    assert message.data.stuffed() == wire
    assert message.data.content() == b".first\r\nplain\r\n.\r\n..\r\nmid.dle\r\n.\r\n"


def test_message_and_next_command_in_one_write() -> None:
    session = in_rcpt()
    events = exchange(session, b"DATA\r\nbody\r\n.\r\nQUIT\r\n")
    assert [type(event) for event, _ in events] == [DataCommand, MessageReceived, Quit]
    message = events[1][0]
    assert isinstance(message, MessageReceived)
    assert message.data.content() == b"body\r\n"


def test_dot_line_inside_text_is_not_the_end() -> None:
    session = in_data()
    events = exchange(session, b"a\r\n.x\r\n. \r\n .\r\n")
    assert events == []
    assert session.state is State.DATA
    message = only_message(exchange(session, b"end\r\n.\r\n"))
    assert message.data.stuffed() == b"a\r\n.x\r\n. \r\n .\r\nend\r\n"


def test_lone_leading_dot_is_seen_as_the_upstream_will_see_it() -> None:
    """RFC 5321 4.5.2: a receiver deletes the first '.' of any line that starts with one.

    The relay writes stuffed() upstream as received, so the upstream stores "From: evil"; the
    filters read content(). The two must agree, or a header hides from every check.
    """
    session = in_data()
    wire = b"From: good@sender.example\r\n.From: evil@attacker.example\r\n\r\nbody\r\n"
    message = only_message(exchange(session, wire + b".\r\n"))
    assert message.data.content() == rfc5321_unstuff(message.data.stuffed())


@pytest.mark.parametrize(
    ("raw", "stuffed"),
    [
        (b"", b""),
        (b"a\r\n", b"a\r\n"),
        (b".\r\n", b"..\r\n"),
        (b"..\r\n", b"...\r\n"),
        (b".a\r\n.b\r\n", b"..a\r\n..b\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"x\r\n..\r\n...\r\n", b"x\r\n...\r\n....\r\n"),
        (b"a.b\r\n\r\n", b"a.b\r\n\r\n"),
    ],
)
def test_message_data_stuffing_round_trips(raw: bytes, stuffed: bytes) -> None:
    assert MessageData(raw=raw).stuffed() == stuffed
    assert MessageData(raw=raw).content() == raw
    assert MessageData(stuffed=stuffed).content() == raw
    assert MessageData(stuffed=stuffed).stuffed() == stuffed
    assert rfc5321_unstuff(stuffed) == raw
    assert MessageData(stuffed=stuffed).size == len(stuffed)
    assert MessageData(raw=raw).size == len(raw)


def test_message_data_stuffed_adds_missing_final_crlf_to_raw() -> None:
    data = MessageData(raw=b"one\r\n.two")
    assert data.stuffed() == b"one\r\n..two\r\n"
    assert data.content() == b"one\r\n.two"
    assert data.size == len(b"one\r\n.two")


@pytest.mark.parametrize("kwargs", [{}, {"raw": b"a", "stuffed": b"a"}])
def test_message_data_needs_exactly_one_form(kwargs: dict[str, bytes]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        MessageData(**kwargs)


def test_final_dot_split_at_every_offset() -> None:
    stream = b"DATA\r\nSubject: s\r\n\r\nline\r\n..dot\r\n.\r\nNOOP\r\n"
    expected = b"Subject: s\r\n\r\nline\r\n.dot\r\n"
    for cut in range(1, len(stream)):
        session = in_rcpt()
        events = exchange(session, stream[:cut]) + exchange(session, stream[cut:])
        kinds = [type(event).__name__ for event, _ in events]
        assert kinds == ["DataCommand", "MessageReceived", "Answer"], cut
        message = events[1][0]
        assert isinstance(message, MessageReceived)
        assert message.data.content() == expected, cut


def test_message_byte_by_byte() -> None:
    session = in_data()
    text = b"Subject: s\r\n\r\n..a\r\nb\r\n"
    events: list[tuple[Event, bytes]] = []
    for byte in text + b".\r\n":
        events += exchange(session, bytes([byte]))
    assert only_message(events).data.content() == b"Subject: s\r\n\r\n.a\r\nb\r\n"


# ---------------------------------------------------------------------------------------------
# SMTP smuggling: the ten endings (CVE-2023-51764/5/6, CVE-2024-27305)
# ---------------------------------------------------------------------------------------------

BARE_LF = "550 5.5.2 Message contains a bare LF; lines must end with CRLF"
BARE_CR = "550 5.5.2 Message contains a bare CR; lines must end with CRLF"
NUL = "550 5.5.2 Message contains a NUL octet"

ENDINGS = [
    (b"\n.\n", BARE_LF),
    (b"\r.\r", BARE_CR),
    (b"\r.\n", BARE_LF),
    (b"\n.\r", BARE_LF),
    (b"\n.\r\n", BARE_LF),
    (b"\r\n.\n", BARE_LF),
    (b"\r.\r\n", BARE_CR),
    (b"\r\n.\r", BARE_CR),
    (b"\r\n\0.\r\n", NUL),
    (b"\r\n.\0\r\n", NUL),
]
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "byte-by-byte"])
@pytest.mark.parametrize(("ending", "expected"), ENDINGS, ids=[repr(e) for e, _ in ENDINGS])
def test_smuggled_message_is_rejected_whole(ending: bytes, expected: str, bytewise: bool) -> None:
    session = in_data()
    stream = b"Subject: test\r\n\r\nhello" + ending + SMUGGLED + b"\r\n.\r\n"
    after = b"RCPT TO:<late@y>\r\n"
    events: list[tuple[Event, bytes]] = []
    if bytewise:
        for i in range(len(stream)):
            events += exchange(session, stream[i : i + 1])
    else:
        events += exchange(session, stream)
    events += exchange(session, after)
    assert [type(event) for event, _ in events] == [DataRejected, Violation]
    assert not any(isinstance(event, MailFrom | RcptTo | DataCommand) for event, _ in events)
    rejected = events[0][0]
    assert isinstance(rejected, DataRejected)
    assert rejected.size == len(b"Subject: test\r\n\r\nhello" + ending + SMUGGLED + b"\r\n")
    assert [wire for _, wire in events] == [err(expected), err("503 5.5.1 Send MAIL first")]
    assert session.state is State.READY


def test_bare_lf_in_headers_is_rejected() -> None:
    session = in_data()
    assert converse(session, b"Subject: a\nBcc: x@y.example\r\n\r\nbody\r\n.\r\n") == [err(BARE_LF)]
    assert session.state is State.READY


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"a\rb\r\n", BARE_CR),
        (b"trailing\r\r\n", BARE_CR),
        (b"nul\0here\r\n", NUL),
        (b"lf\n\r\n", BARE_LF),
    ],
)
def test_bare_cr_lf_nul_in_message_is_550(text: bytes, expected: str) -> None:
    session = in_data()
    [(event, wire)] = exchange(session, text + b".\r\n")
    assert isinstance(event, DataRejected)
    assert wire == err(expected)


# ---------------------------------------------------------------------------------------------
# line length and size in DATA
# ---------------------------------------------------------------------------------------------


def test_line_of_1000_octets_is_accepted() -> None:
    session = in_data()
    line = b"a" * 998 + b"\r\n"
    assert only_message(exchange(session, line + b".\r\n")).data.content() == line


def test_line_longer_than_1000_octets_is_550() -> None:
    session = in_data()
    line = b"a" * 999 + b"\r\n"
    [(event, wire)] = exchange(session, b"short\r\n" + line + b"short\r\n.\r\n")
    assert isinstance(event, DataRejected)
    assert wire == err("550 5.5.2 Message contains a line longer than 1000 octets")


def test_line_limit_follows_configuration() -> None:
    session = in_data(Limits(max_line_length=100))
    assert converse(session, b"b" * 99 + b"\r\n.\r\n") == [
        err("550 5.5.2 Message contains a line longer than 100 octets")
    ]


@pytest.mark.parametrize(
    ("size", "accepted"), [(100, True), (101, False)], ids=["at-limit", "over-limit"]
)
def test_message_size_boundary(size: int, accepted: bool) -> None:
    session = in_data(Limits(max_message_size=100))
    text = b"a" * (size - 2) + b"\r\n"
    [(event, wire)] = exchange(session, text + b".\r\n")
    if accepted:
        assert isinstance(event, MessageReceived)
        assert event.data.content() == text
    else:
        assert isinstance(event, DataRejected)
        assert event.size == size
        assert wire == err("552 5.3.4 Message size exceeds fixed limit")


@pytest.mark.parametrize(
    ("size", "tail"),
    [(100, b"."), (100, b".\r"), (99, b".\r"), (99, b"."), (98, b".\r")],
)
def test_message_near_size_limit_with_end_split_across_reads_is_intact(
    size: int, tail: bytes
) -> None:
    """Part of the final ".\r\n" arriving with the text must not cost the text: the message is
    within the limit, so it is delivered whole (never truncated and accepted)."""
    session = in_data(Limits(max_message_size=100))
    text = b"a" * (size - 2) + b"\r\n"
    assert exchange(session, text + tail) == []
    [(event, wire)] = exchange(session, b".\r\n"[len(tail) :])
    assert wire == ACCEPTED
    assert isinstance(event, MessageReceived)
    assert event.data.content() == text


def test_oversized_data_is_read_to_the_end_with_a_small_buffer() -> None:
    limit = 1 * MiB
    session = in_data(Limits(max_message_size=limit))
    piece = (b"x" * 78 + b"\r\n") * 818 + b"y" * 94 + b"\r\n"  # 64 KiB of CRLF lines
    assert len(piece) == 64 * 1024
    events: list[tuple[Event, bytes]] = []
    for i in range(48):  # 3 MiB
        events += exchange(session, piece)
        assert len(session._buf) <= limit + len(piece) + 4
        if (i + 1) * len(piece) > limit + len(piece):
            assert len(session._buf) <= 4
    assert events == []
    assert session.state is State.DATA
    events = exchange(session, b".\r\nNOOP\r\n")
    assert [type(event) for event, _ in events] == [DataRejected, Answer]
    rejected = events[0][0]
    assert isinstance(rejected, DataRejected)
    assert rejected.size == 48 * len(piece)
    assert [wire for _, wire in events] == [
        err("552 5.3.4 Message size exceeds fixed limit"),
        b"250 2.0.0 OK\r\n",
    ]
    assert session.state is State.READY


def test_oversized_data_keeps_looking_for_an_end_split_across_reads() -> None:
    session = in_data(Limits(max_message_size=10))
    events = exchange(session, b"z" * 50 + b"\r\n.")
    assert events == []
    assert len(session._buf) <= 4
    assert converse(session, b"\r\n") == [err("552 5.3.4 Message size exceeds fixed limit")]


# ---------------------------------------------------------------------------------------------
# BDAT (RFC 3030)
# ---------------------------------------------------------------------------------------------


def test_bdat_chunks_make_one_message() -> None:
    session = in_rcpt()
    events = exchange(session, b"BDAT 5\r\nhelloBDAT 8 LAST\r\n world\r\n")
    assert [wire for _, wire in events] == [b"250 2.0.0 5 octets received\r\n", ACCEPTED]
    chunk, message = (event for event, _ in events)
    assert isinstance(chunk, BdatChunk)
    assert chunk.size == 5
    assert isinstance(message, MessageReceived)
    assert message.data.content() == b"hello world\r\n"
    assert message.data.size == 13
    assert session.state is State.READY


def test_bdat_content_with_dot_lines_is_stuffed_for_relay() -> None:
    session = in_rcpt()
    raw = b"a\r\n.\r\nMAIL FROM:<evil@x>\r\n.b"
    [(event, _)] = exchange(session, f"BDAT {len(raw)} LAST\r\n".encode() + raw)
    assert isinstance(event, MessageReceived)
    assert event.data.content() == raw
    assert event.data.stuffed() == b"a\r\n..\r\nMAIL FROM:<evil@x>\r\n..b\r\n"


def test_bdat_payload_is_never_read_as_commands() -> None:
    session = in_rcpt()
    payload = b"RSET\r\nQUIT\r\n"
    events = exchange(session, f"BDAT {len(payload)}\r\n".encode() + payload)
    assert [type(event) for event, _ in events] == [BdatChunk]
    assert session.state is State.BDAT


def test_bdat_zero_last_ends_the_message() -> None:
    session = in_rcpt()
    events = exchange(session, b"BDAT 3\r\nabcBDAT 0 LAST\r\n")
    assert [wire for _, wire in events] == [b"250 2.0.0 3 octets received\r\n", ACCEPTED]
    message = events[1][0]
    assert isinstance(message, MessageReceived)
    assert message.data.content() == b"abc"


def test_bdat_zero_last_alone_is_an_empty_message() -> None:
    session = in_rcpt()
    message = only_message(exchange(session, b"bdat 0 last\r\n"))
    assert message.data.content() == b""
    assert message.data.stuffed() == b""


def test_bdat_chunk_split_across_reads() -> None:
    session = in_rcpt()
    stream = b"BDAT 10 LAST\r\n0123456789NOOP\r\n"
    events: list[tuple[Event, bytes]] = []
    for i in range(len(stream)):
        events += exchange(session, stream[i : i + 1])
    assert [wire for _, wire in events] == [ACCEPTED, b"250 2.0.0 OK\r\n"]
    message = events[0][0]
    assert isinstance(message, MessageReceived)
    assert message.data.content() == b"0123456789"


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n", "503 5.5.1 Send RCPT first"),
        (b"EHLO c.example\r\n", "503 5.5.1 Send MAIL first"),
        (b"", "503 5.5.1 Send EHLO or HELO first"),
    ],
)
def test_bdat_out_of_sequence_consumes_its_chunk(setup: bytes, expected: str) -> None:
    session = ServerSession(hostname="mx.test.example", session_id=SID)
    session.greeting()
    converse(session, setup)
    state = session.state
    payload = b"RSET\r\nNOOP\r\n"
    events = exchange(session, f"BDAT {len(payload)} LAST\r\n".encode() + payload)
    assert [wire for _, wire in events] == [err(expected)]
    assert not any(isinstance(event, Reset) for event, _ in events)
    assert session.state is state


def test_refused_bdat_chunk_does_not_count_towards_the_next_message() -> None:
    session = ServerSession(
        hostname="mx.test.example", session_id=SID, limits=Limits(max_message_size=100)
    )
    session.greeting()
    converse(session, b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert converse(session, b"BDAT 80\r\n" + b"r" * 80) == [err("503 5.5.1 Send RCPT first")]
    assert converse(session, b"RCPT TO:<c@d.example>\r\n") == [b"250 2.1.5 Recipient OK\r\n"]
    [(event, wire)] = exchange(session, b"BDAT 50 LAST\r\n" + b"m" * 50)
    assert wire == ACCEPTED
    assert isinstance(event, MessageReceived)
    assert event.data.content() == b"m" * 50


@pytest.mark.parametrize(
    "line",
    [
        b"BDAT\r\n",
        b"BDAT x\r\n",
        b"BDAT -1\r\n",
        b"BDAT 10 LAS\r\n",
        b"BDAT 10 LAST extra\r\n",
        b"BDAT 12345678901234567890\r\n",
        b"BDAT 1.5\r\n",
    ],
)
def test_bad_bdat_syntax_closes(line: bytes) -> None:
    session = in_rcpt()
    [(event, wire)] = exchange(session, line + b"NOOP\r\n")
    assert isinstance(event, Violation)
    assert event.close is True
    assert wire == err("501 5.5.4 Syntax: BDAT <size> [LAST]; closing connection")
    assert session.state is State.CLOSED


def test_bdat_message_with_bare_lf_is_550() -> None:
    session = in_rcpt()
    raw = b"Subject: a\nb\r\n"
    [(event, wire)] = exchange(session, f"BDAT {len(raw)} LAST\r\n".encode() + raw)
    assert isinstance(event, DataRejected)
    assert wire == err(BARE_LF)
    assert session.state is State.READY


def test_bdat_message_with_nul_or_bare_cr_is_550() -> None:
    for raw, expected in ((b"a\0b", NUL), (b"a\rb", BARE_CR)):
        session = in_rcpt()
        assert converse(session, f"BDAT {len(raw)} LAST\r\n".encode() + raw) == [err(expected)]


@pytest.mark.parametrize(
    ("chunks", "accepted"),
    [((6, 4), True), ((6, 5), False), ((11,), False)],
    ids=["at-limit", "second-chunk-over", "first-chunk-over"],
)
def test_bdat_size_over_limit_is_552(chunks: tuple[int, ...], accepted: bool) -> None:
    session = in_rcpt(Limits(max_message_size=10))
    stream = b""
    for i, size in enumerate(chunks):
        last = " LAST" if i == len(chunks) - 1 else ""
        stream += f"BDAT {size}{last}\r\n".encode() + b"c" * size
    events = exchange(session, stream)
    final, wire = events[-1]
    if accepted:
        assert isinstance(final, MessageReceived)
        assert final.data.content() == b"c" * 10
    else:
        assert isinstance(final, DataRejected)
        assert final.size == sum(chunks)
        assert wire == err("552 5.3.4 Message size exceeds fixed limit")
    assert session.state is State.READY


def test_oversized_bdat_chunk_is_consumed_without_buffering() -> None:
    session = in_rcpt(Limits(max_message_size=1000))
    session.receive_data(b"BDAT 100000\r\n")
    assert session.next_event() is NEED_DATA
    for _ in range(9):
        session.receive_data(b"q" * 10000)
        assert session.next_event() is NEED_DATA
        assert len(session._buf) == 0
        assert len(session._bdat_buf) <= 1000
    assert converse(session, b"q" * 10000 + b"NOOP\r\n") == [
        err("552 5.3.4 Message size exceeds fixed limit"),
        b"250 2.0.0 OK\r\n",
    ]
    assert session.state is State.READY


def test_failed_bdat_chunk_ends_the_transaction() -> None:
    session = in_rcpt()
    session.receive_data(b"BDAT 3\r\nabcBDAT 3 LAST\r\ndef")
    event = session.next_event()
    assert isinstance(event, BdatChunk)
    assert session.send(event.reply) == b"250 2.0.0 3 octets received\r\n"
    event = session.next_event()
    assert isinstance(event, MessageReceived)
    assert session.send(Reply(451, "4.3.0", "Upstream unavailable")) == err(
        "451 4.3.0 Upstream unavailable"
    )
    assert session.state is State.READY
    assert converse(session, b"BDAT 2 LAST\r\nxy") == [err("503 5.5.1 Send MAIL first")]


def test_chunks_pipelined_after_a_failed_bdat_are_discarded_without_closing() -> None:
    """RFC 3030 2: after a failed BDAT the server "MUST be prepared to accept and discard" the
    chunks already in the pipeline; discarding them must not count towards the error limit."""
    session = in_rcpt(Limits(max_message_size=10, max_bad_commands=3))
    stream = b"BDAT 20\r\n" + b"o" * 20 + b"BDAT 1\r\nx" * 5 + b"BDAT 1 LAST\r\nx" + b"NOOP\r\n"
    written = converse(session, stream)
    assert written[0] == err("552 5.3.4 Message size exceeds fixed limit")
    assert all(wire[:1] == b"5" for wire in written[1:-1])
    assert written[-1] == b"250 2.0.0 OK\r\n"
    assert session.state is State.READY


def test_chunk_refused_by_the_driver_ends_the_transaction() -> None:
    session = in_rcpt()
    session.receive_data(b"BDAT 4\r\nabcdBDAT 4 LAST\r\nefgh")
    event = session.next_event()
    assert isinstance(event, BdatChunk)
    assert session.send(Reply(452, "4.3.1", "Insufficient storage")) == err(
        "452 4.3.1 Insufficient storage"
    )
    assert session.state is State.READY
    assert converse(session, b"") == [err("503 5.5.1 Send MAIL first")]
    assert session.next_event() is NEED_DATA


def test_data_after_bdat_is_503_and_bdat_continues() -> None:
    session = in_rcpt()
    events = exchange(session, b"BDAT 2\r\nabDATA\r\nBDAT 2 LAST\r\ncd")
    assert [wire for _, wire in events] == [
        b"250 2.0.0 2 octets received\r\n",
        err("503 5.5.1 DATA not allowed after BDAT"),
        ACCEPTED,
    ]
    message = events[2][0]
    assert isinstance(message, MessageReceived)
    assert message.data.content() == b"abcd"
