"""Coverage-guided fuzzing of the sans-IO SMTP client's reply parser (what an upstream sends us).

Run:  .venv/bin/python fuzz/smtp_client.py -max_total_time=600 fuzz/corpus/client
Invariant: hostile reply bytes raise RemoteProtocolError or parse; never any other exception.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from spamkiller.errors import RemoteProtocolError
    from spamkiller.smtp.client import ClientSession
    from spamkiller.smtp.events import ConnectionClosed, NeedData
    from spamkiller.smtp.limits import Limits

LIMITS = Limits(max_reply_line_length=512, max_reply_lines=20)


def one_input(data: bytes) -> None:
    client = ClientSession(limits=LIMITS)
    client.receive_data(data)
    client.receive_data(b"")
    try:
        while True:
            reply = client.next_reply()
            if isinstance(reply, NeedData | ConnectionClosed):
                return
            if client.waiting == 0:
                client.receive_data(b"")  # nothing more is owed: the next reply is unexpected
    except RemoteProtocolError:
        return


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
