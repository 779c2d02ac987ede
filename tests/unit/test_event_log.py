"""The log line format: key=value pairs a client cannot break out of, and JSON."""

from __future__ import annotations

import io
import json

import pytest

from spamkiller.observability.logging import EventLog


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
