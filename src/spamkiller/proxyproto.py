"""The HAProxy PROXY protocol, versions 1 (text) and 2 (binary), sans-IO: bytes in, addresses out.

A load balancer in front of the MX says who the real client is before any SMTP. Rules kept here:
- Only the header is consumed; whatever follows it is returned untouched for the session.
- A v1 header is at most 107 octets (the spec's limit); a v2 header's length field is bounded by
  the caller's limit. Anything malformed is an error, never a guess.
- `LOCAL` (v2) and `UNKNOWN` (v1) mean "no client address": health checks from the proxy itself;
  the caller keeps the proxy's own address.
The caller decides who may send a header at all (trusted_proxies): this module only parses.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # "PROXY TCP6 " + two full IPv6 addresses + two ports + CRLF
V2_MAX_ADDRESS_BLOCK = 536  # the largest address block (AF_UNIX) plus room for a few TLVs


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    source_ip: str | None  # None for LOCAL / UNKNOWN
    source_port: int | None
    version: int
    length: int  # octets the header took


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, or None if more bytes are needed."""
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data:
        raise ProxyHeaderError("no PROXY header")
    return None


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not (data[:6] == b"PROXY " or b"PROXY ".startswith(data)):
        raise ProxyHeaderError("no PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("v1 header too long")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        return ProxyHeader(source_ip=None, source_port=None, version=1, length=end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed v1 header")
    family = 4 if parts[1] == "TCP4" else 6
    try:
        source = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        ports = [int(p) for p in parts[4:6]]
    except ValueError:
        raise ProxyHeaderError("malformed v1 address or port") from None
    if source.version != family or not all(0 <= p <= 65535 for p in ports):
        raise ProxyHeaderError("malformed v1 address or port")
    if any(p != str(int(p)) for p in parts[4:6]):  # no leading zeros or signs
        raise ProxyHeaderError("malformed v1 port")
    return ProxyHeader(source_ip=str(source), source_port=ports[0], version=1, length=end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyHeaderError("no PROXY header")
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("no PROXY header")
    version_command, family_protocol, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyHeaderError("unsupported v2 version or command")
    if length > V2_MAX_ADDRESS_BLOCK:
        raise ProxyHeaderError("v2 header too long")
    if len(data) < 16 + length:
        return None
    block = data[16 : 16 + length]
    total = 16 + length
    if version_command & 0x0F == 0:  # LOCAL: the proxy speaking for itself
        return ProxyHeader(source_ip=None, source_port=None, version=2, length=total)
    family = family_protocol >> 4
    if family == 1:  # AF_INET
        if len(block) < 12:
            raise ProxyHeaderError("short v2 IPv4 block")
        src = ipaddress.IPv4Address(block[0:4])
        (sport,) = struct.unpack("!H", block[8:10])
    elif family == 2:  # AF_INET6
        if len(block) < 36:
            raise ProxyHeaderError("short v2 IPv6 block")
        src6 = ipaddress.IPv6Address(block[0:16])
        (sport,) = struct.unpack("!H", block[32:34])
        return ProxyHeader(source_ip=str(src6), source_port=sport, version=2, length=total)
    else:  # AF_UNSPEC or AF_UNIX: no usable client address
        return ProxyHeader(source_ip=None, source_port=None, version=2, length=total)
    return ProxyHeader(source_ip=str(src), source_port=sport, version=2, length=total)
