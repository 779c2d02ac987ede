"""Every quantity an SMTP peer controls, named, with the reason for its default.

The sans-IO session enforces these; the driver enforces the timeouts (timers belong to I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    # RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
    max_command_length: int = 512
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
    max_line_length: int = 1000
    # RFC 5321 4.5.3.1.8 asks servers to accept at least 100 recipients; more invites abuse.
    max_recipients: int = 100
    # Advertised with SIZE (RFC 1870); a larger message is read to its end and answered 552.
    max_message_size: int = 50 * MiB
    # Unknown, malformed or out-of-sequence commands before 421 and disconnect (Postfix's
    # smtpd_hard_error_limit is 20): a confused or hostile client stops costing us.
    max_bad_commands: int = 20
    # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; a few peers send longer text, so the
    # client role accepts up to this many octets per line and this many lines per reply.
    max_reply_line_length: int = 2048
    max_reply_lines: int = 100
    # Pipelined commands buffered ahead of processing (RFC 2920 lets clients send groups); past
    # this the driver stops reading until the session catches up.
    max_pipeline_buffer: int = 64 * 1024
