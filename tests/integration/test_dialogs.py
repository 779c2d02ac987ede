"""Attack dialogs from tests/dialogs/*.dialog, each played against a fresh real MX over a socket.

The format is described in tests/dialogs/README.md. Each dialog gets its own MX (a real worker in a
thread) relaying to its own RecordingUpstream, so the `@upstream-...` checks see only what that
dialog caused. Every failure names the dialog file and line, what was sent last and what came back.
Besides what a dialog asks for, every reply is checked for well-formedness, and every 4xx/5xx reply
must end with `(id ...)`.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Certs, mx_config
from spamkiller.errors import ConfigError
from support.mx import Mx
from support.net import RawClient, free_port
from support.upstream import RecordingUpstream

DIALOG_DIR = Path(__file__).resolve().parent.parent / "dialogs"
DIALOGS = sorted(DIALOG_DIR.glob("*.dialog"))

SILENCE = 0.3  # seconds of quiet that `expect-silence` asks for
REPLY_TIMEOUT = 3.0  # seconds to wait for a reply or a close
SERVER_NAME = "mx.test.example"  # the name in the test certificates

_PATTERN = re.compile(r"[2-5.][0-9.]{2}\Z")
_REPLY_LINE = re.compile(rb"([2-5][0-9]{2})([ -])[^\r\n]*\r\n\Z")
_ID_AT_END = re.compile(rb"\(id [0-9A-Za-z]+\)\r\n\Z")
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rnt0\\]|.?)")
_SIMPLE_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "0": "\0", "\\": "\\"}


class DialogSyntaxError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------------


@dataclass
class Step:
    line: int  # 1-based line number in the dialog file
    source: str  # the line as written, for failure messages
    kind: str  # send | expect | reply-has | reply-lacks | starttls | expect-close | expect-silence
    data: bytes = b""  # send: the bytes (repeats expanded); expect/reply-*: the substring
    pattern: str = ""  # expect: "250", "5..", ...
    repeat: int = 1  # expect: how many replies


@dataclass
class UpstreamCheck:
    line: int
    source: str
    kind: str  # messages | saw | never-saw | count | crlf-only
    data: bytes = b""
    number: int = 0


@dataclass
class Dialog:
    path: Path
    steps: list[Step] = field(default_factory=list)
    config: list[tuple[int, str, Any]] = field(default_factory=list)  # (line, dotted key, value)
    listener: dict[str, Any] = field(default_factory=dict)
    upstream: list[UpstreamCheck] = field(default_factory=list)


def unescape(text: str) -> bytes:
    r"""`\r \n \t \0 \\ \xNN` to bytes; any other backslash is an error. Text is UTF-8."""

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[code]
        if len(code) == 3 and code[0] == "x":
            return chr(int(code[1:], 16))
        raise DialogSyntaxError(f"unknown escape \\{code} (use \\r \\n \\t \\0 \\\\ or \\xNN)")

    # \xNN stands for one octet: map through latin-1 so \xff is the byte 0xff, not U+00FF in UTF-8.
    pieces: list[bytes] = []
    last = 0
    for m in _ESCAPE.finditer(text):
        pieces.append(text[last : m.start()].encode("utf-8"))
        pieces.append(one(m).encode("latin-1"))
        last = m.end()
    pieces.append(text[last:].encode("utf-8"))
    return b"".join(pieces)


def _number(word: str, what: str) -> int:
    if not re.fullmatch(r"[0-9][0-9_]*", word):
        raise DialogSyntaxError(f"{what} must be a whole number, got {word!r}")
    return int(word)


def _key_value(rest: str) -> tuple[str, Any]:
    key, eq, value = rest.partition("=")
    if not eq or not key or " " in key:
        raise DialogSyntaxError(f"expected key=value, got {rest!r}")
    return key, yaml.safe_load(value)


def _expect(rest: str) -> tuple[str, bytes]:
    pattern, _, text = rest.partition(" ")
    if not _PATTERN.match(pattern):
        raise DialogSyntaxError(f"reply code pattern must be like 250 or 5.. , got {pattern!r}")
    return pattern, unescape(text)


def parse_line(dialog: Dialog, number: int, source: str) -> None:
    line = source
    if not line.strip() or line.lstrip().startswith("#"):
        return
    if line != line.rstrip() or line != line.lstrip():
        raise DialogSyntaxError(
            "leading or trailing whitespace (write a significant space as \\x20)"
        )
    repeat = 1
    if line.startswith("repeat "):
        parts = line.split(" ", 2)
        if len(parts) < 3:
            raise DialogSyntaxError("expected repeat N >> ... or repeat N << ...")
        repeat, line = _number(parts[1], "repeat count"), parts[2]
        if repeat < 1:
            raise DialogSyntaxError("repeat count must be at least 1")
        if not line.startswith((">> ", ">>+ ", "<< ")):
            raise DialogSyntaxError("repeat applies to a >>, >>+ or << line only")
    word, _, rest = line.partition(" ")
    if word in (">>", ">>+"):
        data = unescape(rest) * repeat
        if not data:
            raise DialogSyntaxError(f"{word} needs something to send")
        if word == ">>":
            dialog.steps.append(Step(number, source, "send", data=data))
        elif dialog.steps and dialog.steps[-1].kind == "send":
            dialog.steps[-1].data += data  # the same write as the >> line above
        else:
            raise DialogSyntaxError(">>+ must follow a >> or >>+ line")
    elif word == "<<":
        pattern, text = _expect(rest)
        step = Step(number, source, "expect", data=text, pattern=pattern, repeat=repeat)
        dialog.steps.append(step)
    elif word in ("reply-has", "reply-lacks"):
        if not rest:
            raise DialogSyntaxError(f"{word} needs a text")
        dialog.steps.append(Step(number, source, word, data=unescape(rest)))
    elif word in ("starttls", "expect-close", "expect-silence"):
        if rest:
            raise DialogSyntaxError(f"{word} takes no argument")
        dialog.steps.append(Step(number, source, word))
    elif word == "@config":
        key, value = _key_value(rest)
        dialog.config.append((number, key, value))
    elif word == "@listener":
        key, value = _key_value(rest)
        if key in ("name", "address", "port"):
            raise DialogSyntaxError(f"@listener {key} is chosen by the runner")
        dialog.listener[key] = value
    elif word == "@upstream-messages":
        dialog.upstream.append(
            UpstreamCheck(number, source, "messages", number=_number(rest, "message count"))
        )
    elif word in ("@upstream-saw", "@upstream-never-saw"):
        if not rest:
            raise DialogSyntaxError(f"{word} needs a text")
        dialog.upstream.append(UpstreamCheck(number, source, word[10:], data=unescape(rest)))
    elif word == "@upstream-count":
        count, _, needle = rest.partition(" ")
        if not needle:
            raise DialogSyntaxError("@upstream-count needs a number and a text")
        dialog.upstream.append(
            UpstreamCheck(
                number, source, "count", data=unescape(needle), number=_number(count, "count")
            )
        )
    elif word == "@upstream-crlf-only":
        if rest:
            raise DialogSyntaxError("@upstream-crlf-only takes no argument")
        dialog.upstream.append(UpstreamCheck(number, source, "crlf-only"))
    else:
        raise DialogSyntaxError(f"unknown directive {word!r}")


def parse_dialog(path: Path) -> Dialog:
    dialog = Dialog(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    if not lines or not lines[0].startswith("# "):
        raise DialogSyntaxError(f"{path.name}:1: a dialog starts with a # line naming the attack")
    for number, source in enumerate(lines, 1):
        try:
            parse_line(dialog, number, source)
        except DialogSyntaxError as exc:
            raise DialogSyntaxError(f"{path.name}:{number}: {source!r}: {exc}") from None
    if not dialog.steps:
        raise DialogSyntaxError(f"{path.name}: no steps")
    return dialog


# --------------------------------------------------------------------------------------------
# Playing a dialog
# --------------------------------------------------------------------------------------------


def _show(data: bytes, limit: int = 240) -> str:
    if len(data) <= limit:
        return repr(data)
    return f"{data[: limit // 2]!r} ... {data[-limit // 4 :]!r} ({len(data)} bytes)"


class DialogFailure(AssertionError):
    pass


class TlsClient:
    """TLS over the dialog's socket through memory BIOs, so the runner decides when bytes leave.

    The client's last handshake flight (the TLS 1.3 Finished) is held back and goes out in the same
    write as the next thing sent, as from a client that sends its first command right after the
    handshake; if the runner reads first, it goes out alone before the read. Offers what RawClient
    uses of a socket: sendall, recv, settimeout, close.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=SERVER_NAME)
        self._held = b""

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := self._out.read():
                    self.sock.sendall(out)
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the TLS handshake") from None
                self._in.write(data)
        self._held = self._out.read()

    @property
    def held(self) -> bytes:
        return self._held

    def _flush(self) -> None:
        out, self._held = self._held + self._out.read(), b""
        if out:
            self.sock.sendall(out)

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv(self, size: int) -> bytes:
        self._flush()
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    return b""
                self._in.write(data)
            except ssl.SSLZeroReturnError:
                return b""

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def version(self) -> str | None:
        return self.tls.version()

    def close(self) -> None:
        self.sock.close()


