"""The resolver protocol module: the error tree, name normalisation, reverse names."""

from __future__ import annotations

import pytest

from spamkiller.dns.resolver import (
    DnsError,
    DnsInvalidName,
    DnsNoData,
    DnsNxDomain,
    DnsPermError,
    DnsTempError,
    Tlsa,
    normalise_name,
    reverse_labels,
    reverse_name,
)
from spamkiller.errors import SpamKillerError


def test_error_tree() -> None:
    assert issubclass(DnsError, SpamKillerError)
    for perm in (DnsNxDomain, DnsNoData, DnsInvalidName):
        assert issubclass(perm, DnsPermError)
        assert not issubclass(perm, DnsTempError)
    assert not issubclass(DnsTempError, DnsPermError)
    assert issubclass(DnsInvalidName, ValueError)
    # SPF's void lookups are exactly these two; an invalid name never reached the DNS.
    assert not issubclass(DnsNoData, DnsNxDomain) and not issubclass(DnsNxDomain, DnsNoData)


def test_error_carries_name_type_and_reason() -> None:
    err = DnsTempError("bl.example", "A", "SERVFAIL")
    assert (err.name, err.rdtype, err.reason) == ("bl.example", "A", "SERVFAIL")
    assert str(err) == "bl.example A: SERVFAIL"


def test_tlsa_is_a_frozen_value() -> None:
    rec = Tlsa(usage=3, selector=1, mtype=1, data=b"\x01", authenticated=True)
    with pytest.raises(AttributeError):
        rec.usage = 2  # type: ignore[misc]
    assert rec == Tlsa(usage=3, selector=1, mtype=1, data=b"\x01", authenticated=True)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("example.com", "example.com."),
        ("Example.COM.", "example.com."),
        ("_dmarc.Example.com", "_dmarc.example.com."),
        ("sel._domainkey.example.com", "sel._domainkey.example.com."),
        ("2.0.0.127.zen.spamhaus.org", "2.0.0.127.zen.spamhaus.org."),
        ("bücher.example", "xn--bcher-kva.example."),
        ("BÜCHER.example", "xn--bcher-kva.example."),
        ("münchen\u3002example", "xn--mnchen-3ya.example."),  # ideographic full stop
        ("a\\b.example", "a\\b.example."),  # no escape processing: the backslash is a byte
        ("x" * 63 + ".example", "x" * 63 + ".example."),
        (
            ".".join(["a" * 63] * 3) + "." + "b" * 61,
            ".".join(["a" * 63] * 3) + "." + "b" * 61 + ".",
        ),
    ],
)
def test_normalise_name(given: str, expected: str) -> None:
    assert normalise_name(given) == expected


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("", "empty name"),
        (".", "empty name"),
        ("a..example", "empty label"),
        (".example", "empty label"),
        ("example..", "empty label"),
        ("x" * 64 + ".example", "longer than 63"),
        (".".join(["a" * 63] * 3) + "." + "b" * 62, "longer than 253"),
        ("foo bar.example", "space or control"),
        ("foo\r\nbar.example", "space or control"),
        ("foo\x00.example", "space or control"),
        ("faß.de", "IDNA"),  # IDNA 2003 would look up fass.de, a different domain
        ("\u200d.example", "IDNA"),
        ("\U0001f4a9\u0378.example", "IDNA"),  # unassigned code point
    ],
)
def test_normalise_name_refuses(given: str, why: str) -> None:
    with pytest.raises(DnsInvalidName, match=why) as info:
        normalise_name(given, "TXT")
    assert info.value.rdtype == "TXT"
    assert "\r" not in str(info.value) and "\x00" not in str(info.value)


@pytest.mark.parametrize(
    ("ip", "labels", "name"),
    [
        ("127.0.0.2", "2.0.0.127", "2.0.0.127.in-addr.arpa."),
        ("192.0.2.25", "25.2.0.192", "25.2.0.192.in-addr.arpa."),
        ("::ffff:192.0.2.25", "25.2.0.192", "25.2.0.192.in-addr.arpa."),
        (
            "2001:db8::25",
            "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2",
            "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
        ),
        (
            "2001:DB8::25",
            "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2",
            "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
        ),
        (
            "fe80::1%eth0",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.e.f",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.e.f.ip6.arpa.",
        ),
    ],
)
def test_reverse_names(ip: str, labels: str, name: str) -> None:
    assert reverse_labels(ip) == labels
    assert reverse_name(ip) == name


@pytest.mark.parametrize(
    "ip", ["", "mail.example.com", "192.0.2", "192.0.2.256", "::g", "1.2.3.4\n"]
)
def test_reverse_name_refuses_what_is_not_an_address(ip: str) -> None:
    with pytest.raises(DnsInvalidName, match="not an IP address"):
        reverse_name(ip)
