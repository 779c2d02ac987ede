"""The configuration: pydantic models with defaults in code, and ``load(path) -> Config``.

Rules this module keeps:

- Every default lives here, in code; the admin's YAML file only overrides. ``load(None)`` is a
  working local setup: one STARTTLS listener on 127.0.0.1:2525 relaying to the built-in development
  upstream on 127.0.0.1:2526, with a self-signed certificate made in ``data_dir`` on first run.
- Unknown keys are errors at every level (a typo must not silently fall back to a default), and
  so are duplicate keys in one YAML mapping (PyYAML would keep the last one without a word).
- An admin's mistake never becomes a traceback: ``load`` raises ``ConfigError`` carrying one
  ``key.path: reason`` line per problem, all problems at once (``listeners.0.port: must be between
  1 and 65535``). Problems that span fields are reported at the field the admin has to change.
- Durations accept seconds or ``30s``/``5m``/``2h``/``7d``/``250ms`` and are stored as float
  seconds; sizes accept bytes or ``50MiB``/``10MB``/... and are stored as int bytes (see
  ``spamkiller.units``). ``model_dump(mode="json")`` and ``dump_effective`` write them back in
  that form, so a dump loads again to an equal ``Config``.
- Relative paths in a file (certificates, keys, CA files, ``data_dir``, ``maildir``) are resolved
  against the directory of that file, not the working directory of whoever started the service.
  Defaults that are relative stay relative to the working directory.
- Settings that would silently do nothing are errors (``client_cert_pins`` on a listener that asks
  for no client certificate), because an admin who wrote them believes they are in force.
- Loading touches no file but the config itself; ``check_files`` does the slower checks of the
  files it names (what ``spam-killer check-config`` adds), and ``known_recipients`` reads the
  recipient address files for it and for the server.

Imports pydantic, PyYAML and ``spamkiller.errors``/``spamkiller.units``; ``check_files`` imports
``spamkiller.tls`` when called, so the checks and the CLI can load a config without the TLS code.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self
from urllib.parse import parse_qsl, unquote

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from spamkiller.errors import ConfigError
from spamkiller.units import (
    Rate,
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

if TYPE_CHECKING:
    from spamkiller.tls.certs import LoadedPair
    from spamkiller.tls.contexts import ServerTls

__all__ = [
    "CertificatePair",
    "Config",
    "DevUpstreamConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LogConfig",
    "RecipientsConfig",
    "TlsConfig",
    "UpstreamConfig",
    "check_files",
    "dump_effective",
    "known_recipients",
    "load",
]

# --------------------------------------------------------------------------------------------
# Problems that span fields
# --------------------------------------------------------------------------------------------

_Loc = tuple[str | int, ...]


class _ProblemsError(ValueError):
    """Raised by model validators: problems with paths relative to the model being validated.

    pydantic reports a model validator's error at the model's own location; carrying the field
    path inside the exception lets ``load`` point at the key the admin has to change, and lets one
    validator report several problems at once.
    """

    def __init__(self, problems: list[tuple[_Loc, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{_dotted(loc)}: {reason}" for loc, reason in problems))


def _dotted(loc: _Loc) -> str:
    return ".".join(str(part) for part in loc) if loc else "(top level)"


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------


def _duration(value: object) -> float:
    if isinstance(value, str | int | float):
        return parse_duration(value)
    raise ValueError(f"expected a duration such as 30s, 5m or 2h, got {_kind(value)}")


def _size(value: object) -> int:
    if isinstance(value, str | int):
        return parse_size(value)
    raise ValueError(f"expected a size such as 50MiB or 10MB, got {_kind(value)}")


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _not_bool(value: object) -> object:
    # pydantic turns true into 1; "port: yes" is a typo, not port 1.
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not true/false")
    return value


def _between(low: int, high: int, *, show: Callable[[int], str] = str) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {show(low)} and {show(high)}")
        return value

    return check


def _at_least(low: int, reason: str = "") -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be at least {low}{reason}")
        return value

    return check


def _at_most(limit: float) -> Callable[[float], float]:
    def check(value: float) -> float:
        if value > limit:
            raise ValueError(f"must be at most {format_duration(limit)}")
        return value

    return check


def _positive_seconds(value: float) -> float:
    if value <= 0:
        raise ValueError("must be longer than 0s")
    return value


_DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?|\.\d+)\s*([mM][sS]|[sSmMhHdD])?\s*$"},
    ],
    "description": "seconds, or a number with ms, s, m, h or d",
}
_SIZE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kKmMgG][iI]?)?[bB]?\s*$"},
    ],
    "description": "bytes, or a number with B, kB, MB, GB, KiB, MiB or GiB",
}

Duration = Annotated[
    float,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(_DURATION_SCHEMA),
]
"""Seconds as a float; accepts 30, "30s", "5m", "2h", "7d", "250ms"."""

Timeout = Annotated[Duration, AfterValidator(_positive_seconds)]
"""A Duration that must be above zero: a zero timeout would fail every operation."""

Size = Annotated[
    int,
    BeforeValidator(_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    WithJsonSchema(_SIZE_SCHEMA),
]
"""Bytes as an int; accepts 2048, "50MiB", "10MB", "512KiB", "100kB"."""


def _rate(value: object) -> Rate | None:
    if value is None or value is False or isinstance(value, Rate):
        return None if value is False else value  # YAML reads a bare `off` as false
    if isinstance(value, str | int):
        return parse_rate(value)
    raise ValueError(f"expected a rate such as 100/1m or off, got {_kind(value)}")


RateLimit = Annotated[
    Rate | None,
    BeforeValidator(_rate),
    PlainSerializer(format_rate, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "description": "count/duration (100/1m, 20/h) or off"}),
]
"""At most N per duration, or None (``off``); written ``100/1m``."""

Int = Annotated[int, BeforeValidator(_not_bool)]
Port = Annotated[Int, AfterValidator(_between(1, 65535))]


_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _dns_name(value: str) -> str:
    name = value.strip().lower()
    # One trailing dot is the absolute form of the same name.
    name = name.removesuffix(".")
    if not name:
        raise ValueError("must be a DNS name, got an empty string")
    if not name.isascii():
        raise ValueError(
            f"{value!r} is not an ASCII DNS name (write internationalised names in xn-- form)"
        )
    if len(name) > 253:
        raise ValueError(f"must be at most 253 characters, got {len(name)}")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise ValueError(
                f"{value!r} is not a valid DNS name (labels of 1-63 letters, digits and "
                "hyphens, not starting or ending with a hyphen)"
            )
    return name


def _ip_literal(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


def _host(value: str) -> str:
    """A host to connect to: an IP address literal or a DNS name."""
    text = value.strip()
    try:
        return str(ipaddress.ip_address(text.removeprefix("[").removesuffix("]")))
    except ValueError:
        return _dns_name(text)


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR network") from None


def _listener_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError(
            f"{value!r} is not a listener name (1-64 letters, digits, underscores, hyphens)"
        )
    return value


def _pin(value: str) -> str:
    text = value.strip()
    prefix = "sha256/"
    if not text.startswith(prefix):
        raise ValueError(f"{value!r} must look like sha256/<base64 of 32 bytes>")
    try:
        digest = base64.b64decode(text[len(prefix) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{value!r}: the part after sha256/ is not base64") from None
    if len(digest) != 32:
        raise ValueError(f"{value!r}: decodes to {len(digest)} bytes, a SHA-256 pin has 32")
    return text


def _non_empty_path(value: object) -> object:
    # Path("") is ".", which would quietly mean "the config directory".
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a path, got an empty string")
    return value


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if isinstance(base, Path) and not value.is_absolute():
        return base / value
    return value


DnsName = Annotated[str, AfterValidator(_dns_name)]
IpLiteral = Annotated[str, AfterValidator(_ip_literal)]
Host = Annotated[str, AfterValidator(_host)]
Network = Annotated[str, AfterValidator(_network)]
ListenerName = Annotated[str, AfterValidator(_listener_name)]
SpkiPin = Annotated[str, AfterValidator(_pin)]


def _path_out(value: Path, info: SerializationInfo) -> str:
    # dump_effective asks for absolute paths: the dump then means the same wherever it is saved.
    if isinstance(info.context, dict) and info.context.get("absolute_paths"):
        return str(value.absolute())
    return str(value)


FilePath = Annotated[
    Path,
    BeforeValidator(_non_empty_path),
    AfterValidator(_resolve),
    PlainSerializer(_path_out, return_type=str, when_used="json"),
]
"""A path; relative ones are resolved against the directory of the config file."""


def _unique_names(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _default_hostname() -> str:
    # getfqdn() can return names that are no DNS name (container ids with underscores, an
    # unconfigured box); the default must always validate, so fall back to localhost.
    try:
        return _dns_name(socket.getfqdn())
    except ValueError:
        return "localhost"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class ListenerConfig(_Model):
    """One listening socket and the TLS policy of the sessions it accepts."""

    name: ListenerName
    address: IpLiteral = "0.0.0.0"
    port: Port
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    require_tls: bool = Field(
        default=False,
        description="Answer 530 5.7.0 until STARTTLS. Never on public port 25 by default "
        "(RFC 3207 section 4): plaintext is scored there instead.",
    )
    greet_delay: Duration = Field(
        default=0.0,
        description="Wait this long before the banner; a client that talks first (pregreet, "
        "as spamware does) is scored PREGREET. Meant for port 25 (postscreen's greet wait); "
        "connect-stage checks (DNSBL, FCrDNS) run during the wait. 0 turns it off.",
    )
    proxy_protocol: bool = Field(
        default=False,
        description="Expect a HAProxy PROXY v1/v2 header from trusted_proxies, giving the real "
        "client address.",
    )
    trusted_proxies: list[Network] = Field(default_factory=list)
    client_cert: Literal["none", "optional", "required"] = "none"
    client_ca_file: FilePath | None = Field(
        default=None,
        description="CA certificates that client certificates are verified against. Required "
        "whenever client_cert is optional or required, pins or not: the handshake can only ask "
        "for a certificate it can verify.",
    )
    client_cert_pins: list[SpkiPin] = Field(
        default_factory=list,
        description="sha256/<base64> SPKI pins; when given, a client certificate must also match "
        "one of them (checked right after the handshake).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems: list[tuple[_Loc, str]] = []
        if self.tls == "none" and self.require_tls:
            problems.append((("require_tls",), "needs tls: starttls or implicit"))
        if self.client_cert != "none":
            if self.tls == "none":
                problems.append((("client_cert",), "needs tls: starttls or implicit"))
            if self.client_ca_file is None:
                problems.append(
                    (
                        ("client_ca_file",),
                        f"required when client_cert is {self.client_cert} (client_cert_pins "
                        "narrow it further but cannot replace it)",
                    )
                )
        else:
            if self.client_ca_file is not None:
                problems.append(
                    (
                        ("client_ca_file",),
                        "has no effect unless client_cert is optional or required",
                    )
                )
            if self.client_cert_pins:
                problems.append(
                    (
                        ("client_cert_pins",),
                        "have no effect unless client_cert is optional or required",
                    )
                )
        if self.greet_delay > 30:
            problems.append((("greet_delay",), "must be at most 30s: senders give up at 5 minutes"))
        if self.greet_delay and self.tls == "implicit":
            problems.append(
                (("greet_delay",), "has no meaning with tls: implicit (TLS speaks first)")
            )
        if self.proxy_protocol and self.tls == "implicit":
            # The header comes before the TLS handshake, and asyncio's start_tls cannot be handed
            # bytes already read: terminate TLS at the proxy or use STARTTLS behind it.
            problems.append((("proxy_protocol",), "is not supported with tls: implicit"))
        if self.proxy_protocol and not self.trusted_proxies:
            problems.append(
                (
                    ("trusted_proxies",),
                    "required when proxy_protocol is true: the addresses allowed to send a PROXY "
                    "header",
                )
            )
        if problems:
            raise _ProblemsError(problems)
        return self


class CertificatePair(_Model):
    """A certificate (leaf first, then its chain) and its unencrypted private key, PEM."""

    cert: FilePath
    key: FilePath


class TlsConfig(_Model):
    """Server certificates and protocol floor shared by all listeners."""

    certificates: list[CertificatePair] = Field(
        default_factory=list,
        description="RSA and ECDSA pairs are served together; SNI picks by name. Empty: a "
        "self-signed pair is made in data_dir on first start.",
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    handshake_timeout: Timeout = 30.0


class UpstreamConfig(_Model):
    """The mail server accepted mail is relayed to, before we answer 250."""

    host: Host | None = None
    hosts: list[Host] = Field(
        default_factory=list, description="Tried in order. Give host or hosts, not both."
    )
    port: Port = 2526
    use_tls: bool = Field(
        default=False,
        description="Relay over TLS (STARTTLS), never falling back to plaintext. Off by default "
        "only because the default upstream is the built-in development upstream on 127.0.0.1; "
        "turn it on for every real upstream (the documented deployment uses use_tls: true).",
    )
    verify_cert: bool = True
    ca_file: FilePath | None = Field(
        default=None,
        description="Extra trust anchor for a private upstream, on top of the system's.",
    )
    client_cert: FilePath | None = None
    client_key: FilePath | None = None
    server_name: DnsName | None = Field(
        default=None, description="Name to verify and send as SNI; default: the host connected to."
    )
    connect_timeout: Timeout = 30.0
    timeout: Timeout = Field(
        default=300.0, description="Per upstream reply (RFC 5321 4.5.3.2: 5 minutes)."
    )
    data_timeout: Timeout = Field(
        default=600.0, description="For the reply to the end of data (RFC 5321 4.5.3.2.6)."
    )

    @property
    def targets(self) -> tuple[str, ...]:
        """The hosts to try, in order."""
        if self.host is not None:
            return (self.host,)
        if self.hosts:
            return tuple(self.hosts)
        return ("127.0.0.1",)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems: list[tuple[_Loc, str]] = []
        if self.host is not None and self.hosts:
            problems.append((("hosts",), "give host or hosts, not both"))
        if self.client_cert is not None and self.client_key is None:
            problems.append((("client_key",), "required with client_cert"))
        if self.client_key is not None and self.client_cert is None:
            problems.append((("client_cert",), "required with client_key"))
        if problems:
            raise _ProblemsError(problems)
        return self


class DevUpstreamConfig(_Model):
    """The built-in development upstream: an SMTP server on 127.0.0.1 storing mail in a Maildir."""

    enabled: bool = True
    address: IpLiteral = "127.0.0.1"
    port: Port = 2526
    maildir: FilePath | None = Field(default=None, description="Default: data_dir/maildir.")


def _local_part(value: str) -> str:
    """A local part as listed in `recipients`: folded to lower case (matching ignores case)."""
    if not value:
        raise ValueError("must be a local part, got an empty string")
    if "@" in value:
        raise ValueError(f"{value!r} must not contain @ (list local parts under their domain)")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{value!r} must not contain spaces or control characters")
    if len(value.encode("utf-8")) > 64:
        raise ValueError(f"{value!r} is longer than 64 octets (RFC 5321 4.5.3.1.1)")
    return value.lower()


def _known_recipients(value: dict[str, list[str]]) -> dict[str, list[str]]:
    # Keys and entries are checked here rather than by field types so that a problem names
    # the domain as written (recipients.known.<domain>.<index>), and so that domains differing
    # only in case are merged instead of one silently replacing the other.
    problems: list[tuple[_Loc, str]] = []
    known: dict[str, list[str]] = {}
    for raw, parts in value.items():
        try:
            domain = _dns_name(raw)
        except ValueError as error:
            problems.append(((raw,), str(error)))
            continue
        listed = known.setdefault(domain, [])
        for index, part in enumerate(parts):
            try:
                listed.append(_local_part(part))
            except ValueError as error:
                problems.append(((raw, index), str(error)))
    if problems:
        raise _ProblemsError(problems)
    return {domain: _unique_names(parts) for domain, parts in known.items()}


# Characters that may separate a sub-address tag: atext punctuation (RFC 5322 3.2.3) without
# the routing characters the relay rule refuses anyway.
_DELIMITERS = "+-_=#~$&'*/?^`{|}"


def _delimiter(value: str) -> str:
    bad = sorted({c for c in value if c not in _DELIMITERS})
    if bad:
        raise ValueError(
            f"{''.join(bad)!r} cannot separate a sub-address; use characters from {_DELIMITERS}, "
            'or "" for no sub-addressing'
        )
    return value


class RecipientsConfig(_Model):
    """Which recipients exist, checked at RCPT before the upstream is asked."""

    known: Annotated[dict[str, list[str]], AfterValidator(_known_recipients)] = Field(
        default_factory=dict,
        description="Domain -> the local parts that exist there; any other local part of a "
        "listed domain gets 550 5.1.1 without asking the upstream. A domain not listed is "
        "verified by the upstream alone. Case-insensitive; postmaster always exists.",
    )
    files: list[FilePath] = Field(
        default_factory=list,
        description="Files of full addresses, one per line (# comments), merged into known; "
        "read at start and on reload.",
    )
    delimiter: Annotated[str, AfterValidator(_delimiter)] = Field(
        default="+",
        description="Sub-address delimiter characters: alice+tag@ is alice@. Empty: none.",
    )
    max_unknown: Annotated[Int, AfterValidator(_at_least(0))] = Field(
        default=5,
        description="Unknown recipients (ours or the upstream's 5.1.x) one session may try; "
        "the next one gets 421 4.7.0 and the session is closed (directory harvest). 0: no cap.",
    )


def _show_size(value: int) -> str:
    return format_size(value)


class LimitsConfig(_Model):
    """Every per-session and global limit, with the reason for its floor where a RFC sets one."""

    max_message_size: Annotated[
        Size, AfterValidator(_between(1024, 2 * 1024**3, show=_show_size))
    ] = Field(
        default=50 * 1024**2,
        description="Advertised in SIZE; larger DATA is read to the end and answered 552.",
    )
    max_recipients: Annotated[Int, AfterValidator(_between(1, 100_000))] = Field(
        default=100, description="RFC 5321 4.5.3.1.8 asks for at least 100."
    )
    max_command_length: Annotated[Int, AfterValidator(_at_least(512, " (RFC 5321 4.5.3.1.4)"))] = (
        512
    )
    max_line_length: Annotated[Int, AfterValidator(_at_least(1000, " (RFC 5321 4.5.3.1.6)"))] = 1000
    max_bad_commands: Annotated[Int, AfterValidator(_at_least(1))] = Field(
        default=20, description="Unknown or malformed commands before 421 and disconnect."
    )
    command_timeout: Timeout = Field(
        default=300.0, description="Waiting for the next command (RFC 5321 4.5.3.2.7: 5 minutes)."
    )
    data_timeout: Timeout = Field(
        default=180.0, description="Per DATA block read (RFC 5321 4.5.3.2.5: 3 minutes)."
    )
    min_data_rate: Annotated[Int, AfterValidator(_at_least(0))] = Field(
        default=500,
        description="Bytes per second a message must average (like Postfix's "
        "smtpd_min_data_rate): a message gets data_timeout plus its size divided by this rate "
        "from the go-ahead, so a one-byte-per-second drip cannot hold a session forever. "
        "0 turns it off.",
    )
    max_connections: Annotated[Int, AfterValidator(_at_least(1))] = Field(
        default=1000, description="Global; 421 4.7.0 above it."
    )
    max_connections_per_ip: Annotated[Int, AfterValidator(_at_least(1))] = 20
    max_message_memory: Size = Field(
        default=512 * 1024**2,
        description="Message text held in memory by all sessions of one worker together: new "
        "DATA gets 452 4.3.1 once three quarters of it are held, and the session whose bytes "
        "pass it gets "
        "421 4.3.1 (its sender retries; nothing was accepted). Bounds what many slow senders "
        "of large messages can make a worker hold.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems: list[tuple[_Loc, str]] = []
        if self.max_connections_per_ip > self.max_connections:
            problems.append(
                (
                    ("max_connections_per_ip",),
                    f"must not exceed max_connections ({self.max_connections})",
                )
            )
        if self.max_message_memory < self.max_message_size:
            problems.append(
                (
                    ("max_message_memory",),
                    "must be at least max_message_size "
                    f"({_show_size(self.max_message_size)}), or no message of that size fits",
                )
            )
        if problems:
            raise _ProblemsError(problems)
        return self


class LogConfig(_Model):
    """Log output."""

    format: Literal["text", "json"] = "text"


class CheckConfig(_Model):
    """Settings every check has."""

    enabled: bool = True
    on_error: Literal["accept", "tempfail"] = Field(
        default="accept",
        description="What a failure or timeout of this check means: accept (score it as "
        "CHECK_ERROR/CHECK_TIMEOUT and go on) or tempfail (451 4.7.1, the sender retries).",
    )
    timeout: Timeout = 5.0


class DnsblZone(_Model):
    zone: DnsName
    weight: float = Field(description="Points when listed; negative for an allow list.")
    match: list[Network] = Field(
        default_factory=list,
        description="Return addresses that count (e.g. 127.0.0.2/32); default: any 127.0.0.0/8 "
        "except 127.255.255.0/24, which lists use for 'query refused'.",
    )


class DnsblConfig(CheckConfig):
    zones: list[DnsblZone] = Field(default_factory=list)


class ChecksConfig(_Model):
    """One section per check."""

    helo: CheckConfig = Field(default_factory=CheckConfig)
    dnsbl: DnsblConfig = Field(default_factory=DnsblConfig)
    fcrdns: CheckConfig = Field(default_factory=lambda: CheckConfig(enabled=False))


class DnsConfig(_Model):
    """The resolver every DNS check shares (one per worker process)."""

    nameservers: list[str] = Field(
        default_factory=list,
        description="IP, IP:port or [IPv6]:port; empty: the system's /etc/resolv.conf.",
    )
    timeout: Timeout = 5.0
    cache_size: Annotated[Int, AfterValidator(_at_least(0))] = 10_000
    backend: Literal["cares", "dnspython"] = Field(
        default="cares",
        description=(
            "cares: c-ares, about a fifth of dnspython's CPU per uncached lookup (TLSA still "
            "goes through dnspython, for the DNSSEC AD bit); dnspython: dnspython for all."
        ),
    )


class ThresholdsConfig(_Model):
    tag: float = 5.0
    reject: float = 15.0

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.reject < self.tag:
            raise _ProblemsError([(("reject",), f"must not be below tag ({self.tag:g})")])
        return self


def _known_symbols(value: dict[str, float]) -> dict[str, float]:
    from spamkiller.checks.symbols import SYMBOLS  # a leaf table: no cycle, no heavy import

    unknown = sorted(set(value) - set(SYMBOLS))
    if unknown:
        raise ValueError(f"unknown symbol(s) {', '.join(unknown)}; see docs/symbols.md")
    return value


class PolicyConfig(_Model):
    """Weights and thresholds: findings become a score, the score an action."""

    weights: Annotated[dict[str, float], AfterValidator(_known_symbols)] = Field(
        default_factory=dict, description="Symbol -> weight, overriding docs/symbols.md."
    )
    thresholds: ThresholdsConfig = Field(default_factory=ThresholdsConfig)


# Clients that are this host, or inside the organisation: never limited or greylisted unless the
# admin empties the list.
_INTERNAL_NETWORKS = [
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
]

IPv4Prefix = Annotated[Int, AfterValidator(_between(8, 32))]
IPv6Prefix = Annotated[Int, AfterValidator(_between(16, 128))]


class RateLimitsConfig(CheckConfig):
    """Connection and message rates and concurrent sessions per client address and per network,
    counted in the shared store (so every worker and every MX host on one Redis see one count)."""

    timeout: Timeout = Field(default=1.0, description="Per store operation.")
    exempt: list[Network] = Field(
        default_factory=lambda: list(_INTERNAL_NETWORKS),
        description="Clients never limited (this host, internal networks).",
    )
    ipv4_prefix: IPv4Prefix = Field(default=24, description="What 'network' means for IPv4.")
    ipv6_prefix: IPv6Prefix = Field(default=64, description="What 'network' means for IPv6.")
    connections_per_ip: RateLimit = Field(
        default=Rate(100, 60.0), description="New connections; above it: 421 4.7.0 at connect."
    )
    connections_per_network: RateLimit = Rate(1000, 60.0)
    messages_per_ip: RateLimit = Field(
        default=Rate(1000, 3600.0), description="MAIL commands; above it: 451 4.7.1 at MAIL."
    )
    messages_per_network: RateLimit = Rate(10_000, 3600.0)
    concurrent_per_ip: Annotated[Int, AfterValidator(_at_least(0))] = Field(
        default=20, description="Sessions open at once, across workers and hosts; 0: no cap."
    )
    concurrent_per_network: Annotated[Int, AfterValidator(_at_least(0))] = 200
    slot_ttl: Timeout = Field(
        default=3600.0,
        description="A session's concurrency slot expires after this even if never given back "
        "(a crashed worker); a longer session stops counting then.",
    )


class GreylistConfig(CheckConfig):
    """Greylisting at RCPT: a first attempt from an unknown sender is told to come back later."""

    timeout: Timeout = Field(default=1.0, description="Per store operation.")
    delay: Duration = Field(
        default=300.0, description="A retry earlier than this is tempfailed again."
    )
    retry_window: Timeout = Field(
        default=2 * 86400.0, description="The first retry must come within this."
    )
    expire: Timeout = Field(
        default=35 * 86400.0,
        description="A sender that passed is remembered this long after its last message.",
    )
    min_score: float = Field(
        default=0.0,
        description="Sessions scoring below this (on a DNS allow list, say) are not greylisted.",
    )
    auto_pass_accepted: Annotated[Int, AfterValidator(_at_least(0))] = Field(
        default=5,
        description="Skip greylisting for a client network after this many of its messages "
        "were accepted by the upstream; 0: never.",
    )
    auto_pass_tls_sessions: Annotated[Int, AfterValidator(_at_least(0))] = Field(
        default=0,
        description="Skip greylisting for a TLS client that used TLS in at least this many "
        "sessions and never came without it; 0: never.",
    )
    exempt: list[Network] = Field(
        default_factory=lambda: list(_INTERNAL_NETWORKS),
        description="Clients never greylisted.",
    )
    ipv4_prefix: IPv4Prefix = 24
    ipv6_prefix: IPv6Prefix = 64

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        problems: list[tuple[_Loc, str]] = []
        if self.delay >= self.retry_window:
            problems.append(
                (
                    ("delay",),
                    f"must be shorter than retry_window ({format_duration(self.retry_window)})",
                )
            )
        if self.retry_window > self.expire:
            problems.append(
                (
                    ("retry_window",),
                    f"must not be longer than expire ({format_duration(self.expire)})",
                )
            )
        if problems:
            raise _ProblemsError(problems)
        return self


class PassCacheConfig(_Model):
    """Clients whose connect-stage checks found nothing skip them (and the greet delay) for a
    while, like postscreen's cache."""

    enabled: bool = True
    ttl: Timeout = 3600.0


