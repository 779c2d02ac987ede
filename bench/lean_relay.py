"""The "lean relay": the floor server plus an in-session relay to an upstream, and nothing else.

It answers like bench/floor.py and relays the way spam-killer does (upstream session taken from a
per-process pool at the first RCPT, MAIL and RCPT pipelined, DATA sent when the client sends it,
the message written upstream in one call with a Received line in front, the client's 250 only
after the upstream's 250), with callbacks only: no checks, no parsing beyond the verb, no limits,
no logs. It bounds what any relay in Python can reach on a machine, so bench/starttls.py --lean
can show how much of the distance to the floor is the relay and how much is the product.

    python bench/lean_relay.py --port 2525 --cert cert.pem --key key.pem \\
        --upstream 127.0.0.1:2526 [--workers 2] [--loop uvloop]

Not a server to run: it trusts the client and the upstream completely.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys
from collections import deque
from collections.abc import Callable, Coroutine
from typing import cast

from floor import (
    EHLO_PLAIN,
    EHLO_TLS,
    END_OF_DATA,
    MAX_LINE,
    FloorProtocol,
    fork_workers,
    install_loop,
    parse_server_args,
    serve,
    server_context,
)

RECEIVED = (
    b"Received: from client by lean.bench.test with ESMTPS; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
)
UNAVAILABLE = b"451 4.4.1 Upstream unavailable\r\n"

ReplyHandler = Callable[[bytes | None], None]  # the reply's last line; None: connection lost


class Upstream(asyncio.Protocol):
    """One pooled upstream session; each command's reply goes to the next waiting handler."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.handlers: deque[ReplyHandler] = deque()
        self.lines: deque[bytes] = deque()  # replies nobody waited for yet (the banner)
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n")) >= 0:
            line, self.buf = self.buf[:end], self.buf[end + 2 :]
            if line[3:4] == b"-":
                continue  # a multiline reply: only its last line matters here
            if self.handlers:
                self.handlers.popleft()(line)
            else:
                self.lines.append(line)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.handlers:
            self.handlers.popleft()(None)

    def command(self, data: bytes, *handlers: ReplyHandler) -> None:
        assert self.transport is not None
        self.handlers.extend(handlers)
        self.transport.write(data)

    async def next_reply(self) -> bytes | None:
        if self.lines:
            return self.lines.popleft()
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.handlers.append(future.set_result)
        return await future


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Upstream] = []

    async def take(self) -> Upstream | None:
        while self.idle:
            link = self.idle.pop()
            if not link.lost:
                return link
        loop = asyncio.get_running_loop()
        try:
            _, link = await loop.create_connection(Upstream, self.host, self.port)
        except OSError:
            return None
        if not (await link.next_reply() or b"").startswith(b"220"):
            return None
        assert link.transport is not None
        link.transport.write(b"EHLO lean.bench.test\r\n")
        if not (await link.next_reply() or b"").startswith(b"250"):
            return None
        return link

    def give_back(self, link: Upstream) -> None:
        if not link.lost:
            self.idle.append(link)


