"""Properties of the sans-IO SMTP core over generated input (hypothesis); a few seconds in all."""

from __future__ import annotations

import string
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from spamkiller.errors import RemoteProtocolError
from spamkiller.smtp.client import ClientSession
from spamkiller.smtp.events import (
    ConnectionClosed,
    DataRejected,
    Event,
    MessageData,
    MessageReceived,
    NeedData,
)
from spamkiller.smtp.limits import Limits
from spamkiller.smtp.replies import Reply
from spamkiller.smtp.server import ServerSession
from spamkiller.smtp.states import State

FAST = settings(max_examples=150, deadline=None)
ENVELOPE = b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"

# Fragments that steer a session through every state, mixed with arbitrary bytes.
TOKENS = [
    b"EHLO c.example\r\n",
    b"HELO c.example\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n",
    b"RCPT TO:<c@d.example>\r\n",
    "RCPT TO:<ü@d.example>\r\n".encode(),
    b"DATA\r\n",
    b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 5 LAST\r\n",
    b"BDAT x\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"STARTTLS\r\n",
    b"VRFY x\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b"\0",
    b".",
    b"..",
    b"x" * 70,
]
token = st.sampled_from(TOKENS)
# Mostly protocol fragments, so that sessions get past EHLO into transactions, DATA and BDAT.
stream = st.tuples(
    st.sampled_from([b"", TOKENS[0], ENVELOPE, ENVELOPE + b"DATA\r\n"]),
    st.lists(st.one_of(token, token, token, st.binary(max_size=12)), min_size=4, max_size=40),
).map(lambda t: t[0] + b"".join(t[1]))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points) if b > a]


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


def drain(session: ServerSession) -> tuple[list[Event], Event | NeedData | ConnectionClosed]:
    """Answer every event with its own reply, starting TLS when asked; the events, the last."""
    events: list[Event] = []
    while True:
        if session.state is State.CLOSED:
            return events, ConnectionClosed()
        event = session.next_event()
        if isinstance(event, NeedData | ConnectionClosed):
            return events, event
        events.append(event)
        session.send(event.reply)
        if session.state is State.TLS:
            session.start_tls()


