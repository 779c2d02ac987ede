"""Envelope addresses and ESMTP parameters: address.py and esmtp.py, directly and over the wire."""

from __future__ import annotations

import pytest

from spamkiller.smtp.address import (
    Address,
    AddressError,
    is_address_literal,
    is_domain,
    parse_path,
)
from spamkiller.smtp.esmtp import MailParams, ParameterError, parse_mail, parse_rcpt
from spamkiller.smtp.events import ConnectionClosed, Event, MailFrom, NeedData, RcptTo
from spamkiller.smtp.server import ServerSession
from spamkiller.smtp.states import State

SID = "4DDR"
SENDER_OK = b"250 2.1.0 Sender OK\r\n"
RECIPIENT_OK = b"250 2.1.5 Recipient OK\r\n"


def exchange(session: ServerSession, data: bytes) -> list[tuple[Event, bytes]]:
    """Feed `data`, answer each event with its own reply; the (event, reply bytes) pairs."""
    session.receive_data(data)
    out: list[tuple[Event, bytes]] = []
    while session.state is not State.CLOSED:
        event = session.next_event()
        if isinstance(event, NeedData | ConnectionClosed):
            break
        out.append((event, session.send(event.reply)))
    return out


def ready() -> ServerSession:
    session = ServerSession(hostname="mx.test.example", session_id=SID)
    session.greeting()
    exchange(session, b"EHLO client.example\r\n")
    assert session.state is State.READY
    return session


def mail(line: str) -> tuple[Event, bytes]:
    """One MAIL command (text after "MAIL ") in a fresh session after EHLO."""
    [pair] = exchange(ready(), f"MAIL {line}\r\n".encode())
    return pair


def rcpt(line: str, *, mail_line: str = "FROM:<a@sender.example>") -> tuple[Event, bytes]:
    """One RCPT command after the given MAIL."""
    session = ready()
    [(_, wire)] = exchange(session, f"MAIL {mail_line}\r\n".encode())
    assert wire == SENDER_OK
    [pair] = exchange(session, f"RCPT {line}\r\n".encode())
    return pair


def err(line: str) -> bytes:
    return f"{line} (id {SID})\r\n".encode()


# ---------------------------------------------------------------------------------------------
# parse_path
# ---------------------------------------------------------------------------------------------


def test_plain_address() -> None:
    address = parse_path("<Alice.Smith+tag@Example.COM>")
    assert address == Address(local="Alice.Smith+tag", domain="example.com")
    assert str(address) == "Alice.Smith+tag@example.com"
    assert not (address.quoted or address.literal or address.source_route)


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", allow_null=True) is None
    with pytest.raises(AddressError, match="null address"):
        parse_path("<>")


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster(text: str) -> None:
    address = parse_path(text)
    assert address is not None
    assert address.domain is None
    assert address.is_postmaster
    assert str(address) == text[1:-1]


def test_postmaster_with_domain_is_postmaster_too() -> None:
    address = parse_path("<postmaster@example.org>")
    assert address is not None
    assert address.is_postmaster
    assert address.domain == "example.org"


@pytest.mark.parametrize(
    ("text", "local"),
    [
        ('<"john doe"@example.com>', '"john doe"'),
        ('<"a@b"@example.com>', '"a@b"'),
        ('<"a\\"b"@example.com>', '"a\\"b"'),
        ('<"a>b"@example.com>', '"a>b"'),
        ('<""@example.com>', '""'),
    ],
)
def test_quoted_local_parts_are_flagged(text: str, local: str) -> None:
    address = parse_path(text)
    assert address is not None
    assert address.quoted is True
    assert address.local == local
    assert address.domain == "example.com"


def test_source_route_is_flagged_and_dropped() -> None:
    address = parse_path("<@relay.example,@hop.example:user@final.example>")
    assert address == Address(local="user", domain="final.example", source_route=True)


def test_source_route_with_ip_literal_is_flagged() -> None:
    address = parse_path("<@[192.0.2.1]:user@victim.example>")
    assert address is not None
    assert address.source_route is True
    assert str(address) == "user@victim.example"


@pytest.mark.parametrize(
    "text", ["<user@[192.0.2.1]>", "<user@[IPv6:2001:db8::1]>", "<user@[ipv6:::1]>"]
)
def test_ip_literals_are_flagged(text: str) -> None:
    address = parse_path(text)
    assert address is not None
    assert address.literal is True
    assert address.domain == text[text.index("@") + 1 : -1].lower()


