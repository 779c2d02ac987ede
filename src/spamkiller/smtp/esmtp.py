"""MAIL FROM and RCPT TO arguments: the path and the ESMTP parameters we advertise.

We advertise SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531); any other parameter is
refused with 555 (RFC 5321 4.1.1.11) rather than silently ignored, so a sender never believes we
honoured DSN or BINARYMIME.
"""

from __future__ import annotations

from dataclasses import dataclass

from spamkiller.smtp.address import Address, AddressError, parse_path


class ParameterError(ValueError):
    """A parameter we do not support or with a bad value; `code`/`enhanced` say which reply."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        self.code = code
        self.enhanced = enhanced
        self.text = text
        super().__init__(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class MailParams:
    size: int | None = None
    body: str = "7BIT"  # 7BIT | 8BITMIME
    smtputf8: bool = False


NO_PARAMS = MailParams()  # MAIL without parameters; shared, as the params are immutable


def _split(arg: str, keyword: str) -> tuple[str, list[str]]:
    """Split "FROM:<path> P1 P2" into the path and the parameters."""
    if arg[: len(keyword)].upper() != keyword:
        raise ParameterError(501, "5.5.4", f"Syntax: {keyword}<address>")
    rest = arg[len(keyword) :].lstrip(" ")  # one space after the colon is common; tolerate it
    if not rest.startswith("<"):
        raise ParameterError(501, "5.5.4", f"Syntax: {keyword}<address>")
    end = _path_end(rest)
    if end < 0:
        raise ParameterError(501, "5.5.4", "Unterminated address")
    path, params = rest[: end + 1], rest[end + 1 :]
    if params and not params.startswith(" "):
        raise ParameterError(501, "5.5.4", "Garbage after address")
    return path, params.split()


def _path_end(text: str) -> int:
    """Index of the '>' closing the path, honouring quoted local parts."""
    if '"' not in text:
        return text.find(">")  # the common case, without a Python step per character
    quoted = False
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_mail(arg: str, *, max_size: int) -> tuple[Address | None, MailParams]:
    path, params = _split(arg, "FROM:")
    size: int | None = None
    body = "7BIT"
    smtputf8 = False
    seen: set[str] = set()
    for param in params:
        key, _, value = param.partition("=")
        key = key.upper()
        if key in seen:
            raise ParameterError(501, "5.5.4", f"Duplicate parameter {key}")
        seen.add(key)
        if key == "SIZE":
            if not (value.isascii() and value.isdigit()) or len(value) > 20:
                raise ParameterError(501, "5.5.4", "Bad SIZE value")
            size = int(value)
            if size > max_size:
                raise ParameterError(552, "5.3.4", "Message size exceeds fixed limit")
        elif key == "BODY":
            body = value.upper()
            if body not in ("7BIT", "8BITMIME"):
                raise ParameterError(555, "5.5.4", "Unsupported BODY type")
        elif key == "SMTPUTF8" and not value:
            smtputf8 = True
        else:
            raise ParameterError(555, "5.5.4", "Unsupported parameter")
    try:
        address = parse_path(path, utf8=smtputf8, allow_null=True)
    except AddressError as exc:
        raise ParameterError(501, "5.1.7", f"Bad sender address: {exc}") from None
    if not params:
        return address, NO_PARAMS
    return address, MailParams(size=size, body=body, smtputf8=smtputf8)


def parse_rcpt(arg: str, *, smtputf8: bool) -> Address:
    path, params = _split(arg, "TO:")
    if params:
        raise ParameterError(555, "5.5.4", "Unsupported parameter")
    try:
        address = parse_path(path, utf8=smtputf8)
    except AddressError as exc:
        raise ParameterError(501, "5.1.3", f"Bad recipient address: {exc}") from None
    if address is None:  # unreachable: allow_null is False; keeps the type narrow without assert
        raise ParameterError(501, "5.1.3", "Bad recipient address: null path")
    return address
