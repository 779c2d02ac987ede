"""SMTP replies: a value type, its wire form, and the replies the session gives on its own.

Reply texts never carry client-supplied bytes unchecked: the session only echoes tokens that passed
its syntax checks, and `Reply` refuses CR, LF and NUL in its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a code, an optional enhanced status code, one or more lines."""

    code: int
    enhanced: str = ""
    text: str | tuple[str, ...] = ""
    # The wire form, rendered on first use: replies parsed from the upstream are mostly only read.
    _wire: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        lines = (self.text,) if isinstance(self.text, str) else self.text
        for line in lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise ValueError("reply text must not contain CR, LF or NUL")

    @property
    def wire(self) -> bytes:
        wire = self._wire
        if not wire:
            wire = _render(self.code, self.enhanced, self.lines)
            object.__setattr__(self, "_wire", wire)
        return wire

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    def with_id(self, session_id: str) -> Reply:
        """The same reply with `(id XXXX)` on its last line, as every 4xx/5xx of ours carries."""
        lines = list(self.lines)
        lines[-1] = f"{lines[-1]} (id {session_id})" if lines[-1] else f"(id {session_id})"
        return Reply(self.code, self.enhanced, tuple(lines))

    def __str__(self) -> str:
        return self.wire.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", " / ")


def _render(code: int, enhanced: str, lines: tuple[str, ...]) -> bytes:
    prefix = f"{enhanced} " if enhanced else ""
    out = []
    last = len(lines) - 1
    for i, line in enumerate(lines):
        sep = " " if i == last else "-"
        # Only the first line carries the enhanced code in our replies; RFC 2034 allows either.
        body = f"{prefix}{line}" if i == 0 or not enhanced else f"{enhanced} {line}"
        out.append(f"{code}{sep}{body}".rstrip() + "\r\n")
    return "".join(out).encode("utf-8")


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
MESSAGE_ACCEPTED = Reply(250, "2.0.0", "Message accepted")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
CLOSING = Reply(221, "2.0.0", "Bye")

TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_LF = Reply(500, "5.5.2", "Bare LF in command; lines must end with CRLF")
BARE_CR = Reply(500, "5.5.2", "Bare CR in command")
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL in command")
NOT_ASCII = Reply(500, "5.5.2", "Command must be ASCII")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Send MAIL first")
NEED_RCPT = Reply(503, "5.5.1", "Send RCPT first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
BDAT_THEN_DATA = Reply(503, "5.5.1", "DATA not allowed after BDAT")
TLS_UNAVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
NO_PARAMETERS = Reply(501, "5.5.4", "No parameters allowed")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BARE_LF_IN_DATA = Reply(550, "5.5.2", "Message contains a bare LF; lines must end with CRLF")
BARE_CR_IN_DATA = Reply(550, "5.5.2", "Message contains a bare CR; lines must end with CRLF")
NUL_IN_DATA = Reply(550, "5.5.2", "Message contains a NUL octet")
LONG_LINE_IN_DATA = Reply(550, "5.5.2", "Message contains a line longer than 1000 octets")
BAD_BDAT = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]; closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