def stuff(lines: list[bytes]) -> bytes:
    """RFC 5321 4.5.2 transparency, written out independently of MessageData."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


printable_line = st.binary(max_size=60).map(
    lambda b: bytes(0x20 + (c % 0x5F) for c in b)  # 0x20..0x7e
)
dotted_line = st.one_of(printable_line, printable_line.map(lambda b: b"." + b))
body_lines = st.lists(dotted_line, max_size=20)


# ---------------------------------------------------------------------------------------------
# the server never raises and never buffers without bound
# ---------------------------------------------------------------------------------------------


@FAST
@given(data=stream, cuts=cuts, starttls=st.booleans())
def test_server_survives_any_input_with_bounded_buffer(
    data: bytes, cuts: list[int], starttls: bool
) -> None:
    limits = Limits(
        max_command_length=64,
        max_message_size=300,
        max_line_length=80,
        max_recipients=3,
        max_bad_commands=50,
    )
    session = ServerSession(
        hostname="mx.test.example", session_id="PROP", limits=limits, starttls_available=starttls
    )
    session.greeting()
    held = max(limits.max_command_length, limits.max_message_size + 4)
    for piece in split(data, cuts):
        if session.state is State.CLOSED:
            return
        session.receive_data(piece)
        assert len(session._buf) <= held + len(piece)
        _, last = drain(session)
        if isinstance(last, NeedData):
            if session.state is State.DATA:
                assert len(session._buf) <= limits.max_message_size + 4
            else:
                assert len(session._buf) <= limits.max_command_length
    if session.state is State.CLOSED:
        return
    session.receive_data(b"")
    _, last = drain(session)
    assert isinstance(last, ConnectionClosed)


@FAST
@given(data=stream, cuts=cuts)
def test_server_replies_do_not_depend_on_how_input_is_split(data: bytes, cuts: list[int]) -> None:
    def run(pieces: list[bytes]) -> list[bytes]:
        session = ServerSession(
            hostname="mx.test.example",
            session_id="PROP",
            limits=Limits(max_command_length=64, max_message_size=300, max_bad_commands=50),
        )
        session.greeting()
        written: list[bytes] = []
        for piece in pieces:
            if session.state is State.CLOSED:
                break
            session.receive_data(piece)
            while session.state is not State.CLOSED:
                event = session.next_event()
                if isinstance(event, NeedData | ConnectionClosed):
                    break
                written.append(session.send(event.reply))
        return written

    assert run(split(data, cuts)) == run([data])


# ---------------------------------------------------------------------------------------------
# message transparency
# ---------------------------------------------------------------------------------------------


@FAST
@given(lines=body_lines, cuts=cuts)
def test_stuffed_message_over_data_round_trips(lines: list[bytes], cuts: list[int]) -> None:
    original = b"".join(line + b"\r\n" for line in lines)
    stuffed = stuff(lines)
    assert MessageData(raw=original).stuffed() == stuffed
    session = ServerSession(hostname="mx.test.example", session_id="PROP")
    session.greeting()
    session.receive_data(ENVELOPE + b"DATA\r\n")
    assert len(drain(session)[0]) == 4
    received: list[Event] = []
    for piece in split(stuffed + b".\r\n", cuts):
        session.receive_data(piece)
        received += drain(session)[0]
    [event] = received
    assert isinstance(event, MessageReceived)
    assert event.data.content() == original
    assert event.data.stuffed() == stuffed
    assert session.state is State.READY


@FAST
@given(lines=body_lines, delta=st.integers(min_value=-4, max_value=4), cuts=cuts)
def test_message_near_the_size_limit_is_delivered_whole_or_refused(
    lines: list[bytes], delta: int, cuts: list[int]
) -> None:
    """Whatever the reads, a message is delivered intact or refused 552: never cut short."""
    original = b"".join(line + b"\r\n" for line in lines)
    stuffed = stuff(lines)
    limit = max(len(stuffed) + delta, 0)
    wire = stuffed + b".\r\n"
    # Every way of cutting the end marker, plus the generated cuts through the text.
    for tail in range(1, 6):
        session = ServerSession(
            hostname="mx.test.example",
            session_id="PROP",
            limits=Limits(max_message_size=limit),
        )
        session.greeting()
        session.receive_data(ENVELOPE + b"DATA\r\n")
        drain(session)
        head = wire[: max(len(wire) - tail, 0)]
        received: list[Event] = []
        for piece in [*split(head, cuts), wire[len(head) :]]:
            session.receive_data(piece)
            received += drain(session)[0]
        [event] = received
        if len(stuffed) <= limit:
            assert isinstance(event, MessageReceived), (tail, event)
            assert event.data.content() == original, tail
        else:
            assert isinstance(event, DataRejected), (tail, event)
            assert event.reply.code == 552
            assert event.size == len(stuffed)


@FAST
@given(
    raw=st.binary(max_size=300).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n").replace(b"\0", b"")
    ),
    sizes=st.lists(st.integers(min_value=0, max_value=80), max_size=6),
)
def test_bdat_chunks_round_trip(raw: bytes, sizes: list[int]) -> None:
    chunks: list[bytes] = []
    rest = raw
    for size in sizes:
        chunks.append(rest[:size])
        rest = rest[size:]
    chunks.append(rest)
    stream_ = b"".join(
        f"BDAT {len(c)}{' LAST' if i == len(chunks) - 1 else ''}\r\n".encode() + c
        for i, c in enumerate(chunks)
    )
    session = ServerSession(hostname="mx.test.example", session_id="PROP")
    session.greeting()
    session.receive_data(ENVELOPE + stream_)
    events, _ = drain(session)
    message = events[-1]
    lines_ok = all(len(line) <= 998 for line in raw.split(b"\r\n"))
    if lines_ok:
        assert isinstance(message, MessageReceived)
        assert message.data.content() == raw
        assert MessageData(stuffed=message.data.stuffed()).content() == (
            raw if raw.endswith(b"\r\n") or not raw else raw + b"\r\n"
        )
    assert len(events) == 3 + len(chunks)


# ---------------------------------------------------------------------------------------------
# the client role
# ---------------------------------------------------------------------------------------------


@FAST
@given(data=st.one_of(stream, st.binary(max_size=400)), cuts=cuts)
def test_client_raises_only_remote_protocol_error(data: bytes, cuts: list[int]) -> None:
    client = ClientSession(limits=Limits(max_reply_line_length=100, max_reply_lines=5))
    try:
        for piece in split(data, cuts):
            client.receive_data(piece)
            while True:
                reply = client.next_reply()
                if isinstance(reply, NeedData | ConnectionClosed):
                    break
                assert isinstance(reply, Reply)
                assert "\r" not in "".join(reply.lines) and "\n" not in "".join(reply.lines)
                if client.state is State.GREETED:
                    client.ehlo("relay.example")
                elif client.state is State.READY:
                    client.noop()
            assert client.unread <= 100 * 5 + len(piece)
    except RemoteProtocolError:
        pass


word = st.text(
    alphabet=string.ascii_letters + string.digits + "-.,:;()[]<>=", min_size=1, max_size=10
)
reply_text = st.lists(word, max_size=5).map(" ".join).filter(lambda t: not t[:1].isdigit())


@FAST
@given(
    code=st.integers(min_value=200, max_value=599),
    detail=st.tuples(st.integers(0, 999), st.integers(0, 999)),
    with_enhanced=st.booleans(),
    lines=st.lists(reply_text, min_size=1, max_size=6),
    cuts=cuts,
)
def test_reply_wire_parses_back_to_itself(
    code: int, detail: tuple[int, int], with_enhanced: bool, lines: list[str], cuts: list[int]
) -> None:
    enhanced = ""
    if with_enhanced and code // 100 in (2, 4, 5):
        enhanced = f"{code // 100}.{detail[0]}.{detail[1]}"
    original = Reply(code, enhanced, lines[0] if len(lines) == 1 else tuple(lines))
    client = ClientSession()
    parsed: list[Reply] = []
    for piece in split(original.wire, cuts):
        client.receive_data(piece)
        reply = client.next_reply()
        if isinstance(reply, Reply):
            parsed.append(reply)
    assert parsed == [original]
    assert client.unread == 0
