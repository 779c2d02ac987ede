"""The composition root: the only place concrete implementations are chosen; start, reload, stop.

- `build_runtime(config)` turns a validated config into what sessions use (TLS contexts, the
  upstream, limits). It raises ConfigError for unusable files, so a reload can refuse a bad config
  and keep the old runtime.
- `Worker` serves every listener in one event loop. SIGHUP reloads config and certificates
  (sessions in progress keep the runtime they began with); SIGTERM stops accepting new sessions
  (they get 421), lets the others finish for `shutdown_timeout`, then answers 421 and closes.
- `run()` starts `workers` processes sharing each port with SO_REUSEPORT, or serves in-process when
  there is one; the parent forwards signals and restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from spamkiller.checks.base import Check
from spamkiller.checks.dnsbl import DnsblCheck, Zone
from spamkiller.checks.fcrdns import FcrdnsCheck
from spamkiller.checks.greylist import Greylister, GreylistSettings
from spamkiller.checks.helo import HeloCheck
from spamkiller.checks.pipeline import CheckSettings, Pipeline
from spamkiller.checks.policy import Thresholds
from spamkiller.checks.ratelimit import RateLimiter, RateSettings
from spamkiller.checks.recipients import RecipientDirectory
from spamkiller.config import Config, known_recipients, listener_tls, load
from spamkiller.dns.resolver import Resolver
from spamkiller.errors import ConfigError
from spamkiller.observability.logging import EventLog
from spamkiller.relay.upstream import Upstream, UpstreamTarget
from spamkiller.server.connection import Gate, InboundConnection, ListenerPolicy, Runtime
from spamkiller.server.devupstream import DevUpstream
from spamkiller.smtp.limits import Limits
from spamkiller.store import Store, StoreError, open_store
from spamkiller.tls.certs import LoadedPair, load_pairs, make_self_signed
from spamkiller.tls.contexts import client_context

_S = TypeVar("_S")


def self_signed_paths(config: Config) -> tuple[Path, Path]:
    base = config.data_dir / "tls"
    return base / "selfsigned.pem", base / "selfsigned.key"


def certificate_pairs(config: Config, *, create: bool) -> list[tuple[Path, Path]]:
    """The configured pairs, or the self-signed one (made on first run when `create`)."""
    if config.tls.certificates:
        return [(p.cert, p.key) for p in config.tls.certificates]
    if all(listener.tls == "none" for listener in config.listeners):
        return []
    cert, key = self_signed_paths(config)
    if create and not (cert.exists() and key.exists()):
        make_self_signed(cert, key, config.hostname)
    return [(cert, key)]


def build_runtime(
    config: Config, log: EventLog, *, create_cert: bool = False, store: Store | None = None
) -> Runtime:
    """Everything sessions need; ConfigError if a certificate, key, CA or recipient file is
    unusable."""
    pairs: list[LoadedPair] = []
    files = certificate_pairs(config, create=create_cert)
    if files:
        prefix = "tls.certificates" if config.tls.certificates else "tls (self-signed)"
        pairs = load_pairs(files, key_path_prefix=prefix)
    policies: dict[str, ListenerPolicy] = {}
    for index, listener in enumerate(config.listeners):
        server_tls = None if listener.tls == "none" else listener_tls(config, index, pairs)
        policies[listener.name] = ListenerPolicy(
            name=listener.name,
            tls=listener.tls,
            require_tls=listener.require_tls,
            server_tls=server_tls,
            greet_delay=listener.greet_delay,
            proxy_protocol=listener.proxy_protocol,
            trusted_proxies=tuple(
                ipaddress.ip_network(n, strict=False) for n in listener.trusted_proxies
            ),
        )
    up = config.upstream
    upstream_ctx = None
    if up.use_tls:
        upstream_ctx = client_context(
            verify=up.verify_cert,
            ca_file=up.ca_file,
            client_cert=up.client_cert,
            client_key=up.client_key,
            min_version=config.tls.min_version,
        )
    lim = config.limits
    limits = Limits(
        max_command_length=lim.max_command_length,
        max_line_length=lim.max_line_length,
        max_recipients=lim.max_recipients,
        max_message_size=lim.max_message_size,
        max_bad_commands=lim.max_bad_commands,
    )
    target = UpstreamTarget(
        hosts=up.targets,
        port=up.port,
        use_tls=up.use_tls,
        tls_context=upstream_ctx,
        server_name=up.server_name,
        connect_timeout=up.connect_timeout,
        timeout=up.timeout,
        data_timeout=up.data_timeout,
        helo=config.hostname,
    )
    known, problems = known_recipients(config)
    if problems:
        raise ConfigError(problems)
    return Runtime(
        hostname=config.hostname,
        domains=frozenset(config.domains),
        limits=limits,
        command_timeout=lim.command_timeout,
        data_timeout=lim.data_timeout,
        min_data_rate=lim.min_data_rate,
        handshake_timeout=config.tls.handshake_timeout,
        listeners=policies,
        upstream=Upstream(target, limits),
        log=log,
        pipeline=build_pipeline(config),
        weights=dict(config.policy.weights),
        thresholds=Thresholds(
            tag=config.policy.thresholds.tag, reject=config.policy.thresholds.reject
        ),
        **_stateful(config, store),
        recipients=RecipientDirectory(
            known,
            delimiter=config.recipients.delimiter,
            max_unknown=config.recipients.max_unknown,
        ),
    )


def needs_store(config: Config) -> bool:
    return config.rate_limits.enabled or config.greylist.enabled or config.pass_cache.enabled


def _networks(values: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in values)


def _settings(cls: type[_S], section: object, **converted: Any) -> _S:
    """A checks settings dataclass from the config section of the same field names."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values = {name: getattr(section, name) for name in names if name not in converted}
    return cls(**values, **converted)


