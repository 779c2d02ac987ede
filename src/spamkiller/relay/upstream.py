"""The before-queue relay: one upstream SMTP session per inbound session, driven by smtp.client.

Rules this module keeps:
- Hosts are tried in order on connect failure; every wait has a timeout (RFC 5321 4.5.3.2).
- With `use_tls`, the upstream must offer STARTTLS and pass verification; there is no plaintext
  fallback. Bytes the upstream sent after its 220 are dropped before the handshake.
- Anything that is not a reply from the upstream (refused, reset, timeout, TLS failure, garbage)
  is `UpstreamUnavailable`: the caller answers 4xx, never 250.
- TCP_NODELAY, and the message goes out in one write (header, body and final dot together).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import cast

from spamkiller.errors import ProtocolError, UpstreamUnavailable
from spamkiller.smtp.client import ClientSession
from spamkiller.smtp.events import NEED_DATA, ConnectionClosed
from spamkiller.smtp.limits import Limits
from spamkiller.smtp.replies import Reply
from spamkiller.smtp.states import State
from spamkiller.timers import Wakeup


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTarget:
    """Where and how to relay; built from the config by the composition root."""

    hosts: tuple[str, ...]
    port: int
    use_tls: bool
    tls_context: ssl.SSLContext | None  # required when use_tls
    server_name: str | None = None  # name to verify; default: the host
    connect_timeout: float = 30.0
    timeout: float = 300.0
    data_timeout: float = 600.0
    helo: str = "localhost"


class _Link(asyncio.Protocol):
    """Feeds upstream bytes to the sans-IO client and wakes whoever waits for a reply."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        # One lazily re-armed timer for all the reply waits of this link (a pooled link waits
        # for several replies per message).
        self._wakeup = Wakeup(asyncio.get_running_loop())
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.session.receive_data(data)
        self._wake()

    def eof_received(self) -> bool:
        self.session.receive_data(b"")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.session.receive_data(b"")
        self._wake()
        self._wakeup.close()

    def _wake(self) -> None:
        self._wakeup.wake()

    async def reply(self, timeout: float) -> Reply:
        """The next reply, or UpstreamUnavailable on timeout, EOF or a malformed reply."""
        while True:
            try:
                reply = self.session.next_reply()
            except ProtocolError as exc:
                raise UpstreamUnavailable(f"protocol error from upstream: {exc}") from None
            if isinstance(reply, Reply):
                return reply
            if isinstance(reply, ConnectionClosed) or self.lost:
                raise UpstreamUnavailable("upstream closed the connection")
            assert reply is NEED_DATA
            if not await self._wakeup.wait(timeout):
                raise UpstreamUnavailable("upstream timed out")

    def write(self, data: bytes) -> None:
        if self.transport is None or self.lost or self.transport.is_closing():
            raise UpstreamUnavailable("upstream connection is closed")
        self.transport.write(data)