class Player:
    """One client connection driven by a dialog; keeps a transcript for failure messages."""

    def __init__(self, dialog: Dialog, mx: Mx, port: int, tls: ssl.SSLContext) -> None:
        self.dialog = dialog
        self.mx = mx
        self.tls = tls
        self.client = RawClient(port, timeout=REPLY_TIMEOUT)
        self.client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transcript: list[str] = []
        self.last_sent: tuple[int, bytes] | None = None
        self.last_reply = b""

    # ---- failure messages ----------------------------------------------------------------

    def fail(self, step: Step, problem: str, got: str) -> DialogFailure:
        sent = (
            f"line {self.last_sent[0]}: {_show(self.last_sent[1])}"
            if self.last_sent
            else "(nothing yet)"
        )
        tail = "\n".join(f"    {t}" for t in self.transcript[-10:]) or "    (empty)"
        logs = "\n".join(f"    {line}" for line in self.mx.log.lines[-6:]) or "    (none)"
        return DialogFailure(
            f"\n{self.dialog.path.name}:{step.line}: {step.source}\n"
            f"  expected: {problem}\n"
            f"  last sent ({sent})\n"
            f"  got: {got}\n"
            f"  transcript (C: client, S: server), last lines:\n{tail}\n"
            f"  server log, last lines:\n{logs}"
        )

    # ---- socket primitives ---------------------------------------------------------------

    def read_reply(self, step: Step) -> bytes:
        try:
            reply = self.client.reply()
        except TimeoutError:
            got = f"nothing within {REPLY_TIMEOUT}s (buffered {_show(self.client.buf)})"
            raise self.fail(step, "a reply", got) from None
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            raise self.fail(step, "a reply", f"connection ended: {exc}") from None
        self.transcript.append(f"S: {_show(reply)}")
        lines = reply.splitlines(keepends=True)
        codes = set()
        for i, line in enumerate(lines):
            m = _REPLY_LINE.match(line)
            last = i == len(lines) - 1
            if m is None or (m.group(2) == b" ") != last:
                raise self.fail(step, "a well-formed reply", f"malformed line {_show(line)}")
            codes.add(m.group(1))
        if len(codes) != 1:
            raise self.fail(step, "one code on every line of a reply", _show(reply))
        if reply[:1] in b"45" and not _ID_AT_END.search(reply):
            raise self.fail(step, "every 4xx/5xx reply to end with (id ...)", _show(reply))
        return reply

    def recv_now(self, wait: float) -> bytes | None:
        """Bytes that arrive within `wait` (b"" if the peer closed), None if nothing came."""
        sock = self.client.sock
        sock.settimeout(wait)
        try:
            return sock.recv(65536)
        except TimeoutError:
            return None
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return b""
        finally:
            sock.settimeout(REPLY_TIMEOUT)

    def no_leftovers(self, step: Step, what: str) -> None:
        if self.client.buf:
            got = f"unread bytes {_show(self.client.buf)}"
            raise self.fail(step, f"{what}, with no other bytes from the server", got)

    # ---- steps ---------------------------------------------------------------------------

    def play(self) -> None:
        for step in self.dialog.steps:
            getattr(self, "step_" + step.kind.replace("-", "_"))(step)
        # A reply nobody expected but that already arrived is a failure too.
        end = Step(self.dialog.steps[-1].line, "(end of dialog)", "end")
        self.no_leftovers(end, "the end of the dialog")

    def step_send(self, step: Step) -> None:
        data = step.data
        sock = self.client.sock
        with_finished = (
            " (in one write with the TLS Finished)" if getattr(sock, "held", b"") else ""
        )
        self.transcript.append(f"C: {_show(data)}{with_finished}")
        self.last_sent = (step.line, data)
        try:
            self.client.send(data)
        except OSError as exc:
            raise self.fail(step, "to send", f"the send failed: {exc}") from None

    def step_expect(self, step: Step) -> None:
        for i in range(step.repeat):
            reply = self.read_reply(step)
            self.last_reply = reply
            code = reply[:3].decode()
            which = f" (reply {i + 1} of {step.repeat})" if step.repeat > 1 else ""
            wanted = f"a reply with code {step.pattern}" + (
                f" containing {step.data!r}" if step.data else ""
            )
            if not all(p in (".", c) for p, c in zip(step.pattern, code, strict=True)):
                raise self.fail(step, wanted + which, _show(reply))
            if step.data not in reply:
                raise self.fail(step, wanted + which, _show(reply))

    def step_reply_has(self, step: Step) -> None:
        if step.data not in self.last_reply:
            raise self.fail(
                step, f"the last reply to contain {step.data!r}", _show(self.last_reply)
            )

    def step_reply_lacks(self, step: Step) -> None:
        if step.data in self.last_reply:
            got = _show(self.last_reply)
            raise self.fail(step, f"the last reply not to contain {step.data!r}", got)

    def step_expect_silence(self, step: Step) -> None:
        self.no_leftovers(step, f"silence for {SILENCE}s")
        data = self.recv_now(SILENCE)
        if data is not None:
            got = "the server closed the connection" if data == b"" else _show(data)
            self.transcript.append(f"S: {got}")
            raise self.fail(step, f"silence for {SILENCE}s", got)

    def step_expect_close(self, step: Step) -> None:
        self.no_leftovers(step, "the server to close the connection")
        data = self.recv_now(REPLY_TIMEOUT)
        if data is None:
            raise self.fail(step, "the server to close the connection", "still open")
        if data:
            self.transcript.append(f"S: {_show(data)}")
            raise self.fail(step, "the server to close the connection", _show(data))
        self.transcript.append("S: (closed)")

    def step_starttls(self, step: Step) -> None:
        # Bytes after the 220 and before the handshake would be a response injection.
        self.no_leftovers(step, "a TLS handshake")
        self.tls_wrap(step)

    def tls_wrap(self, step: Step) -> None:
        tls = TlsClient(self.client.sock, self.tls)
        try:
            tls.handshake()
        except (ssl.SSLError, OSError) as exc:
            raise self.fail(step, "a TLS handshake", f"handshake failed: {exc}") from None
        self.client.sock = tls  # type: ignore[assignment]
        self.transcript.append(f"-- TLS up: {tls.version()}")

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------------------------
# The MX, and the checks on what the upstream received
# --------------------------------------------------------------------------------------------


