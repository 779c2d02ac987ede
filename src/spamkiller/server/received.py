"""Our Received: header (RFC 5321 4.4), with RFC 3848 protocol names and Postfix-style TLS facts.

Everything echoed from the client (HELO name, address) already passed the session's syntax checks
(printable ASCII, no CR/LF); it is still folded onto separate lines only at our own CRLF+TAB, so
the header is exactly one header.
"""

from __future__ import annotations

import time

from spamkiller.tls.facts import TlsFacts

_cache: tuple[int, str] = (-1, "")


def _date() -> str:
    global _cache  # noqa: PLW0603 -- one formatted date per second is plenty
    now = int(time.time())
    if _cache[0] != now:
        _cache = (now, time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now)))
    return _cache[1]


def protocol_name(*, esmtp: bool, tls: bool, utf8: bool) -> str:
    """RFC 3848 / RFC 6531 'with' keyword: SMTP, ESMTP, ESMTPS, UTF8SMTPS, ..."""
    if utf8:
        return "UTF8SMTPS" if tls else "UTF8SMTP"
    if not esmtp:
        return "SMTP"
    return "ESMTPS" if tls else "ESMTP"


def received_header(
    *,
    helo: str | None,
    client_ip: str,
    client_name: str | None,
    hostname: str,
    session_id: str,
    protocol: str,
    tls: TlsFacts,
    recipient: str | None,
) -> bytes:
    name = client_name or "unknown"
    lines = [f"Received: from {helo or '[' + client_ip + ']'} ({name} [{client_ip}])"]
    clause = tls.received_clause()
    if clause:
        lines.append(f"\t{clause}")
    lines.append(f"\tby {hostname} (Spam Killer) with {protocol} id {session_id}")
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>; {_date()}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{_date()}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
