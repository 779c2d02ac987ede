"""Envelope addresses: RFC 5321 4.1.2 paths parsed into a value, with SMTPUTF8 (RFC 6531).

Parsing is strict about what could smuggle meaning (control characters, unbalanced quotes, stray
brackets) and records the shapes a relay check cares about (source routes, quoted local parts,
address literals) instead of deciding policy here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+(?:\.(?:[{_ATEXT}]|[^\x00-\x7f])+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"\Z')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")  # one match, not one per label
_LABEL_UTF8 = re.compile(
    r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*(?:[A-Za-z0-9]|[^\x00-\x7f]))?\Z"
)
_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")


class AddressError(ValueError):
    """The path is not valid RFC 5321 syntax; the message says what is wrong."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    """A mailbox from MAIL FROM or RCPT TO. `domain` is None only for the bare `<postmaster>`."""

    local: str
    domain: str | None
    quoted: bool = False  # local part was a quoted-string
    literal: bool = False  # domain is an address literal like [192.0.2.1]
    source_route: bool = False  # an obsolete "@a,@b:" route preceded the mailbox

    def __str__(self) -> str:
        return self.local if self.domain is None else f"{self.local}@{self.domain}"

    @property
    def is_postmaster(self) -> bool:
        return self.local.lower() == "postmaster"


def is_domain(name: str, *, utf8: bool = False) -> bool:
    """True if `name` is an RFC 5321 Domain (optionally with U-labels)."""
    if not name or len(name) > MAX_DOMAIN:
        return False
    if not utf8:
        return _DOMAIN.match(name) is not None
    return all(_LABEL_UTF8.match(part) for part in name.split("."))


def is_address_literal(text: str) -> bool:
    """True for `[IPv4]` or `[IPv6:...]` (general literals are not accepted)."""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    if "%" in inner:  # ipaddress accepts IPv6 zone ids ("fe80::1%eth0"); RFC 5321 does not
        return False
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def parse_path(text: str, *, utf8: bool = False, allow_null: bool = False) -> Address | None:
    """Parse `<...>` (the brackets included). Returns None for `<>` when `allow_null`."""
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("address must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return None
        raise AddressError("null address not allowed here")
    if len(text) > MAX_PATH:
        raise AddressError("path too long")
    route = False
    if inner.startswith("@"):
        m = _ROUTE.match(inner)
        if not m:
            raise AddressError("malformed source route")
        route = True
        inner = inner[m.end() :]
    at = inner.rfind("@")
    if at < 0:
        # RFC 5321 4.5.1: "<postmaster>" without a domain must be accepted as a recipient.
        if inner.lower() == "postmaster" and not route:
            return Address(local=inner, domain=None)
        raise AddressError("address must contain @")
    local, domain = inner[:at], inner[at + 1 :]
    quoted = local.startswith('"')
    if not local or len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part empty or too long")
    if quoted:
        if not (_QUOTED_UTF8 if utf8 else _QUOTED).match(local):
            raise AddressError("malformed quoted local part")
    elif not (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(local):
        raise AddressError("malformed local part")
    literal = domain.startswith("[")
    if literal:
        if not is_address_literal(domain):
            raise AddressError("malformed address literal")
    elif not is_domain(domain, utf8=utf8):
        raise AddressError("malformed domain")
    return Address(
        local=local, domain=domain.lower(), quoted=quoted, literal=literal, source_route=route
    )