def _stateful(config: Config, store: Store | None) -> dict[str, Any]:
    """The Runtime fields that need the store (all off without one) and the tarpit."""
    fields: dict[str, Any] = {}
    tarpit = config.tarpit
    if tarpit.enabled:
        fields.update(tarpit_score=tarpit.min_score, tarpit_delay=tarpit.delay)
    if store is None:
        return fields
    fields.update(store=store, store_timeout=config.state_timeout)
    rl = config.rate_limits
    if rl.enabled:
        limits = _settings(RateSettings, rl, exempt=_networks(rl.exempt))
        fields["rate_limiter"] = RateLimiter(store, limits)
    grey = config.greylist
    if grey.enabled:
        settings = _settings(GreylistSettings, grey, exempt=_networks(grey.exempt))
        fields["greylister"] = Greylister(store, settings)
        # The TLS history feeds the greylist's TLS auto-pass; kept as long as greylist records.
        fields["tls_history_expire"] = grey.expire
    if config.pass_cache.enabled:
        fields["pass_cache_ttl"] = config.pass_cache.ttl
    return fields


async def open_state(config: Config) -> Store:
    """The worker's store; ConfigError naming `state` when SQLite cannot be opened."""
    url = config.state_url
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return await open_store(url, timeout=config.state_timeout)
    except (StoreError, OSError, ValueError) as exc:
        raise ConfigError([f"state: cannot open {_safe_url(url)}: {exc}"]) from None


def _safe_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        creds, _, host = rest.partition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else f"{scheme}{sep}{user}@{host}"
    return url


def build_pipeline(config: Config) -> Pipeline:
    """The enabled checks with their settings: the one place check classes are chosen."""
    checks: list[tuple[Check, CheckSettings]] = []
    helo = config.checks.helo
    if helo.enabled:
        checks.append((HeloCheck(), CheckSettings(timeout=helo.timeout, on_error=helo.on_error)))
    resolver: Resolver | None = None
    fcrdns = config.checks.fcrdns
    if fcrdns.enabled:
        resolver = build_resolver(config)
        settings = CheckSettings(timeout=fcrdns.timeout, on_error=fcrdns.on_error)
        checks.append((FcrdnsCheck(resolver), settings))
    dnsbl = config.checks.dnsbl
    if dnsbl.enabled and dnsbl.zones:
        zones = [
            Zone(
                zone=z.zone,
                weight=z.weight,
                match=tuple(ipaddress.IPv4Network(m, strict=False) for m in z.match),
            )
            for z in dnsbl.zones
        ]
        settings = CheckSettings(timeout=dnsbl.timeout, on_error=dnsbl.on_error)
        checks.append((DnsblCheck(resolver or build_resolver(config), zones), settings))
    return Pipeline(checks)


