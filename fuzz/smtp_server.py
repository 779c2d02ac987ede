"""Coverage-guided fuzzing of the sans-IO SMTP server session (command and DATA/BDAT parsers).

Run:  .venv/bin/python fuzz/smtp_server.py -max_total_time=600 fuzz/corpus/server
The input's first byte picks the session's flags and how the rest is cut into reads. Every event
is answered with the session's own reply, like a driver that accepts everything; STARTTLS is
"completed" at once. Invariants: no exception escapes, the unprocessed buffer stays bounded, and
an accepted message's content round-trips through its stuffed form (plus the CRLF a BDAT
message without one gains on its way to a DATA upstream).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from spamkiller.smtp.events import ConnectionClosed, MessageData, MessageReceived, NeedData
    from spamkiller.smtp.limits import Limits
    from spamkiller.smtp.server import ServerSession
    from spamkiller.smtp.states import State

LIMITS = Limits(max_message_size=4096, max_recipients=5, max_bad_commands=50)


def one_input(data: bytes) -> None:
    if not data:
        return
    flags, payload = data[0], data[1:]
    session = ServerSession(
        hostname="mx.fuzz.example",
        session_id="FUZZ",
        limits=LIMITS,
        starttls_available=bool(flags & 1),
        require_tls=bool(flags & 2),
    )
    session.greeting()
    step = (flags >> 2) + 1  # 1..64 octets per read
    reads = [payload[i : i + step] for i in range(0, len(payload), step)] + [b""]
    for chunk in reads:
        session.receive_data(chunk)
        while session.state is not State.CLOSED:
            event = session.next_event()
            if isinstance(event, NeedData | ConnectionClosed):
                break
            if isinstance(event, MessageReceived):
                content = event.data.content()
                again = MessageData(raw=content).stuffed()
                # A BDAT message may lack a final CRLF; relayed over DATA it gains one.
                if content and not content.endswith(b"\r\n"):
                    content += b"\r\n"
                assert MessageData(stuffed=again).content() == content
            session.send(event.reply)
            if session.state is State.TLS:
                session.start_tls()
        # Whatever the input, unprocessed bytes never exceed one read past the command limit.
        assert session.buffered <= LIMITS.max_command_length + step + 2, session.buffered
        if session.state is State.CLOSED:
            return


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