class UpstreamSession:
    """An open, greeted (and, with use_tls, verified TLS) session to one upstream host."""

    def __init__(self, link: _Link, target: UpstreamTarget, peer: str, tls: str) -> None:
        self._link = link
        self._target = target
        self.peer = peer  # "host[ip]:port" for the log
        self.tls = tls  # "TLSv1.3/TLS_AES_256_GCM_SHA384" or "none"
        self.in_transaction = False
        self.data_pending = False
        self.reused = False  # taken from the pool: may have gone stale since

    @property
    def usable(self) -> bool:
        link = self._link
        return not link.lost and link.session.state is not State.CLOSED

    @property
    def idle_fit(self) -> bool:
        """Open, between transactions, and the upstream has said nothing unasked."""
        return self.usable and not self.in_transaction and self._link.session.unread == 0

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self._link.session.extensions

    async def begin(self, sender: str, params: str, recipient: str) -> Reply:
        """MAIL and the first RCPT, pipelined when offered; the reply that decides this RCPT."""
        link, session = self._link, self._link.session
        self.in_transaction = True
        if self.pipelining:
            link.write(session.mail(sender, params) + session.rcpt(recipient))
            mail = await link.reply(self._target.timeout)
            rcpt = await link.reply(self._target.timeout)
            if not mail.is_positive:
                self.in_transaction = False
                return mail
            return rcpt
        link.write(session.mail(sender, params))
        mail = await link.reply(self._target.timeout)
        if not mail.is_positive:
            self.in_transaction = False
            return mail
        return await self.rcpt(recipient)

    async def rcpt(self, recipient: str) -> Reply:
        link = self._link
        link.write(link.session.rcpt(recipient))
        return await link.reply(self._target.timeout)

    def data_begin(self) -> None:
        """Send DATA now; its 354 is read in data_finish, overlapping the client's upload."""
        self._link.write(self._link.session.data())
        self.data_pending = True

    async def data_finish(self, header: bytes, stuffed: bytes) -> Reply:
        """Wait for 354, send header + message + final dot in one write; the final reply."""
        link = self._link
        self.data_pending = False
        go = await link.reply(self._target.timeout)
        if go.code != 354:
            self.in_transaction = False
            return go
        link.write(link.session.message(stuffed, header=header))
        try:
            return await link.reply(self._target.data_timeout)
        finally:
            self.in_transaction = False

    async def reset(self) -> None:
        """End an open transaction (client RSET or a transaction that will not reach DATA)."""
        if not self.in_transaction:
            return
        self.in_transaction = False
        link = self._link
        link.write(link.session.rset())
        reply = await link.reply(self._target.timeout)
        if not reply.is_positive:
            raise UpstreamUnavailable(f"upstream refused RSET: {reply}")

    def close(self) -> None:
        """Drop the connection without QUIT (an upstream mid-DATA then discards the message)."""
        transport = self._link.transport
        if transport is not None:
            transport.abort()

    async def quit(self) -> None:
        """Polite QUIT, best effort, bounded by a short timeout."""
        link = self._link
        try:
            if self.usable and not self.data_pending:
                link.write(link.session.quit())
                await link.reply(min(self._target.timeout, 5.0))
        except (UpstreamUnavailable, ProtocolError, OSError):
            pass
        finally:
            if link.transport is not None:
                link.transport.close()