def test_open_relay_tricks_are_parsed_into_what_they_are() -> None:
    percent = parse_path("<user%victim.example@[192.0.2.1]>")
    assert percent == Address(local="user%victim.example", domain="[192.0.2.1]", literal=True)
    quoted = parse_path('<"user@victim.example"@[192.0.2.1]>')
    assert quoted is not None
    assert (quoted.quoted, quoted.literal) == (True, True)
    for bad in ("<user@victim.example@[192.0.2.1]>", "<victim.example!user>"):
        with pytest.raises(AddressError):
            parse_path(bad)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("user@example.com", "enclosed"),
        ("<user@example.com", "enclosed"),
        ("user@example.com>", "enclosed"),
        ("<", "enclosed"),
        ("<user>", "must contain @"),
        ("<@example.com>", "malformed source route"),
        ("<@a.example:postmaster>", "must contain @"),
        ("<user@>", "malformed domain"),
        ("<@>", "malformed source route"),
        ("<.user@example.com>", "malformed local part"),
        ("<user.@example.com>", "malformed local part"),
        ("<us..er@example.com>", "malformed local part"),
        ("<us er@example.com>", "malformed local part"),
        ("<us(er@example.com>", "malformed local part"),
        ('<"unterminated@example.com>', "malformed quoted local part"),
        ('<"a"b"@example.com>', "malformed quoted local part"),
        ("<user@-example.com>", "malformed domain"),
        ("<user@example-.com>", "malformed domain"),
        ("<user@exa_mple.com>", "malformed domain"),
        ("<user@example..com>", "malformed domain"),
        ("<user@example.com.>", "malformed domain"),
        ("<user@[300.1.1.1]>", "malformed address literal"),
        ("<user@[192.0.2.1>", "malformed address literal"),
        ("<user@[IPv6:zz::1]>", "malformed address literal"),
        ("<user@[example.com]>", "malformed address literal"),
        ("<user@[]>", "malformed address literal"),
        ("<" + "a" * 65 + "@example.com>", "local part empty or too long"),
        ("<a@" + "b" * 63 + "." + ("c" * 63 + ".") * 3 + "d" * 10 + ">", "path too long"),
    ],
)
def test_malformed_paths(text: str, reason: str) -> None:
    with pytest.raises(AddressError, match=reason):
        parse_path(text)


def test_local_part_of_64_octets_is_accepted() -> None:
    address = parse_path("<" + "a" * 64 + "@example.com>")
    assert address is not None
    assert len(address.local) == 64


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("<jörg@exämple.de>", "jörg", "exämple.de"),
        ("<用户@例子.广告>", "用户", "例子.广告"),
        ('<"ünï cödé"@example.com>', '"ünï cödé"', "example.com"),
    ],
)
def test_utf8_addresses_only_with_utf8(text: str, local: str, domain: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)
    address = parse_path(text, utf8=True)
    assert address is not None
    assert (address.local, address.domain) == (local, domain)


def test_utf8_local_part_length_counts_octets() -> None:
    assert parse_path("<" + "é" * 32 + "@example.com>", utf8=True) is not None
    with pytest.raises(AddressError, match="too long"):
        parse_path("<" + "é" * 33 + "@example.com>", utf8=True)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("example.com", True),
        ("a", True),
        ("x-y.example", True),
        ("a" * 63 + ".example", True),
        ("a" * 64 + ".example", False),
        ("", False),
        (".example", False),
        ("exa mple.com", False),
        ("-a.example", False),
        ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + ".e", False),
    ],
)
def test_is_domain(name: str, ok: bool) -> None:
    assert is_domain(name) is ok


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("[192.0.2.1]", True),
        ("[IPv6:2001:db8::1]", True),
        ("[IPv6:::ffff:192.0.2.1]", True),
        ("[192.0.2]", False),
        ("[192.0.2.01]", False),
        ("[2001:db8::1]", False),
        ("[IPv6:192.0.2.1]", False),
        ("192.0.2.1", False),
        ("[tag:content]", False),
        # RFC 5321 4.1.3 IPv6-addr has no zone index; ipaddress accepts one since Python 3.9.
        ("[IPv6:fe80::1%eth0]", False),
    ],
)
def test_is_address_literal(text: str, ok: bool) -> None:
    assert is_address_literal(text) is ok


# ---------------------------------------------------------------------------------------------
# parse_mail / parse_rcpt
# ---------------------------------------------------------------------------------------------


def test_parse_mail_parameters() -> None:
    sender, params = parse_mail(
        "FROM:<a@b.example> size=1000 body=8bitmime SMTPUTF8", max_size=2000
    )
    assert sender == Address(local="a", domain="b.example")
    assert params == MailParams(size=1000, body="8BITMIME", smtputf8=True)


def test_parse_mail_defaults() -> None:
    assert parse_mail("FROM:<>", max_size=10) == (None, MailParams(size=None, body="7BIT"))


