"""The server side of an SMTP session, sans-IO: bytes in, events out, replies to bytes.

Rules this module keeps:
- Lines end in CRLF. A bare CR, bare LF or NUL in a command is answered 500 5.5.2; in a message it
  ends the transaction with 550 5.5.2 instead of being normalised, so no end-of-data variant can
  smuggle a second message (CVE-2023-51764 class). The only end of DATA is CRLF "." CRLF.
- Every quantity the client controls is bounded by `Limits`: a command line, pipelined input, the
  message size (an oversized message is read to its end, keeping only a few bytes, then 552),
  recipients, bad commands (then 421 and close).
- STARTTLS drops every byte the client sent after it in plaintext and forgets EHLO (RFC 3207 4.2).
- Exactly one reply per event, through `send`, which applies the transition from `states`.

Driver loop:
    out(session.greeting())
    while True:
        event = session.next_event()
        if event is NEED_DATA: session.receive_data(await read()); continue
        if isinstance(event, ConnectionClosed): break
        out(session.send(decide(event)))   # decide() may return event.reply unchanged
        if session.state is State.TLS: start TLS, then session.start_tls()
        if session.state is State.CLOSED: break
"""

from __future__ import annotations

import functools
import re

from spamkiller.errors import LocalProtocolError
from spamkiller.smtp import replies
from spamkiller.smtp.address import Address
from spamkiller.smtp.esmtp import NO_PARAMS, ParameterError, parse_mail, parse_rcpt
from spamkiller.smtp.events import (
    NEED_DATA,
    Answer,
    BdatChunk,
    ConnectionClosed,
    DataCommand,
    DataRejected,
    Ehlo,
    Event,
    MailFrom,
    MessageData,
    MessageReceived,
    NeedData,
    Quit,
    RcptTo,
    Reset,
    StartTls,
    Violation,
)
from spamkiller.smtp.limits import Limits
from spamkiller.smtp.replies import Reply
from spamkiller.smtp.states import (
    TLS_REQUIRED,
    TRANSITIONS,
    VERB_NAMES,
    VERBS,
    State,
    Verb,
    sequence_error,
)

# A HELO/EHLO argument is echoed into our Received header: printable ASCII, no spaces.
_HELO_NAME = re.compile(r"[\x21-\x7e]{1,255}\Z")
_BDAT_ARGS = re.compile(r"([0-9]{1,19})(?: +(LAST))? *\Z", re.IGNORECASE)
_END_OF_DATA = b"\r\n.\r\n"


_TALLY_NAMES = {verb: name.lower() for verb, name in VERB_NAMES.items()}  # "ehlo=2 mail=1"