class Upstream:
    """Opens upstream sessions to the configured hosts, in order, and keeps idle ones for reuse.

    An inbound session holds one upstream session for its whole life; when it ends between
    transactions, the upstream session goes back to a small pool (like Postfix's connection
    cache) so the next inbound session skips the connect, greeting, EHLO and TLS handshake.
    A pooled session is reused only if it is young, still open and the upstream has not spoken
    since (an idle-timeout 421, say); the caller retries once on a fresh connection if a reused
    one fails at its first command anyway.
    """

    def __init__(
        self,
        target: UpstreamTarget,
        limits: Limits | None = None,
        *,
        max_idle: int = 16,
        idle_reuse: float = 10.0,
    ) -> None:
        if target.use_tls and target.tls_context is None:
            raise ValueError("use_tls needs a TLS context")
        self.target = target
        self.limits = limits or Limits()
        self.max_idle = max_idle
        self.idle_reuse = idle_reuse  # well under the 5 minutes servers wait (RFC 5321 4.5.3.2.7)
        self._idle: list[tuple[float, UpstreamSession]] = []  # oldest first
        self._closing: set[asyncio.Task[None]] = set()

    async def connect(self) -> UpstreamSession:
        """A pooled session if one is fit for reuse, else a new one (hosts tried in order)."""
        now = asyncio.get_running_loop().time()
        while self._idle:
            since, session = self._idle.pop()
            if now - since < self.idle_reuse and session.idle_fit:
                session.reused = True
                return session
            self._retire(session)
        return await self.connect_new()

    def release(self, session: UpstreamSession) -> None:
        """Hand back a session whose inbound client is done with it."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and now - self._idle[0][0] >= self.idle_reuse:
            self._retire(self._idle.pop(0)[1])
        if session.idle_fit and len(self._idle) < self.max_idle:
            session.reused = False
            self._idle.append((now, session))
        else:
            self._retire(session)

    def _retire(self, session: UpstreamSession) -> None:
        """QUIT in the background (or cut it if a transaction is open)."""
        if session.in_transaction or not session.usable:
            session.close()
            return
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_idle(self) -> None:
        """Shutdown or reload: QUIT every pooled session and wait for those already closing."""
        while self._idle:
            self._retire(self._idle.pop()[1])
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def connect_new(self) -> UpstreamSession:
        errors: list[str] = []
        for host in self.target.hosts:
            try:
                return await self._connect_one(host)
            except UpstreamUnavailable as exc:
                errors.append(f"{host}:{self.target.port}: {exc}")
        raise UpstreamUnavailable("; ".join(errors) or "no upstream hosts configured")

    async def _connect_one(self, host: str) -> UpstreamSession:
        target = self.target
        loop = asyncio.get_running_loop()
        session = ClientSession(limits=self.limits)
        try:
            _, link = await asyncio.wait_for(
                loop.create_connection(lambda: _Link(session), host, target.port),
                target.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"connect failed: {exc or 'timeout'}") from None
        assert link.transport is not None
        ip = link.transport.get_extra_info("peername", ("?",))[0]
        peer = f"{host}[{ip}]:{target.port}"
        try:
            greeting = await link.reply(target.timeout)
            if greeting.code != 220:
                raise UpstreamUnavailable(f"greeting {greeting}")
            await self._ehlo(link)
            tls = "none"
            if target.use_tls:
                tls = await self._starttls(link, host)
                await self._ehlo(link)
        except BaseException:
            if link.transport is not None:
                link.transport.abort()
            raise
        return UpstreamSession(link, target, peer, tls)

    async def _ehlo(self, link: _Link) -> None:
        link.write(link.session.ehlo(self.target.helo))
        reply = await link.reply(self.target.timeout)
        if not reply.is_positive:
            raise UpstreamUnavailable(f"EHLO refused: {reply}")

    async def _starttls(self, link: _Link, host: str) -> str:
        session = link.session
        if "STARTTLS" not in session.extensions:
            raise UpstreamUnavailable("upstream does not offer STARTTLS and use_tls is set")
        link.write(session.starttls())
        reply = await link.reply(self.target.timeout)
        if reply.code != 220:
            raise UpstreamUnavailable(f"STARTTLS refused: {reply}")
        session.start_tls()  # drop anything sent after the 220: it is not protected by TLS
        assert link.transport is not None and self.target.tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                link.transport,
                link,
                self.target.tls_context,
                server_hostname=self.target.server_name or host,
                ssl_handshake_timeout=self.target.connect_timeout,
            )
        except (ssl.SSLError, ssl.CertificateError, OSError, TimeoutError, ConnectionError) as exc:
            raise UpstreamUnavailable(f"TLS to upstream failed: {exc}") from None
        if transport is None:
            raise UpstreamUnavailable("TLS to upstream failed: connection closed")
        link.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            raise UpstreamUnavailable("TLS to upstream failed")
        cipher = ssl_object.cipher()
        return f"{ssl_object.version()}/{cipher[0] if cipher else '?'}"


def parse_queue_id(reply: Reply) -> str | None:
    """The upstream's queue id from its end-of-data reply, for the log (Postfix, Exim, others)."""
    text = " ".join(reply.lines)
    for marker in ("queued as ", "id=", "Ok: "):
        at = text.find(marker)
        if at >= 0:
            token = text[at + len(marker) :].split(" ", 1)[0].strip("<>()[],;")
            if token:
                return token[:64]
    return None
