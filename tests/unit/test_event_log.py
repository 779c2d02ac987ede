"""The log line format: key=value pairs a client cannot break out of, and JSON."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from spamkiller.observability.logging import FLUSH_DELAY, MAX_PENDING, EventLog


def one_line(fields: dict[str, object], fmt: str = "text") -> str:
    stream = io.StringIO()
    EventLog(stream, fmt=fmt).line("0123456789", "connect", fields)  # no loop: written at once
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text[:-1]


def test_fields_in_order_none_left_out_numbers_bare() -> None:
    text = one_line({"client": "[192.0.2.1]:25", "proxy": None, "size": 5120, "ok": True})
    assert text.split(": ", 2)[1:] == [
        "0123456789",
        "connect client=[192.0.2.1]:25 size=5120 ok=True",
    ]


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("quit", "quit"),
        ("client closed", '"client closed"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ('a\\b "c"', '"a\\\\b \\"c\\""'),
        ("back\\slash", "back\\slash"),  # nothing to quote: written as it is
        ("bøb@exämple.org", "bøb@exämple.org"),  # printable non-ASCII stays
    ],
)
def test_values_are_quoted_only_when_they_must_be(value: str, written: str) -> None:
    assert one_line({"v": value}).endswith(f"connect v={written}")


@pytest.mark.parametrize(
    "attack",
    [
        "mx.example\r\n2026-01-01T00:00:00Z sk[1]: FAKE: message status=sent",
        "mx.example\n2026-01-01T00:00:00Z sk[1]: FAKE: message status=sent",
        "mx.example\x1b[2Jcleared",
        "mx.example\u2028line separator",
        "mx.example\x85next line",
        "mx.example\x00nul\x7fdel",
    ],
)
def test_a_client_value_cannot_start_a_line_of_its_own(attack: str) -> None:
    text = one_line({"helo": attack, "status": "ok"})
    assert text.splitlines() == [text]  # no character any reader takes for a line break
    assert text.isprintable()
    assert text.endswith(" status=ok")
    assert 'helo="mx.example' in text


def test_json_lines_keep_values_exact_and_escaped() -> None:
    attack = "a\r\nb\u2028c"
    text = one_line({"helo": attack, "size": 7, "proxy": None}, fmt="json")
    assert text.splitlines() == [text]
    record = json.loads(text)
    assert record["helo"] == attack and record["size"] == 7 and "proxy" not in record
    assert record["id"] == "0123456789" and record["event"] == "connect"


class CountingStream(io.StringIO):
    """Counts the writes that reach the stream: each is one write(2) on a real stdout."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_of_many_sessions_share_one_write_within_the_flush_delay() -> None:
    stream = CountingStream()
    log = EventLog(stream)

    async def sessions() -> int:
        for n in range(3):
            log.line(f"S{n}", "connect", {"client": "[192.0.2.1]:25"})
            await asyncio.sleep(0)  # other loop iterations: the lines still wait for each other
        waiting = stream.writes
        await asyncio.sleep(FLUSH_DELAY * 2)
        return waiting

    assert asyncio.run(sessions()) == 0
    assert stream.writes == 1
    assert [line.split(": ")[1] for line in stream.getvalue().splitlines()] == ["S0", "S1", "S2"]


def test_a_full_batch_is_written_at_once_and_flush_writes_the_rest() -> None:
    stream = CountingStream()
    log = EventLog(stream)

    async def burst() -> None:
        for n in range(MAX_PENDING + 1):
            log.line(f"{n}", "connect", {})

    asyncio.run(burst())  # the loop ends before the delay: the last line is still waiting
    assert stream.writes == 1 and stream.getvalue().count("\n") == MAX_PENDING
    log.flush()  # what a worker does as it stops
    assert stream.writes == 2 and stream.getvalue().count("\n") == MAX_PENDING + 1