class LeanRelay(FloorProtocol):
    """One inbound session: the floor's, with MAIL, RCPT, DATA and the message relayed. `busy`
    also covers the wait for the upstream's reply."""

    greeting = b"220 lean.bench.test ESMTP lean relay\r\n"

    def __init__(self, sslctx: ssl.SSLContext | None, pool: Pool) -> None:
        super().__init__(sslctx)
        self.pool = pool
        self.mail = b""
        self.mail_reply: list[bytes | None] = []  # the upstream's reply to the pipelined MAIL
        self.link: Upstream | None = None
        self.in_transaction = False
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_lost(self, exc: Exception | None) -> None:
        link, self.link = self.link, None
        if link is not None and link.transport is not None:
            if self.in_transaction:
                link.transport.abort()  # the upstream must not deliver an abandoned message
            else:
                self.pool.give_back(link)

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _answer(self, reply: bytes) -> None:
        assert self.transport is not None
        self.transport.write(reply)
        self.busy = False
        if self.buf:
            self._process()

    def _upstream_said(self, line: bytes | None) -> None:
        if line is None:
            self.link = None
            self.in_transaction = False
            self._answer(UNAVAILABLE)
        else:
            self._answer(line + b"\r\n")

    def _process(self) -> None:
        transport = self.transport
        assert transport is not None
        buf = self.buf
        while buf and not self.busy:
            if self.in_data:
                end = buf.find(END_OF_DATA)
                if end < 0:
                    return  # the message is kept: it goes upstream in one write
                message = bytes(buf[2 : end + len(END_OF_DATA)])  # without our leading CRLF
                del buf[: end + len(END_OF_DATA)]
                self.in_data = False
                self._relay_message(message)
                return
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > MAX_LINE:
                    transport.write(b"500 5.5.0 Line too long\r\n")
                    transport.close()
                return
            line = bytes(buf[:eol])
            del buf[: eol + 2]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                transport.write(EHLO_TLS if self.sslctx and not self.tls_active else EHLO_PLAIN)
            elif verb == b"MAIL":
                self.mail = line
                transport.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                self.busy = True
                self._spawn(self._rcpt(line))
            elif verb == b"DATA":
                self._data()
            elif verb in (b"RSET", b"NOOP"):
                transport.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"STAR" and self.sslctx is not None and not self.tls_active:
                transport.write(b"220 2.0.0 Ready to start TLS\r\n")
                buf.clear()
                transport.pause_reading()
                self.busy = True
                self._spawn(self._start_tls())  # the floor's
            elif verb == b"QUIT":
                transport.write(b"221 2.0.0 Bye\r\n")
                transport.close()
                buf.clear()
            else:
                transport.write(b"502 5.5.2 Command not implemented\r\n")

    async def _rcpt(self, line: bytes) -> None:
        if self.link is None or self.link.lost:
            self.link = await self.pool.take()
            self.in_transaction = False
        link = self.link
        if link is None:
            self._answer(UNAVAILABLE)
            return
        if self.in_transaction:
            link.command(line + b"\r\n", self._upstream_said)
            return
        self.in_transaction = True
        self.mail_reply = []
        link.command(self.mail + b"\r\n" + line + b"\r\n", self.mail_reply.append, self._rcpt_said)

    def _rcpt_said(self, line: bytes | None) -> None:
        mail = self.mail_reply[0] if self.mail_reply else None
        if mail is not None and not mail.startswith(b"2"):
            self.in_transaction = False
            self._answer(mail + b"\r\n")
            return
        self._upstream_said(line)

    def _data(self) -> None:
        link = self.link
        if link is None or link.lost or not self.in_transaction:
            assert self.transport is not None
            self.transport.write(b"503 5.5.1 No valid recipients\r\n")
            return
        self.busy = True
        link.command(b"DATA\r\n", self._data_said)

    def _data_said(self, line: bytes | None) -> None:
        if line is None or not line.startswith(b"354"):
            self.in_transaction = False
            self._upstream_said(line)
            return
        self.buf[:0] = b"\r\n"  # lets an empty message's "." line match END_OF_DATA
        self.in_data = True
        self._answer(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def _relay_message(self, message: bytes) -> None:
        link = self.link
        assert link is not None
        self.busy = True

        def said(line: bytes | None) -> None:
            self.in_transaction = False
            if line is not None and line.startswith(b"250"):
                self._answer(b"250 2.0.0 Ok: relayed\r\n")
            else:
                self._upstream_said(line)

        link.command(RECEIVED + message, said)


def run_worker(args: argparse.Namespace, reuse_port: bool) -> None:
    install_loop(args.loop)
    host, _, port = args.upstream.rpartition(":")
    pool = Pool(host, int(port))
    sslctx = server_context(args.cert, args.key) if args.cert else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, lambda: LeanRelay(sslctx, pool), reuse_port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Floor server plus a bare in-session relay.")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the upstream")
    args = parse_server_args(parser, argv)
    print(f"lean relay on {args.host}:{args.port} -> {args.upstream}", flush=True)
    return fork_workers(args, run_worker, "lean relay")


if __name__ == "__main__":
    sys.exit(main())