def test_parse_mail_tolerates_space_after_colon() -> None:
    sender, _ = parse_mail("FROM: <a@b.example>", max_size=10)
    assert str(sender) == "a@b.example"


@pytest.mark.parametrize(
    ("arg", "code", "enhanced"),
    [
        ("FROM:<a@b.example> SIZE=11", 552, "5.3.4"),
        ("FROM:<a@b.example> SIZE=", 501, "5.5.4"),
        ("FROM:<a@b.example> SIZE=-1", 501, "5.5.4"),
        ("FROM:<a@b.example> SIZE=1 SIZE=2", 501, "5.5.4"),
        ("FROM:<a@b.example> SIZE=" + "9" * 21, 501, "5.5.4"),
        ("FROM:<a@b.example> BODY=BINARYMIME", 555, "5.5.4"),
        ("FROM:<a@b.example> RET=FULL", 555, "5.5.4"),
        ("FROM:<a@b.example> ENVID=x", 555, "5.5.4"),
        ("FROM:<a@b.example> SMTPUTF8=yes", 555, "5.5.4"),
        ("FROM:<a@b.example>SIZE=1", 501, "5.5.4"),
        ("FROM:a@b.example", 501, "5.5.4"),
        ("TO:<a@b.example>", 501, "5.5.4"),
        ("FROM:<a@b.example", 501, "5.5.4"),
        ("FROM:<bad>", 501, "5.1.7"),
    ],
)
def test_parse_mail_errors(arg: str, code: int, enhanced: str) -> None:
    with pytest.raises(ParameterError) as caught:
        parse_mail(arg, max_size=10)
    assert (caught.value.code, caught.value.enhanced) == (code, enhanced)


def test_parse_rcpt_refuses_parameters_and_null() -> None:
    with pytest.raises(ParameterError) as caught:
        parse_rcpt("TO:<a@b.example> NOTIFY=NEVER", smtputf8=False)
    assert (caught.value.code, caught.value.enhanced) == (555, "5.5.4")
    with pytest.raises(ParameterError) as caught:
        parse_rcpt("TO:<>", smtputf8=False)
    assert (caught.value.code, caught.value.enhanced) == (501, "5.1.3")


# ---------------------------------------------------------------------------------------------
# over the wire
# ---------------------------------------------------------------------------------------------


def test_null_sender_is_accepted() -> None:
    event, wire = mail("FROM:<>")
    assert isinstance(event, MailFrom)
    assert event.sender is None
    assert wire == SENDER_OK


def test_postmaster_recipient_is_accepted() -> None:
    event, wire = rcpt("TO:<Postmaster>")
    assert isinstance(event, RcptTo)
    assert event.recipient.is_postmaster
    assert event.recipient.domain is None
    assert wire == RECIPIENT_OK


def test_null_recipient_is_501_5_1_3() -> None:
    assert rcpt("TO:<>")[1] == err("501 5.1.3 Bad recipient address: null address not allowed here")


def test_quoted_sender_and_literal_recipient_reach_the_driver_flagged() -> None:
    event, wire = mail('FROM:<"odd name"@sender.example>')
    assert isinstance(event, MailFrom)
    assert event.sender is not None
    assert event.sender.quoted is True
    assert wire == SENDER_OK
    event, wire = rcpt("TO:<user@[IPv6:2001:db8::25]>")
    assert isinstance(event, RcptTo)
    assert event.recipient.literal is True
    assert wire == RECIPIENT_OK
    event, _ = rcpt("TO:<@hop.example:user@rcpt.example>")
    assert isinstance(event, RcptTo)
    assert event.recipient.source_route is True
    # A '>' and an escaped quote inside the quoted local part do not end the path.
    event, wire = rcpt('TO:<"a\\">b"@rcpt.example>')
    assert wire == RECIPIENT_OK
    assert isinstance(event, RcptTo)
    assert event.recipient.local == '"a\\">b"'


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("FROM:<no-at-sign>", "501 5.1.7 Bad sender address: address must contain @"),
        ("FROM:<a..b@x.example>", "501 5.1.7 Bad sender address: malformed local part"),
        ("FROM:<a@b@x.example>", "501 5.1.7 Bad sender address: malformed local part"),
        ("FROM:<a@[999.1.1.1]>", "501 5.1.7 Bad sender address: malformed address literal"),
        ("FROM:a@b.example", "501 5.5.4 Syntax: FROM:<address>"),
        ("FROM:<a@b.example", "501 5.5.4 Unterminated address"),
        ("FROM:<a@b.example>junk", "501 5.5.4 Garbage after address"),
        ("FROM:<a@b.example> SIZE=1 SIZE=1", "501 5.5.4 Duplicate parameter SIZE"),
        ("FROM:<a@b.example> SIZE=ten", "501 5.5.4 Bad SIZE value"),
    ],
)
def test_malformed_sender_is_501(line: str, expected: str) -> None:
    session = ready()
    [(_, wire)] = exchange(session, f"MAIL {line}\r\n".encode())
    assert wire == err(expected)
    assert session.state is State.READY
    assert session.bad_commands == 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("TO:<domain!user>", "501 5.1.3 Bad recipient address: address must contain @"),
        (
            "TO:<user@victim.example@[192.0.2.1]>",
            "501 5.1.3 Bad recipient address: malformed local part",
        ),
        ("TO:<a@-b.example>", "501 5.1.3 Bad recipient address: malformed domain"),
        ("TO:<a@[IPv6:nope]>", "501 5.1.3 Bad recipient address: malformed address literal"),
        ("TO:a@b.example", "501 5.5.4 Syntax: TO:<address>"),
        ("FROM:<a@b.example>", "501 5.5.4 Syntax: TO:<address>"),
    ],
)
def test_malformed_recipient_is_501(line: str, expected: str) -> None:
    assert rcpt(line)[1] == err(expected)