def build_resolver(config: Config) -> Resolver:
    """One resolver per worker, of the configured ``dns.backend``; the DNS library is only
    imported when a DNS check is on."""
    dns = config.dns
    if dns.backend == "dnspython":
        from spamkiller.dns.dnspython import DnspythonResolver

        return DnspythonResolver(
            dns.nameservers or None, timeout=dns.timeout, cache_size=dns.cache_size
        )
    from spamkiller.dns.cares import CaresResolver

    return CaresResolver(dns.nameservers or None, timeout=dns.timeout, cache_size=dns.cache_size)


def _listener_set(config: Config) -> set[tuple[str, str, int]]:
    return {(lst.name, lst.address, lst.port) for lst in config.listeners}


class Worker:
    """Serves every listener of the config in the running event loop until SIGTERM."""

    def __init__(
        self,
        config_path: Path | None,
        config: Config,
        log: EventLog,
        *,
        reuse_port: bool,
        dev: bool,
        create_cert: bool = False,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.log = log
        self._create_cert = create_cert
        self.store: Store | None = None  # opened in start(): in the process that uses it
        self.runtime: Runtime  # built in start(), once the store is open
        self.reuse_port = reuse_port
        self.run_dev_upstream = dev and config.dev_upstream.enabled
        self.gate = Gate(
            max_connections=config.limits.max_connections,
            max_per_ip=config.limits.max_connections_per_ip,
            max_message_memory=config.limits.max_message_memory,
        )
        self._servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()
        self._dev: DevUpstream | None = None
        self._background: set[asyncio.Task[None]] = set()

    def _current(self) -> Runtime:
        return self.runtime

    async def _open(self) -> None:
        """Open the store (after the fork) and build the first runtime; ConfigError if either
        cannot be done."""
        if needs_store(self.config):
            self.store = await open_state(self.config)
            self.log.line("-", "store", {"state": _safe_url(self.config.state_url)})
        try:
            self.runtime = build_runtime(
                self.config, self.log, create_cert=self._create_cert, store=self.store
            )
        except ConfigError:
            await self._close_store()
            raise

    async def _close_store(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.gate.background:  # sessions' last store writes (slots, history)
            await asyncio.gather(*self.gate.background, return_exceptions=True)
        if self.store is not None:
            store, self.store = self.store, None
            with contextlib.suppress(StoreError):
                await store.close()

    def _factory(self, name: str) -> Callable[[], InboundConnection]:
        def make() -> InboundConnection:
            return InboundConnection(name, self._current, self.gate)

        return make

    async def start(self, *, signals: bool = True) -> None:
        """Open the store, bind every listener (and the dev upstream); `signals=False` for an
        embedded worker. ConfigError if the state or a file is unusable."""
        loop = asyncio.get_running_loop()
        await self._open()
        if self.run_dev_upstream:
            dev = self.config.dev_upstream
            self._dev = DevUpstream(self.config.dev_maildir)
            await self._dev.start(dev.address, dev.port)
            self.log.line(
                "-",
                "dev-upstream",
                {"listen": f"{dev.address}:{dev.port}", "maildir": self.config.dev_maildir},
            )
        for listener in self.config.listeners:
            factory = self._factory(listener.name)
            server = await loop.create_server(
                factory,
                listener.address,
                listener.port,
                reuse_port=self.reuse_port or None,
                backlog=1024,
            )
            self._servers.append(server)
            self.log.line(
                "-",
                "listen",
                {
                    "listener": listener.name,
                    "address": f"{listener.address}:{listener.port}",
                    "tls": listener.tls,
                    "require_tls": listener.require_tls,
                },
            )
        if signals:
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self.reload)

    def stop(self) -> None:
        """Begin the same shutdown SIGTERM begins."""
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read config and certificates; a bad new config is refused, the old kept."""
        try:
            config = load(self.config_path)
            runtime = build_runtime(config, self.log, store=self.store)
            if needs_store(config) and self.store is None:
                raise ConfigError(["state: a store is needed now; restart to open it"])
        except ConfigError as exc:
            self.log.line("-", "reload", {"status": "refused", "problems": "; ".join(exc.problems)})
            return
        if _listener_set(config) != _listener_set(self.config):
            self.log.line(
                "-", "reload", {"note": "listener address changes take effect after a restart"}
            )
        if config.state_url != self.config.state_url:
            self.log.line("-", "reload", {"note": "a new state URL takes effect after a restart"})
        self.config = config
        old, self.runtime = self.runtime, runtime
        task = asyncio.get_running_loop().create_task(old.upstream.close_idle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self.gate.max_connections = config.limits.max_connections
        self.gate.max_per_ip = config.limits.max_connections_per_ip
        self.gate.max_message_memory = config.limits.max_message_memory
        self.log.line("-", "reload", {"status": "ok"})

    async def serve_until_stopped(self, *, parent: int | None = None) -> None:
        """Serve until stopped; a forked worker also stops if its supervisor `parent` is gone."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
            if parent is not None and os.getppid() != parent:
                self.log.line("-", "worker", {"status": "supervisor gone, stopping"})
                break
        await self.drain()

    async def drain(self) -> None:
        """Turn new sessions away with 421, let the others finish, then cut what is left."""
        gate = self.gate
        gate.draining = True
        for pending in list(gate.awaiting_proxy):  # nothing begun yet: 421 at once
            pending.abort("shutdown before the PROXY header")
        self.log.line(
            "-",
            "shutdown",
            {"sessions": len(gate.sessions), "timeout": self.config.shutdown_timeout},
        )
        deadline = time.monotonic() + self.config.shutdown_timeout
        while gate.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(gate.sessions):
            session.abort()
        for server in self._servers:
            server.close()
        await self.runtime.upstream.close_idle()
        await asyncio.sleep(0)
        if self._dev is not None:
            await self._dev.stop()
        await self._close_store()
        self.log.line("-", "stopped", {})
        self.log.flush()  # nothing waits for the batch timer once the worker stops


async def _probe_state(config: Config) -> None:
    store = await open_state(config)
    await store.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(
    config_path: Path | None,
    config: Config,
    *,
    reuse_port: bool,
    dev: bool,
    parent: int | None = None,
) -> int:
    log = EventLog(fmt=config.log.format)
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(config_path, config, log, reuse_port=reuse_port, dev=dev)
    try:
        loop.run_until_complete(worker.start())
        loop.run_until_complete(worker.serve_until_stopped(parent=parent))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"spam-killer: cannot listen: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        log.flush()  # lines still waiting for their shared write
    return 0


def run(config_path: Path | None) -> int:
    """`spam-killer run`: exit 0 on a clean stop, 1 on bad config or a port that cannot be bound."""
    try:
        config = load(config_path)
        # Validate (and on first run create the self-signed certificate and the SQLite file)
        # before forking, so a problem is one clear message and not one per worker.
        build_runtime(config, EventLog(fmt=config.log.format), create_cert=True)
        if needs_store(config) and config.state_url.startswith("sqlite:///"):
            asyncio.run(_probe_state(config))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    if config.workers == 1:
        return _serve(config_path, config, reuse_port=False, dev=True)
    return _supervise(config_path, config)


def _supervise(config_path: Path | None, config: Config) -> int:
    """Fork `workers` processes sharing ports; the parent forwards signals, runs dev upstream."""
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    supervisor = os.getpid()
    early_deaths = 0

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = _serve(config_path, config, reuse_port=True, dev=False, parent=supervisor)
            finally:
                os._exit(code)
        children[pid] = (slot, time.monotonic())

    for slot in range(config.workers):
        spawn(slot)
    # The stock loop: uvloop keeps SIGCHLD to itself, and the parent is not on the hot path.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    log = EventLog(fmt=config.log.format)
    stopping = asyncio.Event()
    failed = False

    def forward(sig: signal.Signals) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap() -> None:
        nonlocal early_deaths, failed
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            slot, started = children.pop(pid, (-1, 0.0))
            if slot < 0 or stopping.is_set():
                continue
            code = os.waitstatus_to_exitcode(status)
            early_deaths += time.monotonic() - started < 5
            if early_deaths > 3:  # a worker that cannot start will not start by retrying
                log.line("-", "worker", {"pid": pid, "status": code, "action": "giving up"})
                failed = True
                forward(signal.SIGTERM)
                return
            log.line("-", "worker", {"pid": pid, "status": code, "action": "restart"})
            spawn(slot)

    async def main() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, forward, sig)
        dev: DevUpstream | None = None
        if config.dev_upstream.enabled:
            dev = DevUpstream(config.dev_maildir)
            await dev.start(config.dev_upstream.address, config.dev_upstream.port)
        log.line("-", "workers", {"count": config.workers, "pids": ",".join(map(str, children))})
        while not stopping.is_set():
            reap()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)
        while children:
            reap()
            await asyncio.sleep(0.05)
        if dev is not None:
            await dev.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        log.flush()
    return 1 if failed else 0
