"""The resolver protocol the checks use, its values and errors. Standard library only.

Checks import this module and nothing else from ``spamkiller.dns``; the composition root hands
them a concrete ``Resolver`` (``DnspythonResolver`` in production, ``MemoryResolver`` in unit
tests). Every implementation keeps these rules:

- **A lookup returns values or raises.** A returned list is never empty: "no records" is always
  an exception, so a caller cannot mistake it for a failure to look.
- **Temporary and permanent failures are different types.** ``DnsTempError``: no usable answer
  now (SERVFAIL, REFUSED, timeout, network error, a malformed reply, DNSSEC validation failure);
  asking again later may work, so a check maps it to its ``on_error`` setting. ``DnsPermError``:
  the DNS answered, finally, that there is nothing; it has three kinds:

  - ``DnsNxDomain``: the name does not exist (RCODE 3, or YXDOMAIN after a DNAME);
  - ``DnsNoData``: the name exists but has no record of that type (NOERROR, empty answer);
  - ``DnsInvalidName``: the name can never exist (empty label, over 63/253 octets, control
    characters or spaces, an IDNA label that cannot be encoded, not an IP address for ``ptr``).
    No query is sent. It is also a ``ValueError``.

  SPF counts both ``DnsNxDomain`` and ``DnsNoData`` as void lookups (RFC 7208 4.6.4) and can
  still tell them apart; a DNSBL treats any ``DnsPermError`` as "not listed".
- **Names in** may be given with or without the trailing dot, in any case, with U-labels: they
  are normalised by ``normalise_name`` (lowercase, A-labels, absolute). What is passed is what is
  looked up: no search list, no backslash escapes, no ``ndots``.
- **Names out** (MX exchanges, PTR targets) are lowercase A-label text without the trailing dot,
  except the root, which is ``"."`` (the null MX of RFC 7505 is ``[(0, ".")]``). Bytes that are
  not printable ASCII come back as ``\\DDD`` escapes, so a name from the DNS never carries a
  control character into a log line or a header.
- **Values**: ``a`` gives dotted quads, ``aaaa`` compressed IPv6 text, ``txt`` one string per
  record with its character-strings joined without separator (RFC 7208 3.3), decoded as UTF-8
  with U+FFFD for bytes that are not (SPF, DKIM and DNSBL texts are ASCII; anything else is a
  syntax error for the caller to find, not a crash). ``mx`` is sorted by preference then name.
- **CNAMEs are followed** by the resolver; the values are those at the end of the chain.
- **TLSA** answers carry ``authenticated``: the AD bit of the answer, set only when a validating
  resolver vouched for it with DNSSEC. DANE (RFC 7672) may use TLSA records only when it is true;
  the flag is only as trustworthy as the path to the resolver, so DANE needs a validating
  resolver on loopback.
- Cancellation (a check's timeout) propagates as ``CancelledError``, never as a DNS error.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Protocol

from spamkiller.errors import SpamKillerError

__all__ = [
    "DnsError",
    "DnsInvalidName",
    "DnsNoData",
    "DnsNxDomain",
    "DnsPermError",
    "DnsTempError",
    "Resolver",
    "Tlsa",
    "normalise_name",
    "reverse_labels",
    "reverse_name",
]

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class DnsError(SpamKillerError):
    """A lookup gave no values. ``name`` and ``rdtype`` say which; ``reason`` says why.

    The tree (whose fault it is: nobody's yet for temporary errors; the name's owner, or the
    caller for an invalid name, for permanent ones)::

        DnsError(SpamKillerError)
        ├── DnsTempError          no usable answer now: SERVFAIL, REFUSED, timeout, network
        └── DnsPermError          a final "nothing here"
            ├── DnsNxDomain       the name does not exist
            ├── DnsNoData         the name exists, but not with this record type
            └── DnsInvalidName(ValueError)   not a name that can exist; nothing was sent
    """

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        self.name = name
        self.rdtype = rdtype
        self.reason = reason
        super().__init__(f"{name} {rdtype}: {reason}")


class DnsTempError(DnsError):
    """No usable answer now; the same question may get one later."""


class DnsPermError(DnsError):
    """The DNS answered that there is nothing to find; asking again will not change that soon."""


class DnsNxDomain(DnsPermError):
    """The name does not exist (NXDOMAIN)."""


class DnsNoData(DnsPermError):
    """The name exists but has no records of the type asked for (NOERROR with no answer)."""


class DnsInvalidName(DnsPermError, ValueError):
    """The name (or address, for ``ptr``) can never be looked up; no query was sent."""


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Tlsa:
    """One TLSA record (RFC 6698), with the DNSSEC status of the answer it came in.

    ``authenticated`` is the same for every record of one answer: true only when the resolver
    set the AD bit, i.e. validated the answer with DNSSEC.
    """

    usage: int  # 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE
    selector: int  # 0 full certificate, 1 SubjectPublicKeyInfo
    mtype: int  # 0 exact, 1 SHA-256, 2 SHA-512
    data: bytes  # the certificate association data
    authenticated: bool


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


class Resolver(Protocol):
    """What the checks may ask the DNS. Each call returns a non-empty list or raises DnsError."""

    async def txt(self, name: str) -> list[str]:
        """TXT records of ``name``, one string per record (its character-strings joined)."""
        ...

    async def a(self, name: str) -> list[str]:
        """IPv4 addresses of ``name`` as dotted quads."""
        ...

    async def aaaa(self, name: str) -> list[str]:
        """IPv6 addresses of ``name`` in compressed form."""
        ...

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """``(preference, exchange)`` pairs of ``name``, sorted by preference, then exchange."""
        ...

    async def ptr(self, ip: str) -> list[str]:
        """Names the reverse zone gives for the address ``ip`` (IPv4 or IPv6 text)."""
        ...

    async def tlsa(self, name: str) -> list[Tlsa]:
        """TLSA records at ``name`` (e.g. ``_25._tcp.mx.example.com``), with the AD status."""
        ...


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

MAX_LABEL = 63  # RFC 1035 2.3.4: octets per label
MAX_NAME = 253  # RFC 1035 2.3.4: 255 octets on the wire = 253 characters of text + 2

# A name of printable ASCII without spaces, labels of 1-63 octets, optional final dot. Most
# names take this path: one regex match and lower().
_ASCII_NAME = re.compile(r"(?:[\x21-\x2d\x2f-\x7e]{1,63}\.)*[\x21-\x2d\x2f-\x7e]{1,63}\.?")
_BAD_ASCII = re.compile(r"[\x00-\x20\x7f]")
# Full stops that IDNA (RFC 3490 3.1) treats as label separators.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# Characters that IDNA 2003 maps away but IDNA 2008 keeps (UTS #46 "deviations"): encoding
# them the 2003 way would look up a different domain (faß.de is not fass.de), so they are
# refused rather than resolved wrongly.
_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


def normalise_name(name: str, rdtype: str = "-") -> str:
    """``name`` as looked up: lowercase, A-labels, with the final dot. Raises DnsInvalidName.

    ``rdtype`` only labels the error.

    U-labels are encoded with the standard library's IDNA (2003) codec, except labels holding
    a character that IDNA 2003 and 2008 encode differently, which are refused.
    """
    if len(name) <= MAX_NAME + 1 and _ASCII_NAME.fullmatch(name):
        text = name.lower()
        if text[-1] != ".":
            if len(text) > MAX_NAME:
                raise DnsInvalidName(name[:80], rdtype, "name longer than 253 octets")
            text += "."
        return text
    return _normalise_slow(name, rdtype)


def _normalise_slow(name: str, rdtype: str) -> str:
    shown = _shown(name)
    text = name.translate(_DOTS)
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise DnsInvalidName(shown, rdtype, "empty name")
    labels: list[str] = []
    for given in text.split("."):
        if not given:
            raise DnsInvalidName(shown, rdtype, "empty label")
        if given.isascii():
            if _BAD_ASCII.search(given):
                raise DnsInvalidName(shown, rdtype, "space or control character in name")
            label = given.lower()
        else:
            if not given.isprintable() or _DEVIATIONS.intersection(given):
                raise DnsInvalidName(shown, rdtype, "label cannot be encoded with IDNA")
            try:
                label = given.encode("idna").decode("ascii")
            except UnicodeError:
                raise DnsInvalidName(shown, rdtype, "label cannot be encoded with IDNA") from None
        if len(label) > MAX_LABEL:
            raise DnsInvalidName(shown, rdtype, "label longer than 63 octets")
        labels.append(label)
    result = ".".join(labels)
    if len(result) > MAX_NAME:
        raise DnsInvalidName(shown, rdtype, "name longer than 253 octets")
    return result + "."


def _shown(text: str) -> str:
    """A caller's text, safe for a log line: at most 80 characters, escapes for the rest."""
    return text[:80].encode("unicode_escape").decode("ascii")


@functools.lru_cache(maxsize=8192)  # every check of a session asks about the same client
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        shown = _shown(ip)
        raise DnsInvalidName(shown, "PTR", "not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return addr


@functools.lru_cache(maxsize=8192)
def reverse_labels(ip: str) -> str:
    """The address's labels in reverse order, as DNSBLs want them: ``2.0.0.127``, or 32 nibbles.

    IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``) are treated as the IPv4 address.
    """
    addr = _address(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def reverse_name(ip: str) -> str:
    """The PTR name of an address: ``1.2.0.192.in-addr.arpa.`` or ``...ip6.arpa.`` (absolute)."""
    addr = _address(ip)
    suffix = "in-addr.arpa." if isinstance(addr, ipaddress.IPv4Address) else "ip6.arpa."
    return f"{reverse_labels(str(addr))}.{suffix}"