@functools.lru_cache(maxsize=64)
def _banner(hostname: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP")


@functools.lru_cache(maxsize=64)
def _ehlo_reply(hostname: str, size: int, starttls: bool) -> Reply:
    """Built once per (name, size, STARTTLS offered): every session sends it, usually twice."""
    lines = [hostname, "PIPELINING", f"SIZE {size}", "8BITMIME", "SMTPUTF8"]
    lines += ["ENHANCEDSTATUSCODES", "CHUNKING"] + (["STARTTLS"] if starttls else [])
    return Reply(250, "", tuple(lines))


class _Chunk:
    """Bookkeeping of the BDAT chunk being read."""

    __slots__ = ("error", "last", "remaining", "size")

    def __init__(self, size: int, last: bool, error: Reply | None) -> None:
        self.size = size
        self.remaining = size
        self.last = last
        self.error = error


class ServerSession:
    """One inbound SMTP session. Not thread-safe; one per connection."""

    def __init__(
        self,
        *,
        hostname: str,
        session_id: str,
        limits: Limits | None = None,
        tls_active: bool = False,
        starttls_available: bool = False,
        require_tls: bool = False,
    ) -> None:
        self.hostname = hostname
        self.session_id = session_id
        self.limits = limits or Limits()
        self.tls_active = tls_active
        self.starttls_available = starttls_available
        self.require_tls = require_tls
        self.state = State.START
        self.helo_name: str | None = None
        self.esmtp = False
        self.mail_params = NO_PARAMS
        self.recipients = 0
        self.bad_commands = 0
        # Plaintext octets the client sent after STARTTLS, dropped unread (RFC 3207 4.2).
        self.discarded_after_starttls = 0
        # Postfix-style per-command tallies for the disconnect log line: verb -> [ok, total].
        self.counts: dict[str, list[int]] = {}
        self._buf = bytearray()
        self._eof = False
        self._pending: Event | None = None
        self._pending_verb = ""
        self._skip_line = False  # discarding the rest of an over-long command line
        # DATA reader
        self._scan_from = 0
        self._prefix = 2  # the opening CRLF we insert before the message, until dropping starts
        self._dropped = 0  # message octets thrown away after the size limit was passed
        # BDAT reader
        self._chunk: _Chunk | None = None
        self._bdat_buf = bytearray()
        self._bdat_size = 0
        self._bdat_oversize = False
        self._bdat_failed = False  # a chunk failed: the rest of its pipeline is discarded quietly

    # ---- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; b"" means the client closed its side."""
        if not data:
            self._eof = True
        else:
            self._buf += data

    @property
    def message_bytes_held(self) -> int:
        """Octets of the message in progress this session holds in memory."""
        if self.state is State.DATA:
            return len(self._buf)
        return len(self._bdat_buf)

    @property
    def reading_message(self) -> bool:
        """Inside message text: after 354, or inside a BDAT chunk."""
        return self.state is State.DATA or self._chunk is not None

    @property
    def buffered(self) -> int:
        """Unprocessed input; the driver pauses reading above `limits.max_pipeline_buffer`."""
        return len(self._buf) if self.state is not State.DATA and self._chunk is None else 0

    # ---- output ---------------------------------------------------------------------------

    def greeting(self, reply: Reply | None = None) -> bytes:
        """The banner; a 554 or 421 banner (RFC 5321 3.1) closes the session after it is read."""
        if self.state is not State.START:
            raise LocalProtocolError("greeting already sent")
        reply = reply or _banner(self.hostname)
        self.state = State.GREETED if reply.code == 220 else State.CLOSED
        return self._render(reply)

    def ehlo_reply(self) -> Reply:
        starttls = self.starttls_available and not self.tls_active
        return _ehlo_reply(self.hostname, self.limits.max_message_size, starttls)

    def send(self, reply: Reply) -> bytes:
        """Answer the pending event; apply the state transition; return the bytes to write."""
        event = self._pending
        if event is None:
            raise LocalProtocolError("no command is waiting for a reply")
        self._pending = None
        ok = reply.code < 400
        if self._pending_verb:
            tally = self.counts.setdefault(self._pending_verb, [0, 0])
            tally[1] += 1
            if ok:
                tally[0] += 1
        if (
            reply.code == 421
            or isinstance(event, Quit)
            or (isinstance(event, Violation) and event.close)
        ):
            self.state = State.CLOSED
        elif isinstance(event, MessageReceived | DataRejected):
            self._end_transaction()
        elif ok:
            self._advance(event)
        elif isinstance(event, BdatChunk):
            # RFC 3030 2: a failed chunk fails the transaction.
            self._end_transaction()
        return self._render(reply)

    def start_tls(self) -> None:
        """TLS is now active: forget EHLO and the transaction (RFC 3207 4.2).

        Plaintext pipelined behind STARTTLS was dropped when the 220 was sent. The driver switches
        its transport to TLS before it reads again, so whatever was fed since is TLS application
        data, often the client's EHLO sent together with its handshake Finished: it is kept.
        """
        if self.state is not State.TLS:
            raise LocalProtocolError("start_tls() without an accepted STARTTLS")
        self.tls_active = True
        self.helo_name = None
        self.esmtp = False
        self._reset_transaction()
        self.state = State.GREETED

    def _render(self, reply: Reply) -> bytes:
        if reply.code >= 400:
            reply = reply.with_id(self.session_id)
        return reply.wire

    def _advance(self, event: Event) -> None:
        if isinstance(event, Ehlo):
            self.helo_name = event.name
            self.esmtp = event.extended
            self._reset_transaction()
            self.state = State.READY
        elif isinstance(event, MailFrom):
            self.mail_params = event.params
            self.state = State.MAIL
        elif isinstance(event, RcptTo):
            self.recipients += 1
            self.state = State.RCPT
        elif isinstance(event, DataCommand):
            self.state = State.DATA
            self._buf[0:0] = b"\r\n"  # the CRLF that ended DATA opens the first line
            self._scan_from = 0
            self._prefix = 2
            self._dropped = 0
        elif isinstance(event, BdatChunk):
            self.state = State.BDAT
        elif isinstance(event, Reset):
            self._reset_transaction()
            self.state = State.READY if self.helo_name is not None else State.GREETED
        elif isinstance(event, StartTls):
            self.state = State.TLS
            # Anything already pipelined behind STARTTLS is plaintext injection; drop it now too.
            self.discarded_after_starttls += len(self._buf)
            self._buf.clear()

    def _reset_transaction(self) -> None:
        self.mail_params = NO_PARAMS
        self.recipients = 0
        self._bdat_buf = bytearray()
        self._bdat_size = 0
        self._bdat_oversize = False

    def _end_transaction(self) -> None:
        self._reset_transaction()
        self.state = State.READY

    # ---- events ---------------------------------------------------------------------------

    def next_event(self) -> Event | NeedData | ConnectionClosed:
        if self._pending is not None:
            raise LocalProtocolError("reply to the previous event before asking for the next")
        state = self.state
        if state is State.CLOSED or state is State.START or state is State.TLS:
            raise LocalProtocolError(f"no events in state {state.name}")
        if not self._buf and self._chunk is None and not self._eof and state is not State.DATA:
            return NEED_DATA  # nothing buffered: skip the parsers
        if self._chunk is not None:
            event = self._read_chunk()
        elif state is State.DATA:
            event = self._read_data()
        else:
            event = self._read_command()
        if not isinstance(event, NeedData | ConnectionClosed):
            self._pending = event
        return event

    def _violation(self, reason: str, reply: Reply) -> Violation:
        self.bad_commands += 1
        if self.bad_commands >= self.limits.max_bad_commands:
            return Violation(reason, replies.TOO_MANY_ERRORS, close=True)
        return Violation(reason, reply)

    def _read_command(self) -> Event | NeedData | ConnectionClosed:
        self._pending_verb = ""
        buf = self._buf
        while True:
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > self.limits.max_command_length:
                    buf.clear()
                    if not self._skip_line:
                        self._skip_line = True
                        return self._violation("command too long", replies.TOO_LONG)
                if self._eof:
                    return ConnectionClosed()
                return NEED_DATA
            if self._skip_line:  # the tail of a line we already answered 500
                del buf[: end + 1]
                self._skip_line = False
                continue
            break
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        if len(line) > self.limits.max_command_length:
            return self._violation("command too long", replies.TOO_LONG)
        if end == 0 or line[end - 1] != 13:
            return self._violation("bare LF in command", replies.BARE_LF)
        raw = line[:-2]
        if b"\r" in raw:
            return self._violation("bare CR in command", replies.BARE_CR)
        if b"\0" in raw:
            return self._violation("NUL in command", replies.NUL_IN_COMMAND)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._violation("command not UTF-8", replies.NOT_ASCII)
        name, _, arg = text.partition(" ")
        # ASCII first: "MA\u0131L".upper() is "MAIL", a verb the next hop would not recognise.
        verb = VERBS.get(name.upper()) if name.isascii() else None
        if verb is None:
            return self._violation("unknown command", replies.UNKNOWN_COMMAND)
        self._pending_verb = _TALLY_NAMES[verb]
        if verb is Verb.BDAT:
            return self._bdat(arg)
        self._bdat_failed = False
        if not text.isascii() and verb not in (Verb.MAIL, Verb.RCPT):
            return self._violation("non-ASCII command", replies.NOT_ASCII)
        if self.require_tls and not self.tls_active and verb in TLS_REQUIRED:
            return Answer(verb.value, replies.MUST_STARTTLS)
        if (self.state, verb) not in TRANSITIONS:
            return self._violation("out of sequence", sequence_error(self.state, verb))
        return self._dispatch(verb, arg)

    def _dispatch(self, verb: Verb, arg: str) -> Event:
        if verb is Verb.MAIL:
            try:
                sender, params = parse_mail(arg, max_size=self.limits.max_message_size)
            except ParameterError as exc:
                return self._param_error(exc)
            return MailFrom(sender, params, replies.SENDER_OK)
        if verb is Verb.RCPT:
            if self.recipients >= self.limits.max_recipients:
                return Answer(verb.value, replies.TOO_MANY_RECIPIENTS)
            try:
                recipient = parse_rcpt(arg, smtputf8=self.mail_params.smtputf8)
            except ParameterError as exc:
                return self._param_error(exc)
            return RcptTo(recipient, replies.RECIPIENT_OK)
        if verb is Verb.DATA:
            if arg:
                return self._violation("DATA with arguments", replies.NO_PARAMETERS)
            return DataCommand(replies.START_DATA)
        if verb is Verb.EHLO or verb is Verb.HELO:
            name = arg.strip(" ")
            if not _HELO_NAME.match(name):
                return self._violation(
                    "bad HELO name", Reply(501, "5.5.4", f"Syntax: {verb.value} hostname")
                )
            extended = verb is Verb.EHLO
            reply = self.ehlo_reply() if extended else Reply(250, "", self.hostname)
            return Ehlo(name, extended, reply)
        if verb is Verb.RSET:
            return Reset(replies.RESET_OK)
        if verb is Verb.QUIT:
            return Quit(replies.CLOSING)
        if verb is Verb.STARTTLS:
            if self.tls_active:
                return self._violation("STARTTLS under TLS", replies.ALREADY_TLS)
            if not self.starttls_available:
                return self._violation("STARTTLS not offered", replies.TLS_UNAVAILABLE)
            if arg:
                return self._violation("STARTTLS with arguments", replies.NO_PARAMETERS)
            return StartTls(replies.READY_TLS)
        if verb is Verb.VRFY:
            if not arg.strip():
                return self._violation(
                    "VRFY without argument", Reply(501, "5.5.4", "Syntax: VRFY address")
                )
            return Answer(verb.value, replies.VRFY_CANNOT)
        if verb is Verb.EXPN:
            return Answer(verb.value, replies.NOT_IMPLEMENTED)
        if verb is Verb.HELP:
            return Answer(verb.value, replies.HELP)
        return Answer(verb.value, replies.NOOP_OK)  # NOOP

    def _param_error(self, exc: ParameterError) -> Event:
        reply = Reply(exc.code, exc.enhanced, exc.text)
        if exc.code in (500, 501):
            return self._violation(exc.text, reply)
        return Answer(self._pending_verb.upper(), reply)

    # ---- DATA -----------------------------------------------------------------------------

    def _read_data(self) -> Event | NeedData | ConnectionClosed:
        self._pending_verb = ""  # the end of data is not a command: DATA was tallied already
        buf = self._buf
        end = buf.find(_END_OF_DATA, self._scan_from)
        if end < 0:
            if self._eof:
                return ConnectionClosed(mid_data=True)
            # Past the limit even if the last 2 octets start the end marker (".\r"): the message
            # is too big; keep only 4 octets so an end marker split across reads is still found.
            if len(buf) - self._prefix - 2 + self._dropped > self.limits.max_message_size:
                self._dropped += len(buf) - 4 - self._prefix
                self._prefix = 0
                del buf[:-4]
            self._scan_from = max(0, len(buf) - 4)
            return NEED_DATA
        # Skip the opening CRLF (if still there); keep the CRLF before the dot.
        body = bytes(buf[self._prefix : end + 2])
        del buf[: end + 5]
        size = len(body) + self._dropped
        if self._dropped:  # some of it is gone: whatever the arithmetic says, it was too big
            return DataRejected("message too big", size, replies.MESSAGE_TOO_BIG)
        return self._finish_message(size, stuffed=body)

    def _finish_message(
        self, size: int, *, stuffed: bytes | None = None, raw: bytes | None = None
    ) -> Event:
        if size > self.limits.max_message_size:
            return DataRejected("message too big", size, replies.MESSAGE_TOO_BIG)
        body = stuffed if stuffed is not None else raw or b""
        problem = self._malformed(body)
        if problem is not None:
            return DataRejected(problem[0], size, problem[1])
        data = MessageData(stuffed=stuffed) if stuffed is not None else MessageData(raw=body)
        return MessageReceived(data, replies.MESSAGE_ACCEPTED)

    def _malformed(self, body: bytes) -> tuple[str, Reply] | None:
        """Whole-message scans in C, never a Python call per line."""
        if b"\0" in body:
            return "NUL in message", replies.NUL_IN_DATA
        # CRLF pairs cannot overlap, so what is left once they are gone is every bare CR and
        # bare LF. One replace and two memchr scans: a third of the cost of counting each byte.
        unpaired = body.replace(b"\r\n", b"")
        if b"\n" in unpaired:
            return "bare LF in message", replies.BARE_LF_IN_DATA
        if b"\r" in unpaired:
            return "bare CR in message", replies.BARE_CR_IN_DATA
        # Jump from line start to the last LF within one line's limit: a few `rfind`s per
        # message instead of one step per line. No LF in the window means a line is too long.
        limit = self.limits.max_line_length
        pos, end = 0, len(body)
        while end - pos > limit:
            lf = body.rfind(b"\n", pos, pos + limit)
            if lf < 0:
                return "line too long in message", Reply(
                    550, "5.5.2", f"Message contains a line longer than {limit} octets"
                )
            pos = lf + 1
        return None

    # ---- BDAT (RFC 3030) -------------------------------------------------------------------

    def _bdat(self, arg: str) -> Event | NeedData | ConnectionClosed:
        m = _BDAT_ARGS.match(arg)
        if not m:
            # Without a size we cannot tell data from commands: close (RFC 3030 4 leaves it open).
            self.bad_commands += 1
            return Violation("bad BDAT syntax", replies.BAD_BDAT, close=True)
        size, last = int(m.group(1)), m.group(2) is not None
        error: Reply | None = None
        if self.require_tls and not self.tls_active:
            error = replies.MUST_STARTTLS
        elif (self.state, Verb.BDAT) not in TRANSITIONS:
            error = sequence_error(self.state, Verb.BDAT)
        self._chunk = _Chunk(size, last, error)
        return self._read_chunk()

    def _read_chunk(self) -> Event | NeedData | ConnectionClosed:
        chunk = self._chunk
        assert chunk is not None  # only called while a chunk is open
        buf = self._buf
        if chunk.remaining:
            take = min(chunk.remaining, len(buf))
            if take:
                if chunk.error is None and not self._bdat_oversize:
                    if self._bdat_size + take > self.limits.max_message_size:
                        self._bdat_oversize = True
                        self._bdat_buf = bytearray()
                    else:
                        self._bdat_buf += buf[:take]
                if chunk.error is None:  # a refused chunk is not part of any message
                    self._bdat_size += take
                del buf[:take]
                chunk.remaining -= take
            if chunk.remaining:
                return ConnectionClosed(mid_data=True) if self._eof else NEED_DATA
        self._chunk = None
        if chunk.error is not None:
            if self._bdat_failed:
                # RFC 3030 2: chunks already pipelined after a failed one are discarded, not held
                # against the client as bad commands.
                return Answer("BDAT", chunk.error)
            self._bdat_failed = True
            return self._violation("BDAT out of sequence", chunk.error)
        if self._bdat_oversize:
            self._bdat_failed = True
            return DataRejected("message too big", self._bdat_size, replies.MESSAGE_TOO_BIG)
        if chunk.last:
            raw = bytes(self._bdat_buf)
            return self._finish_message(len(raw), raw=raw)
        return BdatChunk(chunk.size, Reply(250, "2.0.0", f"{chunk.size} octets received"))


__all__ = ["NEED_DATA", "Address", "ServerSession"]