class TarpitConfig(_Model):
    """Slow down clients that score badly: each reply after the score reaches min_score waits."""

    enabled: bool = False
    min_score: float = 5.0
    delay: Annotated[Timeout, AfterValidator(_at_most(60.0))] = 3.0


def _state_url(value: str | None, info: ValidationInfo) -> str | None:
    """The store URL, checked for shape here so that check-config finds a typo.

    spamkiller.store.redis.parse_ha_url is the full parser of the Sentinel and Cluster forms
    (this module may not import the store); tests/unit/test_store_urls.py keeps the two in step.
    """
    if value is None:
        return None
    if value.startswith("sqlite:///"):
        path = value.removeprefix("sqlite:///")
        if not path.strip():
            raise ValueError(
                "sqlite:/// needs a path: sqlite:///state.db or sqlite:////abs/state.db"
            )
        return f"sqlite:///{_resolve(Path(path), info)}"
    scheme, _, rest = value.partition("://")
    # The last "@" ends user:password, whatever the password holds; messages never show it.
    userinfo, _, after = rest.rpartition("@")
    location, _, fragment = after.partition("#")
    location, _, query = location.partition("?")
    hosts, _, path = location.partition("/")
    if scheme.startswith("redis") and any(char in userinfo for char in "@/?#"):
        # Split at the first of them, the URL would show part of the password in the log.
        raise ValueError(
            f"{scheme} URL: percent-encode @ / ? # in the user name and password (%40 %2F %3F %23)"
        )
    if scheme in ("redis", "rediss"):
        if not hosts:
            raise ValueError("redis URL needs a host: redis://host:6379/0")
        if "," in hosts:
            raise ValueError(
                f"{scheme}:// takes one host; for several use {scheme}-sentinel:// (Sentinel)"
                f" or {scheme}-cluster:// (Cluster)"
            )
        return value
    if scheme not in ("redis-sentinel", "rediss-sentinel", "redis-cluster", "rediss-cluster"):
        raise ValueError(
            "must start with sqlite:///, redis://, rediss://, redis-sentinel://,"
            " rediss-sentinel://, redis-cluster:// or rediss-cluster://"
        )
    sentinel = scheme.endswith("-sentinel")
    example = f"{scheme}://host1:{26379 if sentinel else 6379},host2:..." + (
        "/mymaster" if sentinel else ""
    )
    if fragment:
        raise ValueError(f"{scheme} URL: no #fragment allowed")
    if not hosts:
        raise ValueError(f"{scheme} URL needs at least one host: {example}")
    for node in hosts.split(","):
        port: str | None
        if node.startswith("["):
            bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", node)
            host, port = (bracketed[1], bracketed[2]) if bracketed else ("", None)
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(
                    f"{scheme} URL: {node!r} is not a bracketed IPv6 address"
                ) from None
        else:
            host, colon, port = node.partition(":")
            if ":" in port:
                raise ValueError(f"{scheme} URL: an IPv6 address goes in brackets: [2001:db8::1]")
            if not re.fullmatch(r"[A-Za-z0-9._-]+", host):
                raise ValueError(f"{scheme} URL: bad host {host!r} in {hosts!r}: {example}")
            port = port if colon else None
        if port is not None and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
            raise ValueError(f"{scheme} URL: bad port in {node!r}: must be 1 to 65535")
    trimmed = path.removesuffix("/")
    segments = trimmed.split("/") if trimmed else []
    if sentinel:
        if not segments:
            raise ValueError(f"{scheme} URL needs the Sentinel service name: {example}")
        service = unquote(segments[0])
        if not service.isprintable() or " " in service:
            raise ValueError(f"{scheme} URL: the service name must be printable, without spaces")
        if len(segments) > 2 or (
            len(segments) == 2 and not re.fullmatch(r"[0-9]{1,5}", segments[1])
        ):
            raise ValueError(f"{scheme} URL: the path is /<service name>[/<db number>]")
    elif segments not in ([], ["0"]):
        raise ValueError(f"{scheme} URL: Redis Cluster has no databases: leave out the /db")
    # No secrets in options: the URL is logged with its query string.
    known = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name == "sentinel_auth" and sentinel:
            continue
        if name not in known:
            raise ValueError(f"{scheme} URL: unknown option {name!r}")
        if not scheme.startswith("rediss"):
            raise ValueError(f"{scheme} URL: {name} needs TLS (rediss-...)")
    return value


