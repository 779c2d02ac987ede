"""PROXY protocol v1/v2 parsing (HAProxy's proxy-protocol.txt), including hostile headers."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from spamkiller.proxyproto import V2_SIGNATURE, ProxyHeaderError, parse


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family << 4 | 1, len(block)) + block


def v2_inet(src: str, sport: int) -> bytes:
    block = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address("192.0.2.1").packed
    return v2(1, 1, block + struct.pack("!HH", sport, 25))


def test_v1_tcp4_and_the_rest_is_left() -> None:
    data = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 25\r\nEHLO x\r\n"
    header = parse(data)
    assert header is not None
    assert (header.source_ip, header.source_port, header.version) == ("203.0.113.7", 56324, 1)
    assert data[header.length :] == b"EHLO x\r\n"


def test_v1_tcp6_unknown_and_partial() -> None:
    header = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 25\r\n")
    assert header is not None and header.source_ip == "2001:db8::7"
    unknown = parse(b"PROXY UNKNOWN\r\n")
    assert unknown is not None and unknown.source_ip is None
    assert parse(b"PROXY TCP4 203.0.11") is None  # more bytes needed
    assert parse(b"PRO") is None
    assert parse(b"") is None


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO x\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 56324\r\n",
        b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 0080 25\r\n",
        b"PROXY UDP4 203.0.113.7 192.0.2.1 1 2\r\n",
        b"PROXY " + b"A" * 200,  # no CRLF within the v1 limit
        V2_SIGNATURE[:11] + b"X",
        V2_SIGNATURE + struct.pack("!BBH", 0x31, 0x11, 12) + b"\0" * 12,  # version 3
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 65535),  # length past the limit
        v2(1, 1, b"\0" * 4),  # IPv4 block too short
    ],
)
def test_malformed_headers_are_errors(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_v2_inet_local_and_partial() -> None:
    data = v2_inet("198.51.100.9", 40000) + b"EHLO y\r\n"
    header = parse(data)
    assert header is not None
    assert (header.source_ip, header.source_port, header.version) == ("198.51.100.9", 40000, 2)
    assert data[header.length :] == b"EHLO y\r\n"
    local = parse(v2(0, 0, b""))
    assert local is not None and local.source_ip is None
    assert parse(v2_inet("198.51.100.9", 1)[:20]) is None
    six = v2(1, 2, ipaddress.IPv6Address("2001:db8::9").packed + b"\0" * 16 + b"\x00\x50\x00\x19")
    header6 = parse(six)
    assert header6 is not None and (header6.source_ip, header6.source_port) == ("2001:db8::9", 80)
