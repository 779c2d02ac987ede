"""The client side of an SMTP session, sans-IO: commands to bytes, reply bytes to `Reply` values.

Used by the relay (and the TLS tools) to talk to an upstream. Rules it keeps:
- Commands follow `states.TRANSITIONS` like the server's; a command out of turn is our bug
  (LocalProtocolError), not something to send.
- Commands never carry CR, LF or NUL (aiosmtplib GHSA-v3q9-hj7j-63hq class): refused before sending.
- Replies are bounded (line length, lines per reply) and must be well formed; anything else is the
  upstream's fault (RemoteProtocolError).
- `start_tls()` drops whatever the upstream sent after its 220 to STARTTLS, so no plaintext reply
  can be taken as if it came over TLS (Exim CVE-2021-38371 class), and forgets the extensions.
"""

from __future__ import annotations

import re
from collections import deque

from spamkiller.errors import LocalProtocolError, RemoteProtocolError
from spamkiller.smtp.events import NEED_DATA, ConnectionClosed, NeedData
from spamkiller.smtp.limits import Limits
from spamkiller.smtp.replies import Reply
from spamkiller.smtp.states import TRANSITIONS, VERB_NAMES, State, Verb

# Commands whose only good answer is a go-ahead: (code, the state it opens).
_GO_AHEAD = {Verb.DATA: (354, State.DATA), Verb.STARTTLS: (220, State.TLS)}
_MESSAGE = "end of data"  # what the reply after the message text answers
_SEEN_MAX = 64
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |\Z)")


