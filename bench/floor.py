"""The "floor": a bare asyncio + ssl SMTP responder that relays nothing.

It answers the minimum a sending MTA needs (220, EHLO, STARTTLS, MAIL, RCPT, DATA, QUIT) with
asyncio.Protocol callbacks and reads DATA with one `find` per received chunk. No parsing, no
checks, no upstream: the cost of the TLS handshake and the SMTP round trips in Python, which is
the reference that bench/starttls.py divides spam-killer's figures by.

    python bench/floor.py --port 2525 --cert cert.pem --key key.pem [--workers 2] [--loop uvloop]

With several workers, each is a forked process listening on the same port (SO_REUSEPORT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys
from collections.abc import Callable
from typing import Any, cast

GREETING = b"220 floor.bench.test ESMTP floor\r\n"
EHLO_TLS = b"250-floor.bench.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-floor.bench.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
END_OF_DATA = b"\r\n.\r\n"
MAX_LINE = 4096


class FloorProtocol(asyncio.Protocol):
    """One SMTP session. Command lines are answered as they complete, pipelined or not."""

    greeting = GREETING

    def __init__(self, sslctx: ssl.SSLContext | None) -> None:
        self.sslctx = sslctx
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        # While busy, input is only buffered: a TLS handshake (or a subclass's reply) is owed.
        self.busy = False
        self.tls_active = False
        self.tls_task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def _process(self) -> None:
        transport = self.transport
        assert transport is not None
        buf = self.buf
        while buf:
            if self.in_data:
                # One scan per chunk. The message is discarded as it comes; only the bytes that
                # could begin a terminator split across chunks are kept.
                end = buf.find(END_OF_DATA)
                if end < 0:
                    del buf[: -(len(END_OF_DATA) - 1)]
                    return
                del buf[: end + len(END_OF_DATA)]
                self.in_data = False
                transport.write(b"250 2.0.0 Ok: discarded\r\n")
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > MAX_LINE:
                    transport.write(b"500 5.5.0 Line too long\r\n")
                    transport.close()
                return
            verb = bytes(buf[:4]).upper()
            del buf[: eol + 2]
            if verb in (b"EHLO", b"HELO"):
                tls_offer = self.sslctx is not None and not self.tls_active
                transport.write(EHLO_TLS if tls_offer else EHLO_PLAIN)
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                transport.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                # The leading CRLF lets an empty message's "." line match END_OF_DATA too.
                buf[:0] = b"\r\n"
                self.in_data = True
            elif verb == b"STAR" and self.sslctx is not None and not self.tls_active:
                transport.write(b"220 2.0.0 Ready to start TLS\r\n")
                # Anything pipelined after STARTTLS must be discarded (RFC 3207). Stop reading
                # until start_tls has taken over the socket, so the ClientHello waits for it.
                buf.clear()
                transport.pause_reading()
                self.busy = True
                self.tls_task = asyncio.ensure_future(self._start_tls())
                return
            elif verb == b"QUIT":
                transport.write(b"221 2.0.0 Bye\r\n")
                transport.close()
                buf.clear()
                return
            else:
                transport.write(b"502 5.5.2 Command not implemented\r\n")

    async def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None and self.sslctx is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(transport, self, self.sslctx, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError):
            transport.abort()
            return
        if new_transport is None:  # the connection closed during the handshake
            return
        self.transport = new_transport
        self.tls_active = True
        self.busy = False
        # The client's first command may have arrived with its last handshake message.
        if self.buf:
            self._process()


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def install_loop(kind: str) -> str:
    """Select the event loop: 'uvloop', 'asyncio' or 'auto' (uvloop if importable)."""
    if kind in ("uvloop", "auto"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise SystemExit("floor: --loop uvloop but uvloop is not importable") from None
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


async def serve(
    host: str, port: int, factory: Callable[[], asyncio.Protocol], reuse_port: bool
) -> None:
    """Serve `factory`'s protocol on host:port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    server = await loop.create_server(factory, host, port, reuse_port=reuse_port, backlog=1024)
    async with server:
        await stop


def run_worker(args: argparse.Namespace, reuse_port: bool) -> None:
    install_loop(args.loop)
    sslctx = server_context(args.cert, args.key) if args.cert else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, lambda: FloorProtocol(sslctx), reuse_port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bare asyncio+ssl SMTP floor server (no relay).")
    args = parse_server_args(parser, argv)

    loop_name = install_loop(args.loop)
    tls = "STARTTLS" if args.cert else "no TLS"
    print(
        f"floor listening on {args.host}:{args.port} ({tls}, workers={args.workers}, "
        f"loop={loop_name}, pid={os.getpid()})",
        flush=True,
    )
    return fork_workers(args, run_worker, "floor")


def parse_server_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """The options every bench server takes (listen address, certificate, workers, loop) plus
    what `parser` already has; parser errors for combinations that cannot work."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", help="PEM certificate; without it STARTTLS is not offered")
    parser.add_argument("--key", help="PEM private key for --cert")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def fork_workers(
    args: argparse.Namespace,
    run_worker: Callable[[argparse.Namespace, bool], None],
    name: str,
) -> int:
    """Run `run_worker` in this process, or in `args.workers` forked ones sharing the port."""
    if args.workers == 1:
        run_worker(args, False)
        return 0

    live: set[int] = set()
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_worker(args, True)
            except BaseException as exc:
                print(f"{name} worker {os.getpid()}: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            finally:
                os._exit(code)
        live.add(pid)

    def forward(signum: int, _frame: Any) -> None:
        # Only to workers not yet reaped: a reaped pid may already belong to another process.
        for child in list(live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while live:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        live.discard(pid)
        status = status or os.waitstatus_to_exitcode(code)
        forward(signal.SIGTERM, None)  # one worker gone: stop the others
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
