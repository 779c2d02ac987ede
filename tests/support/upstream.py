"""A small recording SMTP upstream (threads and the stdlib ssl module, independent of our code).

It records every byte it receives so tests can prove what the relay sent, and it can misbehave
on purpose: refuse at a stage, hang, inject bytes after its STARTTLS 220, hide STARTTLS.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field


@dataclass
class Received:
    mail_from: str = ""
    rcpts: list[str] = field(default_factory=list)
    data: bytes = b""  # the wire form between 354 and the final ".\r\n" (still dot-stuffed)
    tls: bool = False


@dataclass
class Behaviour:
    offer_starttls: bool = True
    after_starttls_220: bytes = b""  # injected in the same write as the 220
    mail_reply: bytes = b"250 2.1.0 ok"
    rcpt_replies: dict[str, bytes] = field(default_factory=dict)  # address -> reply line
    data_reply: bytes = b"354 go ahead"
    final_reply: bytes = b"250 2.0.0 Ok: queued as UP123"
    hang_at: str = ""  # "greeting", "ehlo", "mail", "rcpt", "data", "final": stop answering there
    close_at: str = ""  # close the connection instead of answering at that stage
    close_after_message: bool = False  # hang up right after a 250 to the message (idle timeout)
    refuse_second_mail: bytes = b""  # reply to the 2nd MAIL on a connection, then hang up


class RecordingUpstream:
    def __init__(
        self, tls_context: ssl.SSLContext | None = None, behaviour: Behaviour | None = None
    ) -> None:
        self.tls_context = tls_context
        self.behaviour = behaviour or Behaviour()
        self.messages: list[Received] = []
        self.connections = 0
        self.raw: list[bytes] = []  # every byte received, per connection (plaintext view)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._hangs: list[socket.socket] = []

    def __enter__(self) -> RecordingUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()
        for s in self._hangs:
            s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raw = bytearray()
        self.raw.append(b"")
        index = len(self.raw) - 1
        b = self.behaviour
        sock: socket.socket | ssl.SSLSocket = conn
        buf = b""
        tls = False
        current = Received()
        mails_here = 0

        def read_line() -> bytes:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError
                raw.extend(chunk)
                self.raw[index] = bytes(raw)
                buf += chunk
            line, buf = buf.split(b"\r\n", 1)
            return line

        def answer(stage: str, line: bytes) -> bool:
            if b.hang_at == stage:
                self._hangs.append(conn)
                return False
            if b.close_at == stage:
                conn.close()
                return False
            sock.sendall(line + b"\r\n")
            return True

        try:
            if not answer("greeting", b"220 upstream.test ESMTP"):
                return
            while True:
                line = read_line()
                verb = line[:4].upper()
                if verb == b"EHLO":
                    ext = [
                        b"250-upstream.test",
                        b"250-PIPELINING",
                        b"250-8BITMIME",
                        b"250-SMTPUTF8",
                    ]
                    if b.offer_starttls and self.tls_context is not None and not tls:
                        ext.append(b"250-STARTTLS")
                    ext.append(b"250 SIZE 100000000")
                    if b.hang_at == "ehlo":
                        self._hangs.append(conn)
                        return
                    sock.sendall(b"\r\n".join(ext) + b"\r\n")
                elif verb == b"STAR":
                    assert self.tls_context is not None
                    sock.sendall(b"220 2.0.0 go\r\n" + b.after_starttls_220)
                    buf = b""
                    sock = self.tls_context.wrap_socket(conn, server_side=True)
                    tls = True
                elif verb == b"MAIL" and b.refuse_second_mail and mails_here:
                    sock.sendall(b.refuse_second_mail + b"\r\n")
                    return
                elif verb == b"MAIL":
                    mails_here += 1
                    current = Received(
                        mail_from=line[10:].decode().split(">")[0].lstrip("<"), tls=tls
                    )
                    if not answer("mail", b.mail_reply):
                        return
                elif verb == b"RCPT":
                    addr = line[8:].decode().split(">")[0].lstrip("<")
                    reply = b.rcpt_replies.get(addr, b"250 2.1.5 ok")
                    if reply.startswith(b"2"):
                        current.rcpts.append(addr)
                    if not answer("rcpt", reply):
                        return
                elif verb == b"DATA":
                    if not answer("data", b.data_reply):
                        return
                    if not b.data_reply.startswith(b"354"):
                        continue
                    while b"\r\n.\r\n" not in b"\r\n" + buf:
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError
                        raw.extend(chunk)
                        self.raw[index] = bytes(raw)
                        buf += chunk
                    framed = b"\r\n" + buf
                    end = framed.index(b"\r\n.\r\n")
                    current.data = framed[2 : end + 2]
                    buf = framed[end + 5 :]
                    if b.final_reply.startswith(b"250") and b.hang_at != "final":
                        with self._lock:  # recorded before the reply: tests read it after theirs
                            self.messages.append(current)
                    if not answer("final", b.final_reply):
                        return
                    if b.close_after_message:
                        return
                    current = Received()
                elif verb == b"RSET":
                    current = Received()
                    sock.sendall(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 bye\r\n")
                    return
                else:
                    sock.sendall(b"250 2.0.0 ok\r\n")
        except (ConnectionError, OSError, ssl.SSLError):
            return
        finally:
            if conn not in self._hangs:
                sock.close()
