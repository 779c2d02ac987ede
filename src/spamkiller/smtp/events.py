"""What the sans-IO session tells its driver, one event per client command or protocol fault.

Every event but `ConnectionClosed` carries `reply`: what the session would answer by itself. The
driver may send that reply or a policy reply in its place, always through `ServerSession.send`, so
the state machine sees every answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spamkiller.smtp.address import Address
from spamkiller.smtp.esmtp import MailParams
from spamkiller.smtp.replies import Reply


class NeedData:
    """Sentinel: feed `receive_data` before asking for the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class MessageData:
    """A received message, kept in the form it arrived in and converted only on demand.

    DATA keeps the dot-stuffed wire form (already proven CRLF-only), which is exactly what the
    relay writes upstream; BDAT keeps the raw octets. Conversion is one `bytes.replace`.
    """

    __slots__ = ("_raw", "_stuffed", "size")

    def __init__(self, *, stuffed: bytes | None = None, raw: bytes | None = None) -> None:
        if (stuffed is None) == (raw is None):
            raise ValueError("give exactly one of stuffed or raw")
        self._stuffed = stuffed
        self._raw = raw
        self.size = len(raw) if raw is not None else len(stuffed or b"")

    def stuffed(self) -> bytes:
        """CRLF lines, leading dots doubled, ending in CRLF (or empty); no final dot."""
        if self._stuffed is None:
            raw = self._raw or b""
            if raw and not raw.endswith(b"\r\n"):
                raw += b"\r\n"  # RFC 3030 5: a BDAT message need not end in CRLF; DATA needs it
            body = raw.replace(b"\r\n.", b"\r\n..")
            self._stuffed = b"." + body if body.startswith(b".") else body
        return self._stuffed

    def content(self) -> bytes:
        """The message as the sender meant it: RFC 5321 4.5.2, a line's leading '.' removed.

        A line with a single leading dot (a client that forgot to stuff) loses it too, exactly as
        the upstream will when it reads the stuffed form we forward.
        """
        if self._raw is None:
            body = (self._stuffed or b"").replace(b"\r\n.", b"\r\n")
            self._raw = body[1:] if body.startswith(b".") else body
        return self._raw


@dataclass(frozen=True, slots=True)
class Ehlo:
    name: str
    extended: bool  # EHLO (True) or HELO (False)
    reply: Reply


@dataclass(frozen=True, slots=True)
class MailFrom:
    sender: Address | None  # None is the null reverse-path <>
    params: MailParams
    reply: Reply


@dataclass(frozen=True, slots=True)
class RcptTo:
    recipient: Address
    reply: Reply


@dataclass(frozen=True, slots=True)
class DataCommand:
    reply: Reply  # 354 by default


@dataclass(frozen=True, slots=True)
class BdatChunk:
    """A non-final BDAT chunk was read in full (RFC 3030)."""

    size: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """End of data (DATA's final dot or BDAT LAST) with a well-formed message."""

    data: MessageData = field(repr=False)
    reply: Reply


@dataclass(frozen=True, slots=True)
class DataRejected:
    """End of data, but the message broke a rule (size, bare CR/LF, NUL, line length)."""

    reason: str
    size: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class Reset:
    reply: Reply


@dataclass(frozen=True, slots=True)
class Quit:
    reply: Reply


@dataclass(frozen=True, slots=True)
class StartTls:
    reply: Reply  # 220; after sending it the driver must call start_tls()


@dataclass(frozen=True, slots=True)
class Answer:
    """A command the session answers by itself (NOOP, HELP, VRFY, EXPN, 530 before TLS)."""

    verb: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Violation:
    """The client broke the protocol; `close` means the connection ends after the reply."""

    reason: str
    reply: Reply
    close: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its side (EOF); `mid_data` if it was inside a message."""

    mid_data: bool = False


Event = (
    Ehlo
    | MailFrom
    | RcptTo
    | DataCommand
    | BdatChunk
    | MessageReceived
    | DataRejected
    | Reset
    | Quit
    | StartTls
    | Answer
    | Violation
)