def build_config(
    dialog: Dialog, tmp_path: Path, certs: Certs, upstream_port: int
) -> dict[str, Any]:
    listener = {"name": "mx", "address": "127.0.0.1", "port": free_port(), "tls": "starttls"}
    listener |= dialog.listener
    config = mx_config(tmp_path, certs, upstream_port=upstream_port, listeners=[listener])
    for _, dotted, value in dialog.config:
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def settle(up: RecordingUpstream, quiet: float = 0.05, limit: float = 2.0) -> None:
    """Wait until the upstream has received nothing new for `quiet` seconds."""
    deadline = time.monotonic() + limit
    seen = [len(r) for r in up.raw]
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = [len(r) for r in up.raw]
        if now == seen:
            return
        seen = now


def check_upstream(dialog: Dialog, up: RecordingUpstream) -> None:
    raw = list(up.raw)

    def fail(check: UpstreamCheck, problem: str, got: str) -> DialogFailure:
        shown = "\n".join(f"    connection {i}: {_show(r, 600)}" for i, r in enumerate(raw))
        return DialogFailure(
            f"\n{dialog.path.name}:{check.line}: {check.source}\n"
            f"  expected: {problem}\n  got: {got}\n"
            f"  the upstream received:\n{shown or '    (no connection)'}"
        )

    for check in dialog.upstream:
        if check.kind == "messages":
            if len(up.messages) != check.number:
                got = str(len(up.messages)) + "".join(
                    f"; from <{m.mail_from}> to {m.rcpts}" for m in up.messages
                )
                raise fail(check, f"{check.number} message(s) delivered upstream", got)
        elif check.kind in ("saw", "never-saw", "count"):
            count = sum(r.count(check.data) for r in raw)
            if check.kind == "saw" and count == 0:
                raise fail(check, f"{check.data!r} in what the upstream received", "absent")
            if check.kind == "never-saw" and count:
                raise fail(check, f"{check.data!r} never sent upstream", f"{count} time(s)")
            if check.kind == "count" and count != check.number:
                wanted = f"{check.number} occurrence(s) of {check.data!r} upstream"
                raise fail(check, wanted, f"{count}")
        elif check.kind == "crlf-only":
            for i, r in enumerate(raw):
                crlf = r.count(b"\r\n")
                if r.count(b"\r") != crlf or r.count(b"\n") != crlf:
                    got = f"connection {i} has a bare CR or LF"
                    raise fail(check, "only CRLF line endings upstream", got)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def client_context(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_file))


