"""The thin asyncio driver of one inbound connection: bytes to the sans-IO session and back.

It owns what sans-IO cannot: sockets, timers, TLS handshakes, the upstream session and the log
lines. Protocol rules live in `smtp/`; the no-open-relay rule in `checks/relay.py`; the relay
mechanics in `relay/upstream.py`. A protocol rule found here belongs in `smtp/`.

Callback-style `asyncio.Protocol` feeding one coroutine per connection: reads arrive in bulk, the
session is asked for every complete command in the buffer before we wait again, and each reply is
one `write`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

from spamkiller import proxyproto
from spamkiller.checks.base import (
    CheckContext,
    Finding,
    Stage,
    client_address,
    worth_looking_up,
)
from spamkiller.checks.greylist import Greylister, GreylistSession, tls_key
from spamkiller.checks.pipeline import NOTHING, Pipeline, StageResult
from spamkiller.checks.policy import Action, Thresholds, Verdict, clean_verdict, decide
from spamkiller.checks.ratelimit import RateLimiter, guarded
from spamkiller.checks.recipients import (
    TOO_MANY_UNKNOWN,
    Lookup,
    RecipientDirectory,
    means_unknown_user,
    user_unknown,
)
from spamkiller.checks.relay import check_recipient
from spamkiller.errors import UpstreamUnavailable
from spamkiller.observability.logging import EventLog
from spamkiller.relay.upstream import Upstream, UpstreamSession, parse_queue_id
from spamkiller.server.received import protocol_name, received_header
from spamkiller.smtp import replies
from spamkiller.smtp.events import (
    BdatChunk,
    ConnectionClosed,
    DataCommand,
    DataRejected,
    Ehlo,
    Event,
    MailFrom,
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
from spamkiller.smtp.server import ServerSession
from spamkiller.smtp.states import State
from spamkiller.store.base import SlotLease, Store
from spamkiller.timers import Wakeup
from spamkiller.tls.contexts import ServerTls
from spamkiller.tls.facts import TlsFacts, TlsStart

if TYPE_CHECKING:
    from spamkiller.smtp.address import Address

_T = TypeVar("_T")

UPSTREAM_UNAVAILABLE = Reply(451, "4.4.1", "Upstream server unavailable, try again later")
CLIENT_CERT_REFUSED = Reply(421, "4.7.0", "Client certificate not accepted")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Too many connections from your address, try again later")
MEMORY_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
MEMORY_EXHAUSTED = Reply(421, "4.3.1", "Insufficient system storage, closing connection")


_NOTHING_FOUND = (NOTHING, NOTHING, NOTHING, NOTHING)  # the four stages' results, all clean


def canonical_ip(ip: str) -> str:
    """An IPv4-mapped IPv6 address (::ffff:192.0.2.1, from a dual-stack listener or a PROXY TCP6
    header) as the IPv4 address it is, so caps, checks, keys and logs see one form."""
    if ip[:7].lower() != "::ffff:":
        return ip  # the common case costs no parse
    try:
        return str(client_address(ip))
    except ValueError:
        return ip


def new_session_id() -> str:
    """A short id for logs and replies: 10 hex digits (40 random bits), like a queue id."""
    return os.urandom(5).hex().upper()


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerPolicy:
    """What one listener asks of its sessions (from its config block)."""

    name: str
    tls: str  # starttls | implicit | none
    require_tls: bool
    server_tls: ServerTls | None  # None only when tls is "none"
    greet_delay: float = 0.0
    proxy_protocol: bool = False
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def trusts(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)


@dataclass(slots=True, kw_only=True)
class Runtime:
    """What sessions need; replaced whole on reload (a session keeps the one it began with)."""

    hostname: str
    domains: frozenset[str]
    limits: Limits
    command_timeout: float
    data_timeout: float
    min_data_rate: int  # bytes/s a message must average; 0: no minimum
    handshake_timeout: float
    listeners: dict[str, ListenerPolicy]
    upstream: Upstream
    log: EventLog
    pipeline: Pipeline = field(default_factory=Pipeline)
    weights: dict[str, float] = field(default_factory=dict)
    thresholds: Thresholds = field(default_factory=Thresholds)
    recipients: RecipientDirectory = field(default_factory=RecipientDirectory)
    store: Store | None = None  # the worker's; None when nothing needs one
    store_timeout: float = 1.0  # per operation of the session's own (pass cache, TLS history)
    rate_limiter: RateLimiter | None = None
    greylister: Greylister | None = None
    pass_cache_ttl: float = 0.0  # 0: off
    tls_history_expire: float = 0.0  # 0: TLS history not recorded
    tarpit_score: float | None = None  # None: no tarpit
    tarpit_delay: float = 0.0


@dataclass(slots=True)
class Gate:
    """Connection counts shared by every listener of a process: global and per-IP caps, drain."""

    max_connections: int
    max_per_ip: int
    max_message_memory: int = 512 * 1024**2
    active: int = 0
    message_memory: int = 0  # message text held by all sessions, octets
    per_ip: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    sessions: set[InboundConnection] = field(default_factory=set)
    awaiting_proxy: set[InboundConnection] = field(default_factory=set)  # not admitted yet
    store_errors: int = 0  # store failures seen by this worker (each is also logged)
    background: set[asyncio.Task[None]] = field(default_factory=set)  # fire-and-forget writes

    def spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        """Run a store write without holding up the reply; the task is kept until it ends."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def admit(self, ip: str) -> Reply | None:
        if self.draining:
            return replies.SHUTTING_DOWN
        if self.active >= self.max_connections:
            return TOO_MANY_CONNECTIONS
        if self.per_ip.get(ip, 0) >= self.max_per_ip:
            return TOO_MANY_FROM_YOU
        self.active += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.active -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