def _default_listeners() -> list[ListenerConfig]:
    return [ListenerConfig(name="mx", address="127.0.0.1", port=2525, tls="starttls")]


class Config(_Model):
    """The whole configuration of one Spam Killer instance."""

    hostname: DnsName = Field(
        default_factory=_default_hostname,
        description="Our name in the banner, EHLO and Received.",
    )
    domains: Annotated[list[DnsName], AfterValidator(_unique_names)] = Field(
        default_factory=lambda: ["localhost"],
        description="Recipient domains we accept; everything else: 550 5.7.1.",
    )
    recipients: RecipientsConfig = Field(default_factory=RecipientsConfig)
    listeners: list[ListenerConfig] = Field(default_factory=_default_listeners)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    dev_upstream: DevUpstreamConfig = Field(default_factory=DevUpstreamConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    state: Annotated[str | None, AfterValidator(_state_url)] = Field(
        default=None,
        description="sqlite:///path for one host; for several, redis://host:6379/0 (one Redis), "
        "redis-sentinel://host:26379,host:26379/service (Sentinel) or "
        "redis-cluster://host:6379,host:6379 (Cluster), rediss...: over TLS "
        "(docs/store.md); default: sqlite in data_dir/state.db. A relative sqlite path is "
        "relative to this file.",
    )
    state_timeout: Timeout = Field(
        default=1.0,
        description="How long one store operation may wait (Redis socket, SQLite lock).",
    )
    data_dir: FilePath = Field(
        default=Path("spam-killer-data"),
        description="Holds the self-signed certificate made when tls.certificates is empty, and "
        "the development upstream's Maildir.",
    )
    workers: Annotated[Int, AfterValidator(_between(1, 64))] = Field(
        default=1, description="Worker processes sharing each listening port (SO_REUSEPORT)."
    )
    shutdown_timeout: Duration = Field(
        default=30.0, description="How long SIGTERM lets open sessions finish."
    )
    log: LogConfig = Field(default_factory=LogConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    greylist: GreylistConfig = Field(default_factory=GreylistConfig)
    pass_cache: PassCacheConfig = Field(default_factory=PassCacheConfig)
    tarpit: TarpitConfig = Field(default_factory=TarpitConfig)

    @property
    def state_url(self) -> str:
        """The store URL in force: `state`, or SQLite in data_dir."""
        return self.state or f"sqlite:///{self.data_dir / 'state.db'}"

    @property
    def dev_maildir(self) -> Path:
        """Where the development upstream stores mail."""
        return self.dev_upstream.maildir or self.data_dir / "maildir"

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems: list[tuple[_Loc, str]] = []
        if not self.domains:
            problems.append((("domains",), "at least one domain is needed"))
        for domain in self.recipients.known:
            if domain not in self.domains:
                problems.append((("recipients", "known", domain), "is not one of domains"))
        if not self.listeners:
            problems.append((("listeners",), "at least one listener is needed"))

        names: dict[str, int] = {}
        for index, listener in enumerate(self.listeners):
            if listener.name in names:
                problems.append(
                    (
                        ("listeners", index, "name"),
                        f"duplicate name {listener.name!r} (also listeners.{names[listener.name]})",
                    )
                )
            else:
                names[listener.name] = index

        sockets: list[tuple[str, int, str]] = []
        for index, listener in enumerate(self.listeners):
            for address, port, owner in sockets:
                if port == listener.port and _overlap(address, listener.address):
                    problems.append(
                        (
                            ("listeners", index, "port"),
                            f"{listener.address} port {port} overlaps {owner} ({address})",
                        )
                    )
                    break
            sockets.append((listener.address, listener.port, f"listeners.{index}"))
        if self.dev_upstream.enabled:
            dev = self.dev_upstream
            for address, port, owner in sockets:
                if port == dev.port and _overlap(address, dev.address):
                    problems.append(
                        (("dev_upstream", "port"), f"{dev.address} port {port} overlaps {owner}")
                    )
                    break
        if problems:
            raise _ProblemsError(problems)
        return self


def _overlap(first: str, second: str) -> bool:
    """Would two listening addresses (same port) take each other's connections?

    Identical addresses do, and so does a wildcard with any address of its family: with
    SO_REUSEPORT the kernel lets both bind and then hands one listener's clients to the other.
    """
    one, two = ipaddress.ip_address(first), ipaddress.ip_address(second)
    if one == two:
        return True
    if one.version != two.version:
        return False
    return one.is_unspecified or two.is_unspecified


# --------------------------------------------------------------------------------------------
# Loading and dumping
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys in a mapping."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict[Any, Any]:
    if isinstance(node, MappingNode):
        seen: set[object] = set()
        for key_node, _ in node.value:
            # Merge keys ("<<: *defaults") may be overridden on purpose; only own keys count.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: construct_mapping reports it properly
                continue
            if duplicate:
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
    return loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load(path: str | Path | None) -> Config:
    """Read and validate the config file; None gives the defaults. Raises ConfigError."""
    if path is None:
        return Config()
    file = Path(path)
    data = _read_yaml(file)
    if data is None:  # an empty file (or only comments) means "all defaults"
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping of keys to values, got {_kind(data)}"])
    try:
        return Config.model_validate(data, context={"base_dir": file.absolute().parent})
    except ValidationError as error:
        raise ConfigError(_problem_lines(error)) from None


def _read_text(file: Path) -> tuple[str, str | None]:
    """The file's UTF-8 text, or ("", "<file>: why it cannot be read")."""
    try:
        return file.read_text(encoding="utf-8"), None
    except FileNotFoundError:
        return "", f"{file}: no such file"
    except IsADirectoryError:
        return "", f"{file}: is a directory, not a file"
    except PermissionError:
        return "", f"{file}: not readable (permission denied)"
    except UnicodeDecodeError as error:
        return "", f"{file}: not UTF-8 text (byte {error.start})"
    except OSError as error:
        return "", f"{file}: cannot read: {error.strerror or error}"


def _read_yaml(file: Path) -> object:
    text, problem = _read_text(file)
    if problem is not None:
        raise ConfigError([problem])
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = error.problem or error.context or "invalid YAML"
        raise ConfigError([f"{file}: {where}{what}"]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"{file}: invalid YAML: {error}"]) from None


def _problem_lines(error: ValidationError) -> list[str]:
    lines: list[str] = []
    for detail in error.errors(include_url=False):
        loc: _Loc = tuple(detail["loc"])
        cause = (detail.get("ctx") or {}).get("error")
        if isinstance(cause, _ProblemsError):
            lines.extend(f"{_dotted(loc + sub)}: {reason}" for sub, reason in cause.problems)
        else:
            lines.append(f"{_dotted(loc)}: {_message(detail)}")
    return list(dict.fromkeys(lines))


def _message(detail: Any) -> str:
    kind: str = detail["type"]
    message: str = detail["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind in {"dict_type", "model_type", "model_attributes_type"}:
        return f"must be a mapping of keys to values, got {_kind(detail.get('input'))}"
    if kind == "list_type":
        return f"must be a list, got {_kind(detail.get('input'))}"
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    message = message.replace("Input should be", "must be", 1)
    value = detail.get("input")
    if isinstance(value, str | int | float):
        message += f", got {value!r}"
    return message


def dump_effective(config: Config) -> str:
    """The effective configuration as YAML: durations and sizes in their written form, paths
    absolute (resolved against the current directory, as the running service would)."""
    data = config.model_dump(mode="json", context={"absolute_paths": True})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


_MAX_LINE_PROBLEMS = 5  # per file: a wrong file (a binary, a CSV) must not flood the output


def known_recipients(config: Config) -> tuple[dict[str, frozenset[str]], list[str]]:
    """`recipients.known` merged with `recipients.files`: the table, and problem lines.

    Reads the files (``load`` does not), so both ``check_files`` and the server at start and on
    reload judge the same contents. A file that cannot be read, a line that is no address, or an
    address outside ``domains`` is a ``recipients.files.<index>: ...`` problem.
    """
    known = {domain: set(parts) for domain, parts in config.recipients.known.items()}
    problems: list[str] = []
    for index, path in enumerate(config.recipients.files):
        key = f"recipients.files.{index}"
        text, problem = _read_text(path)
        if problem is not None:
            problems.append(f"{key}: {problem}")
            continue
        bad: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            # "#" is legal inside a local part, so a comment starts a line or follows a blank.
            entry = re.split(r"\s#", line, maxsplit=1)[0].strip()
            if not entry or entry.startswith("#"):
                continue
            local, at, domain = entry.rpartition("@")
            try:
                if not at:
                    raise ValueError(f"{entry!r} is not an address (local@domain)")
                local = _local_part(local)
                domain = _dns_name(domain)
            except ValueError as error:
                bad.append(f"{key}: {path} line {number}: {error}")
                continue
            if domain not in config.domains:
                bad.append(f"{key}: {path} line {number}: {domain} is not one of domains")
                continue
            known.setdefault(domain, set()).add(local)
        if len(bad) > _MAX_LINE_PROBLEMS:
            more = len(bad) - _MAX_LINE_PROBLEMS
            bad[_MAX_LINE_PROBLEMS:] = [f"{key}: {path}: {more} more bad line(s)"]
        problems.extend(bad)
    return {domain: frozenset(parts) for domain, parts in known.items()}, problems


def _walk_files(config: Config) -> Iterator[tuple[str, Path]]:
    """Every CA file the configuration names, with its key path."""
    for index, listener in enumerate(config.listeners):
        if listener.client_ca_file is not None:
            yield f"listeners.{index}.client_ca_file", listener.client_ca_file
    if config.upstream.ca_file is not None:
        yield "upstream.ca_file", config.upstream.ca_file


def check_files(config: Config) -> list[str]:
    """Check the files the configuration names, without starting anything; return problem lines.

    Certificates and keys must load, match and be valid now, and be servable together by every
    TLS listener; CA files must hold at least one certificate; the upstream client pair must match;
    recipient address files must be readable and hold addresses of our domains.
    """
    from spamkiller.errors import TlsConfigError
    from spamkiller.tls.certs import check_ca_file, inspect_pair, load_pairs

    problems: list[str] = []
    pairs = [(pair.cert, pair.key) for pair in config.tls.certificates]
    try:
        loaded = load_pairs(pairs, key_path_prefix="tls.certificates")
    except TlsConfigError as error:
        problems.extend(error.problems)
        loaded = []
    ca_problems: list[str] = []
    for key, path in _walk_files(config):
        ca_problems.extend(check_ca_file(path, key=key))
    problems.extend(ca_problems)
    upstream = config.upstream
    if upstream.client_cert is not None and upstream.client_key is not None:
        _, found = inspect_pair(
            upstream.client_cert,
            upstream.client_key,
            cert_key="upstream.client_cert",
            key_key="upstream.client_key",
        )
        problems.extend(found)

    # Building the contexts finds what only shows when pairs are combined (two RSA certificates
    # for one name); only worth it once the files themselves are fine.
    if loaded and not problems:
        for index, listener in enumerate(config.listeners):
            if listener.tls == "none":
                continue
            try:
                listener_tls(config, index, loaded)
            except TlsConfigError as error:
                problems.extend(error.problems)
    problems.extend(known_recipients(config)[1])
    problems.extend(_state_problems(config))
    return list(dict.fromkeys(problems))


def _state_problems(config: Config) -> list[str]:
    """An SQLite state file must be creatable or writable (Redis is not contacted here: an MX
    whose Redis is down still starts, and each feature applies its on_error)."""
    url = config.state_url
    if not url.startswith("sqlite:///"):
        return []
    path = Path(url.removeprefix("sqlite:///"))
    if path.exists():
        if not path.is_file():
            return [f"state: {path} is not a file"]
        if not os.access(path, os.R_OK | os.W_OK):
            return [f"state: {path} is not readable and writable by this user"]
        return []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the directories up to here will be made at start
    if not parent.is_dir():
        return [f"state: cannot create {path}: {parent} is not a directory"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"state: cannot create {path}: {parent} is not writable by this user"]
    return []


def listener_tls(config: Config, index: int, pairs: Sequence[LoadedPair]) -> ServerTls:
    """The TLS contexts of listener `index` (TlsConfigError naming its keys if they cannot be made).

    One place for both `check_files` and the server, so check-config judges what will run.
    """
    from spamkiller.tls.contexts import ServerTls

    listener = config.listeners[index]
    return ServerTls.build(
        pairs,
        min_version=config.tls.min_version,
        client_cert=listener.client_cert,
        client_ca_file=listener.client_ca_file,
        client_cert_pins=listener.client_cert_pins,
        listener_key=f"listeners.{index}",
    )