def play(dialog: Dialog, mx: Mx, certs: Certs) -> str:
    """Play the dialog on one connection; the failure message, or "" if it went as written."""
    player = Player(dialog, mx, mx.port(), client_context(certs))
    try:
        if dialog.listener.get("tls") == "implicit":
            player.tls_wrap(Step(0, "(implicit TLS at connect)", "starttls"))
        player.play()
    except DialogFailure as exc:
        return str(exc)
    finally:
        player.close()
    return ""


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
def test_dialog(path: Path, tmp_path: Path, certs: Certs) -> None:
    failure = ""
    try:
        dialog = parse_dialog(path)
    except DialogSyntaxError as exc:
        failure = f"bad dialog file: {exc}"
    if failure:
        pytest.fail(failure, pytrace=False)
    with RecordingUpstream() as up:
        with contextlib.ExitStack() as stack:
            try:
                mx = stack.enter_context(
                    Mx(tmp_path, build_config(dialog, tmp_path, certs, up.port))
                )
            except ConfigError as exc:
                settings = [f"line {n}: {k}={v!r}" for n, k, v in dialog.config]
                failure = (
                    f"{path.name}: the MX refused its config {settings} {dialog.listener}:\n{exc}"
                )
            else:
                failure = play(dialog, mx, certs)
        # The MX has stopped: whatever it was going to send upstream has been sent.
        if not failure:
            settle(up)
            try:
                check_upstream(dialog, up)
            except DialogFailure as exc:
                failure = str(exc)
    if failure:  # outside the except blocks: the message alone, without exception chains
        pytest.fail(failure, pytrace=False)