def test_utf8_sender_needs_smtputf8() -> None:
    assert mail("FROM:<jörg@exämple.de>")[1] == err(
        "501 5.1.7 Bad sender address: malformed local part"
    )
    event, wire = mail("FROM:<jörg@exämple.de> SMTPUTF8")
    assert wire == SENDER_OK
    assert isinstance(event, MailFrom)
    assert event.params.smtputf8 is True
    assert str(event.sender) == "jörg@exämple.de"


def test_utf8_recipient_needs_smtputf8_on_mail() -> None:
    assert rcpt("TO:<用户@例子.广告>")[1] == err(
        "501 5.1.3 Bad recipient address: malformed local part"
    )
    event, wire = rcpt("TO:<用户@例子.广告>", mail_line="FROM:<a@sender.example> SMTPUTF8")
    assert wire == RECIPIENT_OK
    assert isinstance(event, RcptTo)
    assert str(event.recipient) == "用户@例子.广告"


def test_smtputf8_lasts_for_the_transaction_only() -> None:
    session = ready()
    exchange(session, b"MAIL FROM:<a@sender.example> SMTPUTF8\r\n")
    assert session.mail_params.smtputf8 is True
    exchange(session, b"RSET\r\n")
    assert session.mail_params == MailParams()
    exchange(session, b"MAIL FROM:<a@sender.example>\r\n")
    [(_, wire)] = exchange(session, "RCPT TO:<ü@example.com>\r\n".encode())
    assert wire == err("501 5.1.3 Bad recipient address: malformed local part")


@pytest.mark.parametrize(
    "line",
    [
        "MAIL FROM:<a@b.example> RET=HDRS",
        "MAIL FROM:<a@b.example> BODY=BINARYMIME",
        "MAIL FROM:<a@b.example> AUTH=<>",
        "MAIL FROM:<a@b.example> SMTPUTF8=1",
    ],
)
def test_unsupported_mail_parameters_are_555(line: str) -> None:
    session = ready()
    [(_, wire)] = exchange(session, f"{line}\r\n".encode())
    assert wire[:10] == b"555 5.5.4 "
    assert wire.endswith(f"(id {SID})\r\n".encode())
    assert session.state is State.READY


def test_unsupported_rcpt_parameter_is_555() -> None:
    assert rcpt("TO:<b@rcpt.example> NOTIFY=SUCCESS,FAILURE")[1] == err(
        "555 5.5.4 Unsupported parameter"
    )


@pytest.mark.parametrize("value", ["8BITMIME", "8bitmime", "7BIT"])
def test_body_parameter(value: str) -> None:
    event, wire = mail(f"FROM:<a@b.example> BODY={value}")
    assert wire == SENDER_OK
    assert isinstance(event, MailFrom)
    assert event.params.body == value.upper()


def test_size_parameter_is_recorded() -> None:
    event, wire = mail("FROM:<a@b.example> SIZE=12345")
    assert wire == SENDER_OK
    assert isinstance(event, MailFrom)
    assert event.params.size == 12345


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0660"], ids=["superscript-two", "arabic-ten"])
def test_size_with_non_ascii_digits_is_501(value: str) -> None:
    """RFC 1870: size-value is 1*20DIGIT (ASCII). MAIL lines may carry UTF-8, so the check must not
    rely on str.isdigit(), which is true for superscripts and other scripts' digits."""
    session = ready()
    [(_, wire)] = exchange(session, f"MAIL FROM:<a@b.example> SIZE={value}\r\n".encode())
    assert wire == err("501 5.5.4 Bad SIZE value")
    assert session.state is State.READY
