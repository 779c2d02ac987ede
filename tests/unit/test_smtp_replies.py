"""Reply: the wire form every SMTP answer of ours takes, and what it refuses to carry."""

from __future__ import annotations

import pytest

from spamkiller.smtp import replies
from spamkiller.smtp.replies import Reply


def test_one_line_wire() -> None:
    assert Reply(250, "2.1.0", "Sender OK").wire == b"250 2.1.0 Sender OK\r\n"
    assert Reply(354, "", "Go ahead").wire == b"354 Go ahead\r\n"


def test_empty_text_has_no_trailing_space() -> None:
    assert Reply(250).wire == b"250\r\n"
    assert Reply(250, "2.0.0").wire == b"250 2.0.0\r\n"


def test_multi_line_wire_puts_enhanced_code_on_each_line() -> None:
    reply = Reply(550, "5.7.1", ("first", "second", "third"))
    assert reply.wire == b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n"
    assert reply.lines == ("first", "second", "third")


def test_multi_line_without_enhanced_code() -> None:
    assert Reply(250, "", ("mx", "PIPELINING")).wire == b"250-mx\r\n250 PIPELINING\r\n"


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\0b", "ok\r\n250 injected"])
def test_text_with_cr_lf_nul_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        Reply(250, "2.0.0", bad)
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        Reply(250, "2.0.0", ("fine", bad))


@pytest.mark.parametrize("code", [0, 199, 600, 1000, -250])
def test_code_out_of_range_is_refused(code: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Reply(code, "", "x")


def test_with_id_goes_on_the_last_line() -> None:
    assert Reply(550, "5.1.1", "No such user").with_id("AB12").wire == (
        b"550 5.1.1 No such user (id AB12)\r\n"
    )
    assert Reply(421, "4.7.0", ("a", "b")).with_id("AB12").wire == (
        b"421-4.7.0 a\r\n421 4.7.0 b (id AB12)\r\n"
    )
    assert Reply(451, "4.3.0", "").with_id("AB12").wire == b"451 4.3.0 (id AB12)\r\n"


def test_with_id_refuses_an_id_that_would_inject_a_line() -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        Reply(550, "5.0.0", "no").with_id("x\r\n250 ok")


def test_classification() -> None:
    assert replies.OK.is_positive
    assert not replies.OK.is_transient
    assert replies.TOO_MANY_RECIPIENTS.is_transient
    assert not replies.TOO_MANY_RECIPIENTS.is_permanent
    assert replies.MESSAGE_TOO_BIG.is_permanent
    assert not replies.MESSAGE_TOO_BIG.is_positive


def test_equality_ignores_wire_and_str_is_one_line() -> None:
    assert Reply(250, "2.0.0", "OK") == replies.OK
    assert str(Reply(250, "", ("a", "b"))) == "250-a / 250 b"


def test_explicit_wire_is_kept() -> None:
    assert Reply(250, "", "x").wire == b"250 x\r\n"


@pytest.mark.parametrize(
    ("reply", "prefix"),
    [
        (replies.TOO_LONG, b"500 5.5.2 "),
        (replies.BARE_LF, b"500 5.5.2 "),
        (replies.BARE_CR, b"500 5.5.2 "),
        (replies.NUL_IN_COMMAND, b"500 5.5.2 "),
        (replies.UNKNOWN_COMMAND, b"500 5.5.1 "),
        (replies.BAD_SEQUENCE, b"503 5.5.1 "),
        (replies.MUST_STARTTLS, b"530 5.7.0 "),
        (replies.TOO_MANY_RECIPIENTS, b"452 4.5.3 "),
        (replies.TOO_MANY_ERRORS, b"421 4.7.0 "),
        (replies.MESSAGE_TOO_BIG, b"552 5.3.4 "),
        (replies.BARE_LF_IN_DATA, b"550 5.5.2 "),
        (replies.BARE_CR_IN_DATA, b"550 5.5.2 "),
        (replies.NUL_IN_DATA, b"550 5.5.2 "),
        (replies.LONG_LINE_IN_DATA, b"550 5.5.2 "),
        (replies.SHUTTING_DOWN, b"421 4.3.2 "),
        (replies.TIMEOUT, b"421 4.4.2 "),
    ],
)
def test_fixed_replies_have_the_documented_codes(reply: Reply, prefix: bytes) -> None:
    assert reply.wire.startswith(prefix)
    assert reply.wire.endswith(b"\r\n")
    assert reply.wire.count(b"\r\n") == 1