def test_there_are_dialogs() -> None:
    # A glob that finds nothing would parametrize zero tests and pass silently.
    assert len(DIALOGS) >= 40, DIALOGS


def test_format_is_strict(tmp_path: Path) -> None:
    assert unescape(r"A\r\n\0\t\\\x00\xff") == b"A\r\n\0\t\\\x00\xff"
    bad = [
        ">> NOOP\\r\\n ",  # trailing space: write \x20
        ">> \\q",  # unknown escape
        "<< 25",  # not a code pattern
        "<< 2xx",
        "repeat x >> a",
        "repeat 3 starttls",
        "starttls now",
        ">>+ orphan",  # nothing to append to
        "@upstream-count 3",
        "@listener port=25",
        "send NOOP",
    ]
    for line in bad:
        with pytest.raises(DialogSyntaxError):
            parse_line(Dialog(tmp_path / "x.dialog"), 1, line)
    d = Dialog(tmp_path / "x.dialog")
    good = ["repeat 2 >> NOOP\\r\\n", ">>+ x", "repeat 3 >>+ y", "repeat 2 << 2.. OK", "# c", ""]
    for line in [*good, "@config a.b=1MiB"]:
        parse_line(d, 1, line)
    assert [(s.kind, s.repeat, s.data, s.pattern) for s in d.steps] == [
        ("send", 1, b"NOOP\r\nNOOP\r\nxyyy", ""),
        ("expect", 2, b"OK", "2.."),
    ]
    assert d.config == [(1, "a.b", "1MiB")]