class _Transaction:
    """The envelope of the message in progress, for the upstream and the log line."""

    __slots__ = ("recipients", "sender", "sender_params", "started")

    def __init__(self, sender: Address | None, params: str) -> None:
        self.sender = "" if sender is None else str(sender)
        self.sender_params = params
        self.recipients: list[str] = []
        self.started = time.monotonic()


class InboundConnection(asyncio.Protocol):
    """One client connection, from accept to close."""

    # Slots: the driver reads its own attributes on every command, and a thousand idle
    # connections should not each carry a dict.
    __slots__ = (
        "_accepted",
        "_admitted",
        "_awaiting_proxy",
        "_bytes_in",
        "_close_reason",
        "_connect_result",
        "_early",
        "_eof",
        "_grey",
        "_held",
        "_helo_result",
        "_leases",
        "_limited",
        "_lost",
        "_mail_result",
        "_message_bytes0",
        "_message_started",
        "_pass_cache",
        "_paused",
        "_peer_allowed",
        "_proxied_by",
        "_public",
        "_tarpit",
        "_task",
        "_tls_begun",
        "_tls_recorded",
        "_unknown_rcpts",
        "_verdict",
        "_wakeup",
        "client_ip",
        "client_port",
        "ctx",
        "gate",
        "policy",
        "rt",
        "session",
        "sid",
        "tls",
        "transport",
        "txn",
        "upstream",
    )

    def __init__(self, listener: str, runtime: Callable[[], Runtime], gate: Gate) -> None:
        self.rt = runtime()  # fixed for the life of this session, even across a reload
        self.policy = self.rt.listeners[listener]
        self.gate = gate
        self.sid = new_session_id()
        self.transport: asyncio.Transport | None = None
        self.session: ServerSession | None = None
        self.client_ip = "?"
        self.client_port = 0
        self.tls = TlsFacts.plaintext(starttls_offered=False)
        self.upstream: UpstreamSession | None = None
        self.txn: _Transaction | None = None
        self._wakeup = Wakeup(asyncio.get_running_loop())
        self._lost = False
        self._paused = False
        self._admitted = False
        self._task: asyncio.Task[None] | None = None  # held so the loop cannot drop it
        self._close_reason = ""
        self._peer_allowed = True
        self._accepted: Reply | None = None  # rendered once per session
        self._bytes_in = 0  # octets received from the client
        self._held = 0  # this session's share of gate.message_memory
        self._tls_begun = False  # a handshake started: the transport is (becoming) TLS
        self._awaiting_proxy = False  # reading a PROXY header before anything else
        self._proxied_by: str | None = None  # "ip:port" of the trusted proxy, if any
        self.ctx: CheckContext | None = None
        self._connect_result = NOTHING
        self._helo_result = NOTHING
        self._mail_result = NOTHING
        self._verdict: Verdict | None = None  # the last recipient's, for the message log line
        self._message_started = 0.0  # monotonic time the current message text began
        self._message_bytes0 = 0  # _bytes_in at that moment
        self._early = bytearray()  # bytes that arrived before the session existed
        self._eof = False
        self._unknown_rcpts = 0  # this session's, against recipients.max_unknown
        self._leases: tuple[SlotLease, ...] = ()  # concurrency slots held in the store
        self._grey: GreylistSession | None = None
        self._limited = False  # rate_limits apply to this client (decided once, at connect)
        self._public: bool | None = None  # worth_looking_up(client_ip), once known
        self._tls_recorded = False
        self._pass_cache = ""  # hit | stored, for the disconnect line
        self._tarpit = 0.0  # seconds each reply waits once the score reached tarpit_score

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.client_ip, self.client_port = canonical_ip(str(peer[0])), int(peer[1])
        if self.policy.proxy_protocol:
            # Admission waits for the PROXY header: caps count the real client, not the proxy.
            if not self.policy.trusts(self.client_ip):
                self.rt.log.line(
                    self.sid,
                    "refused",
                    {"client": f"[{self.client_ip}]", "reason": "untrusted proxy"},
                )
                self.transport.close()
                return
            if self.gate.draining:
                self.transport.write(replies.SHUTTING_DOWN.with_id(self.sid).wire)
                self.transport.close()
                return
            self._awaiting_proxy = True
            self.gate.awaiting_proxy.add(self)
            self._task = asyncio.get_running_loop().create_task(self._run())
            return
        refusal = self.gate.admit(self.client_ip)
        if refusal is not None:
            self.transport.write(refusal.with_id(self.sid).wire)
            self.transport.close()
            self.rt.log.line(
                self.sid, "refused", {"client": f"[{self.client_ip}]", "reason": refusal.text}
            )
            return
        self._admitted = True
        self.gate.sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            # Before the banner (pregreet) or a PROXY header: kept for the session, bounded.
            if (self._admitted or self._awaiting_proxy) and len(self._early) < 65536:
                self._early += data
                if self._awaiting_proxy:
                    self._wake()
            return
        self._bytes_in += len(data)
        session.receive_data(data)
        held = session.message_bytes_held
        if held != self._held:
            gate = self.gate
            gate.message_memory += held - self._held
            self._held = held
            if held and gate.message_memory > gate.max_message_memory:
                self._memory_exhausted()
                return
        if session.buffered > session.limits.max_pipeline_buffer and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def _memory_exhausted(self) -> None:
        """This session's bytes pushed the worker past max_message_memory: it ends (the
        sender keeps its message and retries; nothing was accepted)."""
        self._release_memory()
        self._close_reason = "message memory exhausted"
        self._write(MEMORY_EXHAUSTED.with_id(self.sid).wire)
        if self.transport is not None:
            self.transport.close()
        self._lost = True
        self._wake()

    def _release_memory(self) -> None:
        self.gate.message_memory -= self._held
        self._held = 0

    def eof_received(self) -> bool:
        self._eof = True
        if self.session is not None:
            self.session.receive_data(b"")
        self._wake()
        # Keep the write side open, we may still owe replies; TLS transports ignore (and log)
        # a True here, so only say it before any handshake began.
        return not self._tls_begun

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.session is not None:
            self.session.receive_data(b"")
        self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    # ---- the session ----------------------------------------------------------------------

    def _read_timeout(self, session: ServerSession) -> float:
        """RFC 5321 4.5.3.2 per-read timeouts, and a whole-message deadline from min_data_rate."""
        rt = self.rt
        if not session.reading_message:
            self._message_started = 0.0
            return rt.command_timeout
        now = time.monotonic()
        if not self._message_started:
            self._message_started, self._message_bytes0 = now, self._bytes_in
        if not rt.min_data_rate:
            return rt.data_timeout
        allowed = rt.data_timeout + (self._bytes_in - self._message_bytes0) / rt.min_data_rate
        return max(0.0, min(rt.data_timeout, self._message_started + allowed - now))

    async def _wait_data(self, timeout: float) -> bool:
        """Wait for more input; False on timeout."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return await self._wakeup.wait(timeout)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def _run(self) -> None:
        rt = self.rt
        policy = self.policy
        began = time.monotonic()
        try:
            if policy.proxy_protocol and not await self._proxy_header():
                return
            if not await self._within_limits():
                return
            if policy.tls == "implicit" and not await self._handshake(TlsStart.IMPLICIT):
                return
            starttls = policy.tls == "starttls" and policy.server_tls is not None
            self.session = session = ServerSession(
                hostname=rt.hostname,
                session_id=self.sid,
                limits=rt.limits,
                tls_active=self.tls.active,
                starttls_available=starttls,
                require_tls=policy.require_tls,
            )
            if self._early:
                session.receive_data(bytes(self._early))
                self._early.clear()
            if self._eof or self._lost:
                session.receive_data(b"")
            if not self.tls.active:
                self.tls = TlsFacts.plaintext(starttls_offered=starttls)
            self.ctx = CheckContext(
                client_ip=self.client_ip,
                listener=policy.name,
                our_hostname=rt.hostname,
                our_domains=rt.domains,
                tls=self.tls,
            )
            rt.log.line(
                self.sid,
                "connect",
                {
                    "client": f"[{self.client_ip}]:{self.client_port}",
                    "listener": policy.name,
                    "proxy": self._proxied_by,
                    "tls": self.tls.log_value(),
                },
            )
            if not self._client_cert_ok():
                self._write(session.greeting(CLIENT_CERT_REFUSED))
                self._close_reason = "client certificate refused"
                return
            await self._before_banner(session)
            if self._tarpit:
                await asyncio.sleep(self._tarpit)
            self._write(session.greeting())
            await self._dialogue(session)
        except Exception as exc:  # a bug must end this session, not the server
            self._close_reason = f"internal error: {type(exc).__name__}: {exc}"
            if self.session is not None and self.session.state is not State.CLOSED:
                self._write(
                    Reply(421, "4.3.0", "Internal error, closing connection").with_id(self.sid).wire
                )
        finally:
            await self._finish(time.monotonic() - began)

    async def _before_banner(self, session: ServerSession) -> None:
        """Connect-stage checks, run during the listener's greet delay if it has one; a client
        that talks before the banner is scored PREGREET (postscreen's pregreet test)."""
        rt = self.rt
        assert self.ctx is not None
        cacheable = bool(rt.pass_cache_ttl and rt.store) and self._is_public()
        if cacheable and await self._in_pass_cache():
            self._pass_cache = "hit"
            return  # passed these checks (and the greet delay) recently: skip them
        checks = (
            rt.pipeline.run(Stage.CONNECT, self.ctx) if rt.pipeline.has(Stage.CONNECT) else None
        )
        delay = self.policy.greet_delay
        if not delay:
            if checks is not None:
                self._connect_result = await checks
        else:
            task = asyncio.get_running_loop().create_task(checks) if checks is not None else None
            await asyncio.sleep(delay)
            result = await task if task is not None else NOTHING
            if session.buffered:  # everything the client sent so far came before our banner
                pregreet = Finding(symbol="PREGREET", detail=f"{session.buffered} octets")
                result = StageResult(
                    findings=(*result.findings, pregreet), tempfail=result.tempfail
                )
            self._connect_result = result
        if checks is None and not delay:
            return  # nothing was checked, so there is nothing to remember
        verdict = decide(
            self._connect_result.findings, weights=rt.weights, thresholds=rt.thresholds
        )
        self._note_score(verdict.score)
        clean = self._connect_result.tempfail is None and all(
            f.symbol not in ("CHECK_ERROR", "CHECK_TIMEOUT") for f in self._connect_result.findings
        )
        if cacheable and clean and verdict.score <= 0:
            self._pass_cache = "stored"
            self.gate.spawn(self._remember_pass())

    def _is_public(self) -> bool:
        if self._public is None:
            self._public = worth_looking_up(self.client_ip)
        return self._public

    def _pass_key(self) -> str:
        return f"pass:{self.client_ip}"

    async def _stored(self, what: str, operation: Awaitable[_T]) -> _T | None:
        """One store operation of the session's own, bounded by state_timeout; a failure is
        logged and counted, and reads as None."""
        result, error = await guarded(operation, self.rt.store_timeout)
        if error is not None:
            self._store_failed(what, error)
        return result

    async def _in_pass_cache(self) -> bool:
        store = self.rt.store
        assert store is not None
        # A store failure is a miss: the checks run as usual.
        return bool(await self._stored("pass_cache", store.pass_cache_get(self._pass_key())))

    async def _remember_pass(self) -> None:
        store = self.rt.store
        assert store is not None
        put = store.pass_cache_put(self._pass_key(), ttl=self.rt.pass_cache_ttl)
        await self._stored("pass_cache", put)

    def _note_score(self, score: float) -> None:
        """Tarpit: once the score reaches tarpit_score, every later reply waits."""
        rt = self.rt
        if rt.tarpit_score is not None and score >= rt.tarpit_score:
            self._tarpit = rt.tarpit_delay

    async def _within_limits(self) -> bool:
        """The shared connection rates and concurrency caps (store-backed, across workers and
        hosts); a client over one gets 421 before anything else happens."""
        limiter = self.rt.rate_limiter
        self._limited = limiter is not None and limiter.applies(self.client_ip)
        if limiter is None or not self._limited:
            return True
        outcome = await limiter.admit(self.client_ip)
        if outcome.error is not None:
            self._store_failed("rate_limits", outcome.error)
        self._leases = outcome.leases
        if outcome.reply is None:
            return True
        if self.policy.tls != "implicit":  # an implicit-TLS client cannot read a plaintext 421
            self._write(outcome.reply.with_id(self.sid).wire)
        self._close_reason = f"refused: {outcome.limit or outcome.error}"
        self.rt.log.line(
            self.sid,
            "refused",
            {
                "client": f"[{self.client_ip}]",
                "reason": outcome.reply.text,
                "limit": outcome.limit,
                "error": outcome.error,
            },
        )
        return False

    def _store_failed(self, what: str, error: str) -> None:
        gate = self.gate
        gate.store_errors += 1
        self.rt.log.line(
            self.sid,
            "store",
            {"status": "error", "for": what, "reason": error, "errors": gate.store_errors},
        )

    async def _proxy_header(self) -> bool:
        """Read the PROXY header a trusted proxy sends first; then admit the real client."""
        proxy = f"{self.client_ip}:{self.client_port}"
        deadline = time.monotonic() + self.rt.handshake_timeout
        while True:
            try:
                header = proxyproto.parse(bytes(self._early))
            except proxyproto.ProxyHeaderError as exc:
                self._close_reason = f"bad PROXY header from {proxy}: {exc}"
                return False
            if header is not None:
                break
            left = deadline - time.monotonic()
            if self._lost or self._eof or left <= 0 or not await self._wakeup.wait(left):
                self._close_reason = self._close_reason or f"no PROXY header from {proxy}"
                return False
        del self._early[: header.length]
        self._awaiting_proxy = False
        self.gate.awaiting_proxy.discard(self)
        if header.source_ip is not None and header.source_port is not None:
            self.client_ip, self.client_port = canonical_ip(header.source_ip), header.source_port
        refusal = self.gate.admit(self.client_ip)
        if refusal is not None:
            self._write(refusal.with_id(self.sid).wire)
            self._close_reason = f"refused: {refusal.text}"
            return False
        self._admitted = True
        self.gate.sessions.add(self)
        self._proxied_by = proxy
        return True

    async def _dialogue(self, session: ServerSession) -> None:
        while True:
            event = session.next_event()
            if isinstance(event, NeedData):
                if self._lost:
                    self._close_reason = self._close_reason or "lost"
                    return
                if not await self._wait_data(self._read_timeout(session)):
                    self._write(replies.TIMEOUT.with_id(self.sid).wire)
                    self._close_reason = "timeout"
                    return
                continue
            if isinstance(event, ConnectionClosed):
                self._close_reason = self._close_reason or (
                    "lost during data" if event.mid_data else "client closed"
                )
                return
            if self.gate.draining and session.state in (State.GREETED, State.READY):
                # Shutting down: finish transactions in progress, turn away new ones.
                self._write(session.send(replies.SHUTTING_DOWN))
                self._close_reason = "shutdown"
                return
            reply = await self._decide(event)
            if self._tarpit and not isinstance(event, Quit):
                await asyncio.sleep(self._tarpit)
            self._write(session.send(reply))
            if self._held and not session.message_bytes_held:
                self._release_memory()  # the message is answered: its text is no longer ours
            if session.state is State.TLS:
                if not await self._handshake(TlsStart.STARTTLS):
                    return
                session.start_tls()
                if not self._client_cert_ok():
                    self._write(CLIENT_CERT_REFUSED.with_id(self.sid).wire)
                    self._close_reason = "client certificate refused"
                    return
            elif session.state is State.CLOSED:
                self._close_reason = self._close_reason or (
                    "quit" if isinstance(event, Quit) else "closed by us"
                )
                return

    async def _decide(self, event: Event) -> Reply:
        """The reply to one event: the session's own, unless our rules or the upstream differ."""
        if isinstance(event, MailFrom):
            params = []
            if event.params.body != "7BIT":
                params.append(f"BODY={event.params.body}")
            if event.params.smtputf8:
                params.append("SMTPUTF8")
            if event.params.size is not None:
                params.append(f"SIZE={event.params.size}")
            refusal = await self._mail_limits()
            if refusal is not None:
                return refusal
            self.txn = _Transaction(event.sender, " ".join(params))
            self._mail_result = NOTHING
            if self._grey is not None:
                self._grey.new_transaction()
            if self.ctx is not None:
                self.ctx.mail_from = self.txn.sender
                self.ctx.recipients = []
                if self.rt.pipeline.has(Stage.MAIL):
                    self._mail_result = await self.rt.pipeline.run(Stage.MAIL, self.ctx)
            return event.reply
        if isinstance(event, RcptTo):
            return await self._rcpt(event)
        if isinstance(event, DataCommand):
            return self._data_command(event)
        if isinstance(event, MessageReceived):
            return await self._message(event)
        if isinstance(event, DataRejected):
            self._abort_upstream_data()
            self._log_message(
                status="rejected", reply=event.reply, size=event.size, reason=event.reason
            )
            self.txn = None
            return event.reply
        if isinstance(event, BdatChunk):
            return event.reply
        if isinstance(event, Reset | Ehlo):
            await self._reset_upstream()
            self.txn = None
            # Findings are kept for RCPT time, when the envelope is known and a rejection can be
            # logged with it (Postfix's smtpd_delay_reject). HELO checks judge the name and the
            # client, not TLS: the same name again (the EHLO after STARTTLS) keeps its findings,
            # unless they were a tempfail worth asking again.
            ctx = self.ctx
            if (
                isinstance(event, Ehlo)
                and ctx is not None
                and (event.name != ctx.helo or self._helo_result.tempfail is not None)
            ):
                ctx.helo = event.name
                self._helo_result = await self.rt.pipeline.run(Stage.HELO, ctx)
            return event.reply
        if isinstance(event, Quit | StartTls):
            await self._reset_upstream()
            self.txn = None
            return event.reply
        if isinstance(event, Violation) and event.close:
            self._close_reason = event.reason
        return event.reply

    async def _mail_limits(self) -> Reply | None:
        """At MAIL: the shared message rates; the session's TLS use goes into its history."""
        rt = self.rt
        ip = self.client_ip
        limiter = rt.rate_limiter
        if rt.tls_history_expire and not self._tls_recorded and self._is_public():
            # Once per session that tries to send mail; a scanner that never does is not history.
            self._tls_recorded = True
            await self._record_tls()
        if limiter is None or not self._limited:
            return None
        outcome = await limiter.message(ip)
        if outcome.error is not None:
            self._store_failed("rate_limits", outcome.error)
        if outcome.reply is not None:
            rt.log.line(
                self.sid,
                "defer",
                {
                    "stage": "mail",
                    "client": f"[{ip}]",
                    "limit": outcome.limit,
                    "error": outcome.error,
                    "reply": str(outcome.reply),
                },
            )
        return outcome.reply

    async def _record_tls(self) -> None:
        store = self.rt.store
        assert store is not None
        version = self.tls.version if self.tls.active else None
        record = store.record_tls(
            tls_key(self.client_ip), version=version, expire=self.rt.tls_history_expire
        )
        history = await self._stored("tls_history", record)
        if self.ctx is not None:
            self.ctx.tls_history = history

    async def _rcpt(self, event: RcptTo) -> Reply:
        refusal = check_recipient(event.recipient, self.rt.domains)
        if refusal is not None:
            return refusal
        txn = self.txn
        assert txn is not None  # the session only emits RCPT after an accepted MAIL
        recipient = str(event.recipient)
        if self.rt.recipients.lookup(event.recipient) is Lookup.UNKNOWN:
            return self._unknown_rcpt(recipient, user_unknown(recipient), "not in recipients list")
        verdict = await self._judge_rcpt(recipient)
        if verdict.reply is not None:
            return verdict.reply
        try:
            upstream = await self._upstream()
            if upstream.in_transaction:
                reply = await upstream.rcpt(recipient)
            else:
                reply = await self._begin(upstream, txn, recipient)
        except UpstreamUnavailable as exc:
            self._upstream_failed(exc)
            return UPSTREAM_UNAVAILABLE
        if reply.code == 421:
            # The upstream is closing its session; that is no reason to close the client's.
            self._upstream_failed(UpstreamUnavailable(f"upstream closing: {reply}"))
            return UPSTREAM_UNAVAILABLE
        if not reply.is_positive:
            if means_unknown_user(reply):
                return self._unknown_rcpt(recipient, reply, "unknown at upstream")
            return reply  # the upstream's refusal becomes ours, at RCPT time
        txn.recipients.append(recipient)
        return event.reply

    def _unknown_rcpt(self, recipient: str, reply: Reply, reason: str) -> Reply:
        """Count and log an unknown recipient; past recipients.max_unknown the session ends
        (421, then closed by the session), so a harvester cannot walk through a directory."""
        self._unknown_rcpts += 1
        if self.rt.recipients.over_cap(self._unknown_rcpts):
            reply = TOO_MANY_UNKNOWN
            reason = f"{reason}; too many unknown recipients ({self._unknown_rcpts})"
            self._close_reason = "too many unknown recipients"
        txn = self.txn
        self.rt.log.line(
            self.sid,
            "reject" if reply.is_permanent else "defer",
            {
                "stage": "rcpt",
                "from": f"<{txn.sender}>" if txn else None,
                "to": f"<{recipient}>",
                "reason": reason,
                "reply": str(reply),
            },
        )
        return reply

    async def _judge_rcpt(self, recipient: str) -> Verdict:
        """Everything found so far, plus this recipient's checks, scored; logged if refused."""
        rt = self.rt
        ctx = self.ctx
        rcpt_result = NOTHING
        if ctx is not None and rt.pipeline.has(Stage.RCPT):
            ctx.rcpt = recipient
            rcpt_result = await rt.pipeline.run(Stage.RCPT, ctx)
        results = (self._connect_result, self._helo_result, self._mail_result, rcpt_result)
        tempfail: str | None = None
        if results == _NOTHING_FOUND:  # the usual case: no finding, so no sum to make
            verdict = clean_verdict(rt.thresholds)
        else:
            tempfail = next((r.tempfail for r in results if r.tempfail), None)
            verdict = decide(
                (f for r in results for f in r.findings),
                weights=rt.weights,
                thresholds=rt.thresholds,
                tempfail=tempfail,
            )
        self._note_score(verdict.score)
        reason = tempfail
        if verdict.reply is None and rt.greylister is not None and ctx is not None:
            if self._grey is None:
                self._grey = rt.greylister.session(ctx)
            if not self._grey.exempt:  # decided once per session: an exempt client is not looked up
                grey = await self._grey.check(recipient, verdict.score)
                if grey.error is not None:
                    self._store_failed("greylist", grey.error)
                if grey.reply is not None:
                    reason = f"greylist {grey.status}" + (f": {grey.error}" if grey.error else "")
                    verdict = Verdict(
                        action=Action.TEMPFAIL,
                        score=verdict.score,
                        rules=verdict.rules,
                        reply=grey.reply,
                    )
        self._verdict = verdict
        if verdict.reply is not None:
            txn = self.txn
            rt.log.line(
                self.sid,
                "reject" if verdict.reply.is_permanent else "defer",
                {
                    "stage": "rcpt",
                    "from": f"<{txn.sender}>" if txn else None,
                    "to": f"<{recipient}>",
                    "score": verdict.score,
                    "rules": verdict.rules or None,
                    "reason": reason,
                    "reply": str(verdict.reply),
                },
            )
        return verdict

    def _data_command(self, event: DataCommand) -> Reply:
        if self.gate.message_memory * 4 >= self.gate.max_message_memory * 3:
            return MEMORY_FULL  # three quarters held: let the messages in progress finish
        upstream = self.upstream
        if upstream is None or not upstream.usable or not upstream.in_transaction:
            return UPSTREAM_UNAVAILABLE
        try:
            upstream.data_begin()
        except UpstreamUnavailable as exc:
            self._upstream_failed(exc)
            return UPSTREAM_UNAVAILABLE
        return event.reply

    async def _message(self, event: MessageReceived) -> Reply:
        session = self.session
        txn = self.txn
        upstream = self.upstream
        assert session is not None and txn is not None
        if upstream is None or not upstream.usable or not upstream.in_transaction:
            self._log_message(status="deferred", reply=UPSTREAM_UNAVAILABLE, size=event.data.size)
            return UPSTREAM_UNAVAILABLE
        if not upstream.data_pending:  # BDAT: no DATA was sent while the chunks came in
            upstream.data_begin()
        header = received_header(
            helo=session.helo_name,
            client_ip=self.client_ip,
            client_name=self.ctx.client_name if self.ctx is not None else None,
            hostname=self.rt.hostname,
            session_id=self.sid,
            protocol=protocol_name(
                esmtp=session.esmtp, tls=self.tls.active, utf8=session.mail_params.smtputf8
            ),
            tls=self.tls,
            recipient=txn.recipients[0] if len(txn.recipients) == 1 else None,
        )
        try:
            reply = await upstream.data_finish(header, event.data.stuffed())
        except UpstreamUnavailable as exc:
            self._upstream_failed(exc)
            self._log_message(
                status="deferred", reply=UPSTREAM_UNAVAILABLE, size=event.data.size, reason=str(exc)
            )
            return UPSTREAM_UNAVAILABLE
        if reply.code == 250:
            queue_id = parse_queue_id(reply)
            grey = self._grey
            if grey is not None and not grey.exempt:
                self.gate.spawn(self._record_accepted(grey.greylister, grey.ctx))
            self._log_message(
                status="sent", reply=reply, size=event.data.size, upstream_id=queue_id
            )
            if self._accepted is None:
                self._accepted = Reply(250, "2.0.0", f"Message accepted (id {self.sid})")
            return self._accepted
        status = "bounced" if reply.is_permanent else "deferred"
        self._log_message(status=status, reply=reply, size=event.data.size)
        if reply.code == 421:  # the upstream hangs up: a 4xx for this message, the session goes on
            self._upstream_failed(UpstreamUnavailable(f"upstream closing: {reply}"))
            return UPSTREAM_UNAVAILABLE
        # Never 250 unless the upstream said 250; a 2xx other than 250 is not "accepted".
        return reply if reply.code >= 400 else UPSTREAM_UNAVAILABLE

    async def _record_accepted(self, greylister: Greylister, ctx: CheckContext) -> None:
        error = await greylister.record_accepted(ctx)
        if error is not None:
            self._store_failed("reputation", error)

    # ---- upstream --------------------------------------------------------------------------

    async def _begin(self, upstream: UpstreamSession, txn: _Transaction, recipient: str) -> Reply:
        """MAIL + first RCPT; a pooled session that went stale is replaced once, transparently."""
        if upstream.reused:
            try:
                reply = await upstream.begin(txn.sender, txn.sender_params, recipient)
            except UpstreamUnavailable:
                reply = replies.SHUTTING_DOWN  # treated like the upstream's own 421 below
            upstream.reused = False
            if reply.code != 421:
                return reply
            upstream.close()
            self.upstream = upstream = await self.rt.upstream.connect_new()
        return await upstream.begin(txn.sender, txn.sender_params, recipient)

    async def _upstream(self) -> UpstreamSession:
        upstream = self.upstream
        if upstream is not None and upstream.usable:
            return upstream
        self.upstream = None
        self.upstream = upstream = await self.rt.upstream.connect()
        return upstream

    def _upstream_failed(self, exc: Exception) -> None:
        self.rt.log.line(self.sid, "upstream", {"status": "unavailable", "reason": str(exc)})
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    async def _reset_upstream(self) -> None:
        upstream = self.upstream
        if upstream is None or not upstream.in_transaction:
            return
        if upstream.data_pending:
            self._abort_upstream_data()
            return
        try:
            await upstream.reset()
        except UpstreamUnavailable as exc:
            self._upstream_failed(exc)

    def _abort_upstream_data(self) -> None:
        """Once DATA went upstream, only closing the connection makes the upstream drop it."""
        if self.upstream is not None and self.upstream.data_pending:
            self.upstream.close()
            self.upstream = None

    # ---- TLS --------------------------------------------------------------------------------

    async def _handshake(self, began: TlsStart) -> bool:
        rt = self.rt
        transport = self.transport
        server_tls = self.policy.server_tls
        assert transport is not None and server_tls is not None
        loop = asyncio.get_running_loop()
        self._tls_begun = True
        try:
            new = await loop.start_tls(
                transport,
                self,
                server_tls.context,
                server_side=True,
                ssl_handshake_timeout=rt.handshake_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self._close_reason = f"TLS handshake failed: {exc}"
            transport.abort()
            return False
        if new is None:
            self._close_reason = "TLS handshake failed: connection closed"
            return False
        self.transport = new
        ssl_object = new.get_extra_info("ssl_object")
        self.tls = TlsFacts.from_ssl_object(
            ssl_object, began=began, sni=server_tls.sni_of(ssl_object)
        )
        self._peer_allowed = server_tls.peer_allowed(ssl_object)
        if self.ctx is not None:  # STARTTLS: later checks must see the session as it is now
            self.ctx.tls = self.tls
        rt.log.line(
            self.sid,
            "tls",
            {"tls": self.tls.log_value(), "sni": self.tls.sni, "began": began.value},
        )
        return True

    def _client_cert_ok(self) -> bool:
        """mTLS: OpenSSL verified the chain; the listener's pins are checked here."""
        return self._peer_allowed

    # ---- logs and cleanup -----------------------------------------------------------------

    def _log_message(self, *, status: str, reply: Reply, size: int, **extra: object) -> None:
        txn = self.txn
        upstream = self.upstream
        fields: dict[str, object] = {
            "from": f"<{txn.sender}>" if txn else None,
            "to": ",".join(f"<{r}>" for r in txn.recipients) if txn else None,
            "size": size,
            "tls": self.tls.log_value(),
            "relay": upstream.peer if upstream else None,
            "relay_tls": upstream.tls if upstream else None,
            "delay": f"{time.monotonic() - txn.started:.3f}" if txn else None,
            "score": self._verdict.score if self._verdict and self._verdict.rules else None,
            "rules": self._verdict.rules if self._verdict and self._verdict.rules else None,
            "status": status,
            "reply": str(reply),
        }
        fields.update(extra)
        self.rt.log.line(self.sid, "message", fields)

    async def _finish(self, duration: float) -> None:
        self._wakeup.close()
        self._release_memory()
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            if upstream.in_transaction:
                upstream.close()  # the upstream must not deliver a transaction we abandoned
            else:
                self.rt.upstream.release(upstream)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.gate.awaiting_proxy.discard(self)
        if self._admitted:
            self.gate.release(self.client_ip)
            self.gate.sessions.discard(self)
        if self._leases and self.rt.rate_limiter is not None:
            leases, self._leases = self._leases, ()
            self.gate.spawn(self._release_slots(self.rt.rate_limiter, leases))
        session = self.session
        fields: dict[str, object] = {
            "client": f"[{self.client_ip}]:{self.client_port}",
            "tls": self.tls.log_value(),
            # Offered and not taken: a plaintext sender that could have used TLS (a signal).
            "starttls_unused": 1 if self.tls.starttls_offered and not self.tls.active else None,
        }
        if session is not None:
            for verb, (ok, total) in session.counts.items():
                fields[verb] = str(ok) if ok == total else f"{ok}/{total}"
            if session.discarded_after_starttls:
                fields["discarded_after_starttls"] = session.discarded_after_starttls
        fields["pass_cache"] = self._pass_cache or None
        fields["tarpit"] = f"{self._tarpit:g}s" if self._tarpit else None
        fields["reason"] = self._close_reason or None
        fields["duration"] = f"{duration:.3f}"
        self.rt.log.line(self.sid, "disconnect", fields)

    async def _release_slots(self, limiter: RateLimiter, leases: tuple[SlotLease, ...]) -> None:
        error = await limiter.release(leases)
        if error is not None:
            self._store_failed("rate_limits", error)

    def abort(self, reason: str = "shutdown deadline") -> None:
        """Shutting down: tell the client and drop the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self._write(replies.SHUTTING_DOWN.with_id(self.sid).wire)
            self.transport.close()
        self._close_reason = reason
        self._lost = True
        self._wake()