class ClientSession:
    """One outbound SMTP session. Replies come back in the order commands were sent."""

    def __init__(self, *, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.state = State.START
        self.extensions: dict[str, str] = {}
        self._buf = bytearray()
        self._eof = False
        self._expect: deque[Verb | str | None] = deque([None])  # None: the greeting
        self._go_ahead_pending = False  # DATA or STARTTLS sent, its reply not yet read
        # One-line replies already parsed: an upstream repeats "250 2.1.0 Ok" all day.
        self._seen: dict[bytes, Reply] = {}

    # ---- replies ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        else:
            self._buf += data

    @property
    def waiting(self) -> int:
        """How many replies are still owed to us."""
        return len(self._expect)

    def next_reply(self) -> Reply | NeedData | ConnectionClosed:
        """The next complete reply, parsed; NEED_DATA if it has not fully arrived."""
        buf = self._buf
        # Fast path: a one-line reply is the common case.
        end = buf.find(b"\r\n")
        if end < 0:
            return self._incomplete()
        if end >= 4 and buf[3] == 32:  # "250 ..."
            line = bytes(buf[:end])
            del buf[: end + 2]
            reply = self._seen.get(line)
            if reply is None:
                reply = self._parse([line])
                if len(self._seen) < _SEEN_MAX:
                    self._seen[line] = reply
            self._on_reply(reply)
            return reply
        lines: list[bytes] = []
        pos = 0
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return self._incomplete()
            line = bytes(buf[pos:end])
            lines.append(line)
            pos = end + 2
            if len(line) < 3 or (len(line) > 3 and line[3] not in (32, 45)):
                raise RemoteProtocolError(f"malformed reply line {line[:40]!r}")
            if len(line) == 3 or line[3] == 32:
                del buf[:pos]
                reply = self._parse(lines)
                self._on_reply(reply)
                return reply
            if len(lines) >= self.limits.max_reply_lines:
                raise RemoteProtocolError("reply has too many lines")

    def _incomplete(self) -> NeedData | ConnectionClosed:
        if len(self._buf) > self.limits.max_reply_line_length * self.limits.max_reply_lines:
            raise RemoteProtocolError("reply too long")
        if self._buf.find(b"\n") < 0 and len(self._buf) > self.limits.max_reply_line_length:
            raise RemoteProtocolError("reply line too long")
        return ConnectionClosed() if self._eof else NEED_DATA

    def _parse(self, lines: list[bytes]) -> Reply:
        code_bytes = lines[0][:3]
        if not code_bytes.isdigit() or not b"200" <= code_bytes <= b"599":
            raise RemoteProtocolError(f"malformed reply code {code_bytes!r}")
        texts: list[str] = []
        enhanced = ""
        for line in lines:
            if line[:3] != code_bytes:
                raise RemoteProtocolError("reply lines disagree on the code")
            if len(line) > self.limits.max_reply_line_length:
                raise RemoteProtocolError("reply line too long")
            if b"\r" in line or b"\n" in line or b"\0" in line:
                raise RemoteProtocolError("control character in reply")
            texts.append(line[4:].decode("utf-8", "replace"))
        m = _ENHANCED.match(texts[0])
        if m and m.group(1) == chr(code_bytes[0]):
            enhanced = m.group(0).strip()
            texts = [_ENHANCED.sub("", t, count=1) if _ENHANCED.match(t) else t for t in texts]
        return Reply(int(code_bytes), enhanced, tuple(texts) if len(texts) > 1 else texts[0])

    def _on_reply(self, reply: Reply) -> None:
        if not self._expect:
            raise RemoteProtocolError(f"unexpected reply: {reply}")
        verb = self._expect.popleft()
        ok = reply.code < 400
        if verb is None:
            self.state = State.GREETED if reply.code == 220 else State.CLOSED
        elif verb in (Verb.EHLO, Verb.HELO) and ok:
            self.extensions = _parse_extensions(reply) if verb is Verb.EHLO else {}
        elif verb in _GO_AHEAD:
            # DATA and STARTTLS change state only on their go-ahead, never on our say-so: text
            # sent after a refused DATA would be read upstream as commands.
            code, target = _GO_AHEAD[verb]
            self.state = target if reply.code == code else State.READY
            self._go_ahead_pending = False
        elif verb is Verb.MAIL and not ok:
            self.state = State.READY
        if reply.code == 421:
            self.state = State.CLOSED

    # ---- commands --------------------------------------------------------------------------

    def _command(self, verb: Verb, arg: str = "") -> bytes:
        name = VERB_NAMES[verb]
        if self._go_ahead_pending:
            # RFC 2920 3.1 / RFC 3207 4: DATA and STARTTLS end a pipelined group.
            raise LocalProtocolError(f"{name} sent before the go-ahead was read")
        nxt = TRANSITIONS.get((self.state, verb))
        if nxt is None:
            raise LocalProtocolError(f"{name} not allowed in state {self.state.name}")
        if "\r" in arg or "\n" in arg or "\0" in arg:
            raise LocalProtocolError(f"CR, LF or NUL in {name} argument")
        if verb in _GO_AHEAD:  # the state changes on the go-ahead; see _on_reply
            self._go_ahead_pending = True
        else:  # pipelined commands advance at once
            self.state = nxt
        self._expect.append(verb)
        line = f"{name} {arg}\r\n" if arg else f"{name}\r\n"
        return line.encode("utf-8")

    def ehlo(self, name: str) -> bytes:
        return self._command(Verb.EHLO, name)

    def helo(self, name: str) -> bytes:
        return self._command(Verb.HELO, name)

    def starttls(self) -> bytes:
        return self._command(Verb.STARTTLS)

    def mail(self, sender: str, params: str = "") -> bytes:
        arg = f"FROM:<{sender}>" + (f" {params}" if params else "")
        return self._command(Verb.MAIL, arg)

    def rcpt(self, recipient: str) -> bytes:
        return self._command(Verb.RCPT, f"TO:<{recipient}>")

    def data(self) -> bytes:
        return self._command(Verb.DATA)

    def message(self, stuffed: bytes, *, header: bytes = b"") -> bytes:
        """The text after 354: `header` (whole CRLF lines) and the dot-stuffed CRLF lines of the
        message (ending in CRLF), then the final dot; joined in one copy."""
        if self.state is not State.DATA:
            raise LocalProtocolError("message text only after a 354 reply to DATA")
        if stuffed and not stuffed.endswith(b"\r\n"):
            raise LocalProtocolError("message text must end with CRLF")
        if header and not header.endswith(b"\r\n"):
            raise LocalProtocolError("header lines must end with CRLF")
        self.state = State.READY  # whatever the reply, the transaction ends with the dot
        self._expect.append(_MESSAGE)
        return b"".join((header, stuffed, b".\r\n"))

    def rset(self) -> bytes:
        return self._command(Verb.RSET)

    def noop(self) -> bytes:
        return self._command(Verb.NOOP)

    def quit(self) -> bytes:
        return self._command(Verb.QUIT)

    def start_tls(self) -> None:
        """TLS is up: discard plaintext leftovers (response injection) and the old extensions."""
        if self.state is not State.TLS:
            raise LocalProtocolError("start_tls() without a 220 to STARTTLS")
        self._buf.clear()
        self.extensions = {}
        self.state = State.GREETED

    @property
    def unread(self) -> int:
        """Octets received and not yet parsed (nonzero after a reply means the peer ran ahead)."""
        return len(self._buf)


def _parse_extensions(reply: Reply) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        out[keyword.upper()] = params
    return out
