"""Connection checks on: msg/s and CPU per message with HELO, FCrDNS and DNSBL checks answered by
a local unbound, against the direct path and against spam-killer relaying without checks.

    python bench/checks.py [--quick] [--cells 's10-*'] [--with helo,fcrdns,dnsbl] [--pool 100]

Four paths are measured in the same run, round by round, for each cell (1, 10 or 50 sessions,
one message per connection or many), 5 KB messages:

- direct:      generator -> smtp-sink (no PROXY header: smtp-sink would take it for a command)
- relay-only:  generator -> spam-killer (PROXY listener, every check off) -> smtp-sink
- checks:      the same with the checks of --with on, DNS from unbound; the clients come from a
               pool of --pool addresses, so after the warm-up most lookups hit the resolver cache
- checks-cold: the same server config with `dns.cache_size: 0`: every lookup is a query to
               unbound, as if every connection came from a new address

The load generator is asyncio (uvloop if importable) in --procs processes; it reports its own CPU.
Every spam-killer connection starts with a PROXY v1 header naming a client from documentation
ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24), which the DNS checks do look up. The
address plan (`address_plan`) gives each address reverse and forward records and DNSBL entries
so that the lookups return a mix of answers and NXDOMAIN and a known 5 % of the 1/conn
transactions are rejected at RCPT; every rejection must be a planned one, and every accepted
message must reach smtp-sink, or the benchmark fails.

Every `enabled` switch of the server's config (read with `spam-killer config dump`) is off on
relay-only and on the checks paths except the --with features. Any switch can be named in --with
as it is (`--with greylist`: verdicts then unchecked); an entry in FEATURES (its overlay) and in
`planned_score` makes it a checked part of the run (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from common import (
    CLK_TCK,
    REPO_ROOT,
    BenchError,
    ManagedProcess,
    Sink,
    children_rusage_seconds,
    default_server_cmd,
    expand_target,
    finish_machine_info,
    fmt,
    free_port,
    machine_info,
    managed,
    median,
    run_dir,
    run_generators,
    run_main,
    self_rusage_seconds,
    server_config,
    split_evenly,
    table,
    tree_cpu_seconds,
    venv_python,
    wait_smtp_ready,
    write_config,
    write_results,
)

if TYPE_CHECKING:
    from support.dns_server import DnsServer

MESSAGE_SIZE = 5000
SENDER = b"sender@sender.test"
RECIPIENT = b"rcpt@bench.test"
SESSION_TIMEOUT = 30.0
MODES = ("1/conn", "many/conn")
SESSIONS = (1, 10, 50)
DEFAULT_CELLS = "s1-1per,s10-1per,s10-many,s50-1per"
PATHS = ("direct", "relay-only", "checks", "checks-cold")
WARM_SHARE = 0.99  # of the lookups answered without a query before the warm path is measured
WARM_ROUNDS = 12

# --- the address plan ------------------------------------------------------------------------
#
# Position i of the plan has the "kind" i % 20; any pool that is a multiple of 20 holds every
# kind in the same proportion. Scores with the weights below (reject at 15, tag at 5):
#   kinds 0-11  PTR -> name -> A = the address (confirmed); 0-2 also on the allow list (-3)
#   kinds 12-14 PTR -> name -> A = another address: FCRDNS_MISMATCH 1.5
#   kinds 15-16 PTR -> name without A (NXDOMAIN): FCRDNS_MISMATCH 1.5
#   kinds 17-19 no PTR (NXDOMAIN): RDNS_NONE 2
#   block list 127.0.0.2 (weight 14) on kinds 3 (14: tag), 13 (15.5: REJECT), 18 (+ allow list:
#   13, tag); kind 8 answers 127.0.0.3, which the zone's `match` does not count
#   kind 19 also says EHLO with a dynamic-looking name: HELO_DYNAMIC 1.5
# So 1 transaction in 20 is rejected at RCPT when FCrDNS and the DNSBL zones are both on.

KINDS = 20
BL_ZONE = "bl.lists.test"
WL_ZONE = "wl.lists.test"
BL_WEIGHT = 14.0
WL_WEIGHT = -3.0
WEIGHTS = {"RDNS_NONE": 2.0, "FCRDNS_MISMATCH": 1.5, "DNSBL_LISTED": 1.0, "DNSWL_LISTED": -1.0}
TAG_AT, REJECT_AT = 5.0, 15.0
ELSEWHERE = "192.0.2.251"  # the A record of the mismatching names: in no pool
RANGES = ("192.0.2", "198.51.100", "203.0.113")
HOSTS = range(1, 251)  # .251-.255 stay out of the pool
REVERSE_ZONES = [f"{'.'.join(reversed(r.split('.')))}.in-addr.arpa." for r in RANGES]
MAX_POOL = (len(RANGES) * len(HOSTS)) // KINDS * KINDS  # 740


@dataclass(frozen=True, slots=True)
class PlannedClient:
    ip: str
    kind: int
    helo: str
    ptr: str | None  # the reverse name, if any
    forward: str | None  # the A record of `ptr`, if any
    bl: str | None  # the block list's answer, if listed
    wl: bool  # on the allow list


def address_plan() -> list[PlannedClient]:
    """Every address of the documentation ranges, in a fixed shuffled order, with its records."""
    ips = [f"{r}.{h}" for r in RANGES for h in HOSTS]
    random.Random(5).shuffle(ips)  # mixes the ranges; the same order in every process
    plan: list[PlannedClient] = []
    for i, ip in enumerate(ips[:MAX_POOL]):
        kind = i % KINDS
        name = f"mail{i}.senders.test"
        ptr: str | None = name if kind < 17 else None
        forward = ip if kind < 12 else ELSEWHERE if kind < 15 else None
        helo = name if kind < 12 else "mail.senders.test"
        if kind == 19:
            helo = f"dsl-{ip.replace('.', '-')}.pool.senders.test"
        bl = "127.0.0.2" if kind in (3, 13, 18) else "127.0.0.3" if kind == 8 else None
        plan.append(PlannedClient(ip, kind, helo, ptr, forward, bl, kind in (0, 1, 2, 18)))
    return plan


def planned_score(client: PlannedClient, features: set[str]) -> float:
    """The score the DNS checks should give this client (HELO findings stay below the tag)."""
    score = 0.0
    if "fcrdns" in features:
        if client.ptr is None:
            score += WEIGHTS["RDNS_NONE"]
        elif client.forward != client.ip:
            score += WEIGHTS["FCRDNS_MISMATCH"]
    if "dnsbl" in features:
        if client.bl == "127.0.0.2":
            score += BL_WEIGHT * WEIGHTS["DNSBL_LISTED"]
        if client.wl:
            score += abs(WL_WEIGHT) * WEIGHTS["DNSWL_LISTED"]
    return score


def planned_lookups(client: PlannedClient, features: set[str]) -> int:
    """DNS lookups one connection from this client makes (before any cache)."""
    count = 0
    if "fcrdns" in features:
        count += 1 + (1 if client.ptr is not None else 0)  # PTR, then A of the name
    if "dnsbl" in features:
        count += 2  # one A query per zone
    return count


def serve_plan(dns: DnsServer, plan: list[PlannedClient]) -> None:
    """The plan's records on the test unbound (static zones: what is not there is NXDOMAIN)."""
    for zone in REVERSE_ZONES:
        dns.zone(zone)  # overrides unbound's empty RFC 6303 zones for these ranges
    for client in plan:
        reverse = ipaddress.ip_address(client.ip).reverse_pointer
        labels = reverse.removesuffix(".in-addr.arpa")
        if client.ptr is not None:
            dns.add(reverse, "PTR", client.ptr + ".")
            if client.forward is not None:
                dns.add(client.ptr, "A", client.forward)
        if client.bl is not None:
            dns.add(f"{labels}.{BL_ZONE}", "A", client.bl)
        if client.wl:
            dns.add(f"{labels}.{WL_ZONE}", "A", "127.0.0.2")


# --- the load generator (runs in child processes) ---------------------------------------------


def build_message(size: int = MESSAGE_SIZE) -> bytes:
    """Headers and 78-byte lines, `size` bytes in all, then the terminating dot."""
    head = (
        b"From: <sender@sender.test>\r\n"
        b"To: <rcpt@bench.test>\r\n"
        b"Subject: checks benchmark\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"\r\n"
    )
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"ABCD\r\n"
    body = line * ((size - len(head)) // len(line))
    filler = size - len(head) - len(body)
    if filler >= 3:
        body += b"z" * (filler - 2) + b"\r\n"
    return head + body + b".\r\n"


@dataclass
class GenStats:
    connections: list[int] = field(default_factory=lambda: [0] * KINDS)  # per kind
    accepted: list[int] = field(default_factory=lambda: [0] * KINDS)
    rejected: list[int] = field(default_factory=lambda: [0] * KINDS)
    deferred: int = 0
    errors: Counter[str] = field(default_factory=Counter)


# Client states: the reply each one waits for.
GREETING, EHLO, MAIL, RCPT, DATA, DOT, RSET, QUIT, CLOSING = range(9)
EXPECTED = {GREETING: b"220", DATA: b"354", QUIT: b"221"}  # 250 for the others


class SmtpClient(asyncio.Protocol):
    """One connection, driven from data_received: a callback per reply, no task per command.

    Like smtp-source: no pipelining, one command per round trip. After QUIT it waits for the
    server to close first, so TIME_WAIT stays on the server's side, not on our ephemeral ports.
    """

    def __init__(
        self,
        *,
        stats: GenStats,
        done: asyncio.Future[None],
        kind: int,
        proxy_line: bytes,
        helo: bytes,
        message: bytes,
        many: bool,
        deadline: float,
    ) -> None:
        self.stats = stats
        self.done = done
        self.kind = kind
        self.proxy_line = proxy_line
        self.helo = helo
        self.message = message
        self.many = many
        self.deadline = deadline
        self.state = GREETING
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.stats.connections[self.kind] += 1
        if self.proxy_line:
            self.transport.write(self.proxy_line)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end < 0:
                break
            line = buf[start:end]
            start = end + 2
            if line[3:4] != b"-":  # the last line of a (possibly multi-line) reply
                self._reply(line)
        self.buf = buf[start:]

    def _send(self, data: bytes, state: int) -> None:
        assert self.transport is not None
        self.state = state
        self.transport.write(data)

    def _reply(self, line: bytes) -> None:
        state, code = self.state, line[:3]
        if state == RCPT and code != b"250":
            if line[:1] == b"5":
                self.stats.rejected[self.kind] += 1
            elif line[:1] == b"4":
                self.stats.deferred += 1
            else:
                self._fail(line)
                return
            self._next(refused=True)
        elif code != EXPECTED.get(state, b"250"):
            self._fail(line)
        elif state == GREETING:
            self._send(b"EHLO " + self.helo + b"\r\n", EHLO)
        elif state in (EHLO, RSET):
            self._mail()
        elif state == MAIL:
            self._send(b"RCPT TO:<" + RECIPIENT + b">\r\n", RCPT)
        elif state == RCPT:
            self._send(b"DATA\r\n", DATA)
        elif state == DATA:
            self._send(self.message, DOT)
        elif state == DOT:
            self.stats.accepted[self.kind] += 1
            self._next(refused=False)
        elif state == QUIT:
            self.state = CLOSING  # the server closes; eof_received then closes our side

    def _mail(self) -> None:
        self._send(b"MAIL FROM:<" + SENDER + b">\r\n", MAIL)

    def _next(self, *, refused: bool) -> None:
        if self.many and time.perf_counter() < self.deadline:
            if refused:
                self._send(b"RSET\r\n", RSET)
            else:
                self._mail()
        else:
            self._send(b"QUIT\r\n", QUIT)

    def _fail(self, line: bytes) -> None:
        names = ("greeting", "EHLO", "MAIL", "RCPT", "DATA", "end of data", "RSET", "QUIT", "-")
        reply = line.decode(errors="replace")[:80]
        self.stats.errors[f"{names[self.state]}: {reply}"] += 1
        self.state = CLOSING
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != CLOSING:
            self.stats.errors[f"connection lost in state {self.state}: {exc}"[:120]] += 1
            self.state = CLOSING
        if not self.done.done():
            self.done.set_result(None)


@dataclass(frozen=True)
class GenJob:
    host: str
    port: int
    sessions: int
    many: bool
    duration: float
    start_at: float
    proxy: bool
    pool: int
    proc_index: int
    procs: int


def _factory(protocol: SmtpClient) -> Callable[[], SmtpClient]:
    return lambda: protocol


async def generate(job: GenJob) -> dict[str, Any]:
    """Run `job.sessions` session loops from wall-clock `start_at` for `duration` seconds."""
    loop = asyncio.get_running_loop()
    plan = address_plan()[: job.pool]
    # Per client: the PROXY line (source port varied per connection below) and the EHLO name.
    helos = [c.helo.encode() for c in plan]
    message = build_message()
    stats = GenStats()
    counter = 0
    await asyncio.sleep(max(0.0, job.start_at - time.time()))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + job.duration

    async def session_loop() -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            # The processes take interleaved addresses, so together they cycle the whole pool.
            index = (job.proc_index + counter * job.procs) % job.pool
            counter += 1
            client = plan[index]
            proxy_line = b""
            if job.proxy:
                sport = 1024 + counter % 60000
                proxy_line = f"PROXY TCP4 {client.ip} 192.0.2.25 {sport} 25\r\n".encode()
            done: asyncio.Future[None] = loop.create_future()
            protocol = SmtpClient(
                stats=stats,
                done=done,
                kind=client.kind,
                proxy_line=proxy_line,
                helo=helos[index],
                message=message,
                many=job.many,
                deadline=deadline,
            )
            try:
                limit = SESSION_TIMEOUT + (job.duration if job.many else 0.0)
                async with asyncio.timeout(limit):
                    await loop.create_connection(_factory(protocol), job.host, job.port)
                    await done
            except (OSError, TimeoutError) as exc:
                stats.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                if protocol.transport is not None:
                    protocol.transport.abort()
                await asyncio.sleep(0.01)  # do not spin on a refusing server

    await asyncio.gather(*(session_loop() for _ in range(job.sessions)))
    return {
        "connections": stats.connections,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "deferred": stats.deferred,
        "errors": dict(stats.errors),
        "elapsed": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
    }


def child_main(args: argparse.Namespace) -> int:
    """Hidden mode: one generator process; prints its result as JSON on stdout."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    host, _, port = args.generate.rpartition(":")
    job = GenJob(
        host=host,
        port=int(port),
        sessions=args.gen_sessions,
        many=args.gen_many,
        duration=args.duration,
        start_at=args.start_at,
        proxy=args.gen_proxy,
        pool=args.pool,
        proc_index=args.gen_index,
        procs=args.gen_procs,
    )
    print(json.dumps(asyncio.run(generate(job))))
    return 0


# --- server configurations --------------------------------------------------------------------


@dataclass(frozen=True)
class SetupContext:
    """What a feature's overlay may need to know about the run."""

    dns_address: str
    data_dir: Path


def _no_overlay(ctx: SetupContext) -> dict[str, Any]:
    return {}


def _dnsbl_overlay(ctx: SetupContext) -> dict[str, Any]:
    zones = [
        {"zone": BL_ZONE, "weight": BL_WEIGHT, "match": ["127.0.0.2/32"]},
        {"zone": WL_ZONE, "weight": WL_WEIGHT},
    ]
    return {"checks": {"dnsbl": {"zones": zones}}}


@dataclass(frozen=True)
class Feature:
    """Something --with switches on for the checks paths."""

    switch: str  # dotted path of its `enabled` key in the server's config
    overlay: Callable[[SetupContext], dict[str, Any]] = _no_overlay  # settings besides `enabled`
    planned: bool = True  # planned_score and planned_lookups know what it does


# Every section of the server's config with an `enabled` switch (as `config dump` shows them) is
# off on the relay-only and checks paths; --with turns features on for the checks paths. A switch
# not listed here can be named as it is (`--with greylist`, `--with pass_cache`) and runs with
# its defaults plus --set, unplanned: then only "nothing lost" is checked, not the verdicts.
# Giving such a feature an entry (its overlay, e.g. a `state` URL under ctx.data_dir) and teaching
# planned_score what it does makes its verdicts checked too.
FEATURES: dict[str, Feature] = {
    "helo": Feature("checks.helo"),
    "fcrdns": Feature("checks.fcrdns"),
    "dnsbl": Feature("checks.dnsbl", _dnsbl_overlay),
}
COLD_OVERLAY: dict[str, Any] = {"dns": {"cache_size": 0}}
# The switches of the server at the last commit before this script, if `config dump` fails.
FALLBACK_SWITCHES = {"checks.helo": True, "checks.dnsbl": True, "checks.fcrdns": False}


def server_switches() -> dict[str, bool]:
    """Every `enabled` switch of the server's config (dotted path -> default), from
    `spam-killer config dump` run with the same interpreter and PYTHONPATH as the servers."""
    cmd = [*default_server_cmd(), "config", "dump"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    try:
        import yaml

        data = yaml.safe_load(out.stdout) if out.returncode == 0 else None
    except (ImportError, yaml.YAMLError):
        data = None
    if not isinstance(data, dict):
        print(f"`{' '.join(cmd)}` failed; assuming the switches {sorted(FALLBACK_SWITCHES)}")
        return dict(FALLBACK_SWITCHES)
    switches: dict[str, bool] = {}

    def walk(node: object, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            if path and isinstance(node.get("enabled"), bool):
                switches[".".join(path)] = node["enabled"]
            for key, value in node.items():
                walk(value, (*path, str(key)))

    walk(data, ())
    switches.pop("dev_upstream", None)  # server_config() turns it off: not a check
    return switches


def resolve_features(names: list[str], switches: dict[str, bool]) -> dict[str, Feature]:
    """--with names as Features; a name that is no FEATURES entry must be a server switch."""
    chosen: dict[str, Feature] = {}
    for name in names:
        feature = FEATURES.get(name) or (Feature(name, planned=False) if name in switches else None)
        if feature is None or feature.switch not in switches:
            known = sorted({*FEATURES, *switches})
            raise BenchError(f"--with {name}: this server has no such switch; known: {known}")
        chosen[name] = feature
    return chosen


def nested(path: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b"."""
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return dict(out)


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` on top: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set a.b.c=VALUE (VALUE as JSON if it parses, else a string) as one nested overlay."""
    overlay: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--set {item!r}: expected KEY.PATH=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overlay = merge(overlay, nested(key, value))
    return overlay


def relay_only_config(
    base: dict[str, Any], ctx: SetupContext, switches: dict[str, bool]
) -> dict[str, Any]:
    """A PROXY listener and every switch off; DNS and the policy as the checks paths have them."""
    listener = {**base["listeners"][0], "proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]}
    config = merge(
        base,
        {
            "listeners": [listener],
            "dns": {"nameservers": [ctx.dns_address], "timeout": "2s"},
            # Pinned so that the planned verdicts hold whatever the defaults become.
            "policy": {"weights": WEIGHTS, "thresholds": {"tag": TAG_AT, "reject": REJECT_AT}},
        },
    )
    for path in switches:
        config = merge(config, nested(f"{path}.enabled", False))
    return config


def checks_config(
    relay_only: dict[str, Any],
    ctx: SetupContext,
    features: dict[str, Feature],
    extra: dict[str, Any],
) -> dict[str, Any]:
    config = relay_only
    for feature in features.values():
        config = merge(config, nested(f"{feature.switch}.enabled", True))
        config = merge(config, feature.overlay(ctx))
    return merge(config, extra)


# --- orchestration ------------------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from the first line of /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


@dataclass(frozen=True)
class Cell:
    sessions: int
    mode: str

    @property
    def name(self) -> str:
        return f"s{self.sessions}-{'1per' if self.mode == '1/conn' else 'many'}"

    @property
    def label(self) -> str:
        return f"5KB s={self.sessions} {self.mode}"


@dataclass
class Route:
    name: str
    port: int
    sink: Sink
    server: ManagedProcess | None
    proxy: bool
    features: set[str]  # the --with names on this path (for the plan's expectations)
    planned: bool = True  # the plan knows every feature on it: verdicts are checked


@dataclass
class RunResult:
    accepted: int
    rejected: int
    deferred: int
    connections: int
    errors: dict[str, int]
    elapsed: float
    gen_cpu_s: float
    gen_procs: int
    server_cpu_s: float | None
    unbound_cpu_s: float | None
    dns_queries: int | None  # queries unbound received during the run
    planned_lookups: int  # lookups the connections' checks make before any cache
    other_cpu_s: float  # CPU of every process on the machine that is not part of this run
    steal_s: float  # CPU time the hypervisor gave to other guests

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed

    @property
    def transactions(self) -> int:
        """MAIL...RCPT attempts that got an answer: accepted, rejected or deferred."""
        return max(1, self.accepted + self.rejected + self.deferred)

    def per_msg_ms(self, seconds: float | None) -> float | None:
        return None if seconds is None or not self.accepted else 1000.0 * seconds / self.accepted

    @property
    def gen_cores(self) -> float:
        return self.gen_cpu_s / self.elapsed

    @property
    def other_cores(self) -> float:
        return self.other_cpu_s / self.elapsed

    @property
    def queries_per_conn(self) -> float | None:
        if self.dns_queries is None or not self.connections:
            return None
        return self.dns_queries / self.connections

    @property
    def no_query_share(self) -> float | None:
        """Lookups answered without a query to unbound (the resolver's cache, or a query
        already in flight for the same name)."""
        if self.dns_queries is None or not self.planned_lookups:
            return None
        return max(0.0, 1.0 - self.dns_queries / self.planned_lookups)


@dataclass(frozen=True)
class LoadSettings:
    procs: int
    pool: int


def load(
    route: Route,
    cell: Cell,
    duration: float,
    settings: LoadSettings,
    dns: DnsServer | None,
) -> RunResult:
    """One run along `route`: spawn the generators, collect, account CPU, DNS and delivery."""
    procs = min(settings.procs, cell.sessions)
    shares = split_evenly(cell.sessions, procs)
    start_at = time.time() + 0.3 + 0.1 * procs  # time for the interpreters to start
    sink_before = route.sink.messages()
    server_cpu0 = route.server.cpu_seconds() if route.server is not None else None
    counting_dns = dns is not None and bool(route.features)
    unbound_pid = dns.proc.pid if dns is not None and dns.proc is not None else None
    unbound_cpu0 = tree_cpu_seconds(unbound_pid) if counting_dns and unbound_pid else None
    queries0 = dns.queries() if counting_dns and dns is not None else None
    sink_cpu0 = route.sink.cpu_seconds()
    own0 = children_rusage_seconds() + self_rusage_seconds()  # generators (reaped), this script
    busy0, steal0 = machine_cpu()
    commands = [
        [
            venv_python(),
            __file__,
            "--generate",
            f"127.0.0.1:{route.port}",
            "--gen-sessions",
            str(share),
            *(["--gen-many"] if cell.mode == "many/conn" else []),
            *(["--gen-proxy"] if route.proxy else []),
            "--gen-index",
            str(i),
            "--gen-procs",
            str(procs),
            "--pool",
            str(settings.pool),
            "--duration",
            str(duration),
            "--start-at",
            repr(start_at),
        ]
        for i, share in enumerate(shares)
    ]
    outputs = run_generators(commands, timeout=2 * duration + SESSION_TIMEOUT + 30)
    busy1, steal1 = machine_cpu()
    own = children_rusage_seconds() + self_rusage_seconds() - own0
    own += route.sink.cpu_seconds() - sink_cpu0
    server_cpu = None
    if route.server is not None and server_cpu0 is not None:
        route.server.check_alive()
        server_cpu = route.server.cpu_seconds() - server_cpu0
    unbound_cpu = None
    if unbound_cpu0 is not None and unbound_pid is not None:
        unbound_cpu = tree_cpu_seconds(unbound_pid) - unbound_cpu0
    queries = dns.queries() - queries0 if queries0 is not None and dns is not None else None
    # Whatever else ran (other users' tests, say) is what the same-run rounds cannot cancel out.
    other = busy1 - busy0 - own - (server_cpu or 0.0) - (unbound_cpu or 0.0)

    def per_kind(key: str) -> list[int]:
        return [sum(o[key][k] for o in outputs) for k in range(KINDS)]

    connections, accepted, rejected = (per_kind(k) for k in ("connections", "accepted", "rejected"))
    errors: Counter[str] = Counter()
    for o in outputs:
        errors.update(o["errors"])
    where = f"{route.name} {cell.label}"
    if errors:
        sample = "; ".join(f"{k} (x{v})" for k, v in errors.most_common(3))
        raise BenchError(f"{where}: {sum(errors.values())} failed session(s): {sample}")
    deferred = sum(o["deferred"] for o in outputs)
    if route.planned:
        if deferred:
            raise BenchError(
                f"{where}: {deferred} transaction(s) answered 4xx at RCPT, the plan has none: "
                "a check the script does not know about is on (see the path's config)"
            )
        check_verdicts(where, route.features, settings.pool, accepted, rejected)
    total = sum(accepted)
    received = route.sink.wait_messages(sink_before + total) - sink_before
    if received != total:
        raise BenchError(
            f"{where}: the clients saw {total} messages accepted, smtp-sink received {received}"
            + (": mail went missing" if received < total else "")
        )
    plan = address_plan()
    return RunResult(
        accepted=total,
        rejected=sum(rejected),
        deferred=deferred,
        connections=sum(connections),
        errors=dict(errors),
        elapsed=max(o["elapsed"] for o in outputs),  # all processes started at start_at
        gen_cpu_s=sum(o["cpu_s"] for o in outputs),
        gen_procs=procs,
        server_cpu_s=server_cpu,
        unbound_cpu_s=unbound_cpu,
        dns_queries=queries,
        planned_lookups=sum(
            connections[k] * planned_lookups(plan[k], route.features) for k in range(KINDS)
        ),
        other_cpu_s=max(0.0, other),
        steal_s=steal1 - steal0,
    )


def warm_up(
    route: Route, cell: Cell, duration: float, settings: LoadSettings, dns: DnsServer
) -> None:
    """An unrecorded run; on the warm checks path, repeated until the resolver caches answer
    WARM_SHARE of the lookups (each worker fills its own cache, and a connection lands on
    either worker, so one pass over the pool is not enough)."""
    for _ in range(WARM_ROUNDS if route.name == "checks" else 1):
        run = load(route, cell, duration, settings, dns)
        if route.name != "checks" or (run.no_query_share or 0.0) >= WARM_SHARE:
            return
    print(
        f"  {route.name} {cell.label}: after {WARM_ROUNDS} warm-up runs the caches still "
        f"sent {100 * (1 - (run.no_query_share or 0.0)):.1f} % of the lookups to unbound"
    )


def check_verdicts(
    where: str, features: set[str], pool: int, accepted: list[int], rejected: list[int]
) -> None:
    """Rejected exactly the kinds the plan scores at or above the reject threshold: proof that
    the checks ran on the PROXY-given addresses and got the planned DNS answers."""
    plan = address_plan()
    for kind in range(min(KINDS, pool)):
        should_reject = planned_score(plan[kind], features) >= REJECT_AT
        wrong = accepted[kind] if should_reject else rejected[kind]
        if wrong:
            raise BenchError(
                f"{where}: {wrong} transaction(s) from clients of kind {kind} were "
                f"{'accepted' if should_reject else 'rejected'}, the plan says "
                f"{'reject' if should_reject else 'accept'} (score "
                f"{planned_score(plan[kind], features):g}); see address_plan()"
            )


def summarize(cell: Cell, runs: dict[str, list[RunResult]]) -> dict[str, Any]:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return median(present) if present else None

    rows: dict[str, Any] = {}
    for name, results in runs.items():
        rates = [r.rate for r in results]
        rows[name] = {
            "msg_per_s": median(rates),
            "spread": (max(rates) - min(rates)) / median(rates) if len(rates) > 1 else None,
            "server_cpu_ms_per_msg": med([r.per_msg_ms(r.server_cpu_s) for r in results]),
            "unbound_cpu_ms_per_msg": med([r.per_msg_ms(r.unbound_cpu_s) for r in results]),
            "dns_queries_per_conn": med([r.queries_per_conn for r in results]),
            "no_query_share": med([r.no_query_share for r in results]),
            "rejected_share": median([r.rejected / r.transactions for r in results]),
            "deferred_share": median([r.deferred / r.transactions for r in results]),
            "generator_cores": median([r.gen_cores for r in results]),
            "other_cores_max": max(r.other_cores for r in results),
            "generator_cpu_ms_per_msg": med([r.per_msg_ms(r.gen_cpu_s) for r in results]),
            "runs": [
                {
                    "accepted": r.accepted,
                    "rejected": r.rejected,
                    "deferred": r.deferred,
                    "connections": r.connections,
                    "elapsed_s": round(r.elapsed, 4),
                    "msg_per_s": round(r.rate, 1),
                    "server_cpu_s": r.server_cpu_s,
                    "unbound_cpu_s": r.unbound_cpu_s,
                    "dns_queries": r.dns_queries,
                    "planned_lookups": r.planned_lookups,
                    "generator_cpu_s": round(r.gen_cpu_s, 4),
                    "generator_procs": r.gen_procs,
                    "other_cpu_s": round(r.other_cpu_s, 3),
                    "steal_s": round(r.steal_s, 3),
                }
                for r in results
            ],
        }
    direct = rows.get("direct", {}).get("msg_per_s")
    relay = rows.get("relay-only", {}).get("msg_per_s")
    relay_cpu = rows.get("relay-only", {}).get("server_cpu_ms_per_msg")
    for row in rows.values():
        row["x_direct"] = row["msg_per_s"] / direct if direct else None
        row["x_relay_only"] = row["msg_per_s"] / relay if relay else None
        cpu = row["server_cpu_ms_per_msg"]
        row["cpu_over_relay_only_ms"] = (
            cpu - relay_cpu if cpu is not None and relay_cpu is not None else None
        )
    return {"cell": cell.name, "sessions": cell.sessions, "mode": cell.mode, "paths": rows}


def print_table(cells: list[dict[str, Any]]) -> None:
    headers = [
        "cell",
        "path",
        "msg/s",
        "x direct",
        "x relay-only",
        "SK CPU ms/msg",
        "+ms vs relay-only",
        "unbound ms/msg",
        "DNS q/conn",
        "no-query",
        "rejected",
        "gen cores",
        "other (max)",
        "spread",
    ]

    def pct(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{100 * value:.{digits}f}%"

    lines = []
    for cell in cells:
        label = f"5KB s={cell['sessions']} {cell['mode']}"
        for name, row in cell["paths"].items():
            lines.append(
                [
                    label,
                    name,
                    fmt(row["msg_per_s"]),
                    fmt(row["x_direct"], 3),
                    fmt(row["x_relay_only"], 3),
                    fmt(row["server_cpu_ms_per_msg"], 3),
                    fmt(row["cpu_over_relay_only_ms"], 3) if name.startswith("checks") else "-",
                    fmt(row["unbound_cpu_ms_per_msg"], 3),
                    fmt(row["dns_queries_per_conn"], 2),
                    pct(row["no_query_share"], 1),
                    pct(row["rejected_share"], 1)
                    + (f" +{pct(row['deferred_share'], 1)} 4xx" if row["deferred_share"] else ""),
                    fmt(row["generator_cores"], 2),
                    fmt(row["other_cores_max"], 2),
                    pct(row["spread"]),
                ]
            )
            label = ""
    print(table(headers, lines))


def select_cells(patterns: str) -> list[Cell]:
    cells = [Cell(s, m) for s in SESSIONS for m in MODES]
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [c for c in cells if any(fnmatch.fnmatch(c.name, p) for p in wanted)]
    if not chosen:
        names = ", ".join(c.name for c in cells)
        raise BenchError(f"--cells {patterns!r} matches no cell; cells are: {names}")
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="msg/s and CPU with the connection checks on, against direct and relay-only."
    )
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s per cell and path")
    parser.add_argument(
        "--cells",
        default=DEFAULT_CELLS,
        help=f"comma-separated globs over s1-1per, s10-many, s50-1per, ... ({DEFAULT_CELLS})",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated subset of {', '.join(PATHS)} (all)",
    )
    parser.add_argument(
        "--with",
        dest="features",
        default=",".join(FEATURES),
        help=f"checks on the checks paths: {', '.join(FEATURES)} (all of them), or any "
        "`enabled` switch of the server's config, e.g. greylist (unplanned: verdicts unchecked)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="extra config for the checks paths, e.g. dns.timeout=1s (repeatable; JSON values)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=100,
        help=f"client addresses the generator cycles through (multiple of {KINDS}, at most "
        f"{MAX_POOL}; 100)",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per cell and path (3)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (3)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds (1)")
    parser.add_argument("--workers", type=int, default=2, help="spam-killer workers (2)")
    parser.add_argument("--procs", type=int, default=2, help="generator processes (2)")
    parser.add_argument(
        "--target",
        metavar="CMD",
        help="server command instead of `spam-killer run -c {config}`; placeholders {config} "
        "{port} {upstream_port} {workers} {data_dir} {python} {repo}",
    )
    # Hidden: the generator child process.
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--gen-sessions", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--gen-many", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gen-proxy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gen-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--gen-procs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 1.0 if args.quick else 3.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if min(args.runs, args.workers, args.procs) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--runs, --workers and --procs must be >= 1, --duration > 0")
    if args.pool % KINDS or not KINDS <= args.pool <= MAX_POOL:
        parser.error(f"--pool must be a multiple of {KINDS} between {KINDS} and {MAX_POOL}")
    args.features = [f.strip() for f in args.features.split(",") if f.strip()]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not args.paths or any(p not in PATHS for p in args.paths):
        parser.error(f"--paths: a comma-separated subset of {', '.join(PATHS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate:
        return child_main(args)
    cells = select_cells(args.cells)
    machine = machine_info()
    print(
        f"machine: {machine['cpu_model']}, {os.cpu_count()} cpus, "
        f"load {machine['loadavg_at_start']}"
    )
    workdir = run_dir("checks")
    # unbound's control socket lives here: a short path (unix sockets allow ~107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    try:
        return _run(args, cells, workdir, tmp, machine)
    finally:
        for name in ("unbound.conf", "unbound.log"):
            if (tmp / "unbound" / name).exists():
                shutil.copy(tmp / "unbound" / name, workdir / name)
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    cells: list[Cell],
    workdir: Path,
    tmp: Path,
    machine: dict[str, Any],
) -> int:
    sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tests' unbound harness
    from support.dns_server import DnsServer, unbound_available

    if not unbound_available():
        raise BenchError("unbound not found: run scripts/install-deps.sh first")
    plan = address_plan()
    dns = DnsServer(tmp / "unbound", negative_ttl=300)  # warm: nothing expires during a run
    serve_plan(dns, plan)

    sinks = {name: Sink(free_port(), workdir / f"smtp-sink-{name}.log") for name in args.paths}
    servers: dict[str, ManagedProcess] = {}
    ports: dict[str, int] = {}
    configs: dict[str, Path] = {}
    switches = server_switches()
    switches_text = ", ".join(f"{k}{'' if v else ' (off by default)'}" for k, v in switches.items())
    features = resolve_features(args.features, switches)
    planned = all(f.planned for f in features.values())
    extra = parse_set(args.overrides)
    server_cmds: dict[str, list[str]] = {}
    with dns:
        ctx = SetupContext(dns_address=dns.address, data_dir=tmp)
        for name in args.paths:
            if name == "direct":
                continue
            port = free_port()
            data_dir = tmp / f"data-{name}"
            data_dir.mkdir()
            base = server_config(
                port=port, upstream_port=sinks[name].port, workers=args.workers, data_dir=data_dir
            )
            config = relay_only_config(base, ctx, switches)
            if name == "checks":
                config = checks_config(config, ctx, features, extra)
            elif name == "checks-cold":
                config = checks_config(config, ctx, features, merge(extra, COLD_OVERLAY))
            configs[name] = write_config(workdir / f"spam-killer-{name}.yaml", config)
            values: dict[str, str | int] = {
                "config": str(configs[name]),
                "port": port,
                "upstream_port": sinks[name].port,
                "workers": args.workers,
                "data_dir": str(data_dir),
                "python": venv_python(),
                "repo": str(REPO_ROOT),
            }
            if args.target:
                cmd = expand_target(args.target, values)
            else:
                cmd = [*default_server_cmd(), "run", "-c", str(configs[name])]
            server_cmds[name] = cmd
            servers[name] = ManagedProcess(name, cmd, workdir / f"spam-killer-{name}.log")
            ports[name] = port

        print(
            f"checks benchmark: {len(cells)} cell(s) x {len(args.paths)} paths, {args.runs} run(s) "
            f"of {args.duration:g} s after {args.warmup:g} s of warm-up; spam-killer workers "
            f"{args.workers}; --with {','.join(args.features)}; client pool {args.pool}; "
            f"generator processes {args.procs}"
        )
        if server_cmds:
            print(f"server: {' '.join(next(iter(server_cmds.values())))}")
        print(f"unbound on {dns.address}; logs and configs: {workdir}")
        print(
            f"switched off on relay-only (and on the checks paths unless --with): {switches_text}"
        )
        if not planned:
            print("verdicts not checked: a --with feature has no plan (nothing lost still is)")

        procs: list[ManagedProcess] = [*sinks.values(), *servers.values()]
        routes = [
            Route(
                name=name,
                port=ports.get(name, sinks[name].port),
                sink=sinks[name],
                server=servers.get(name),
                proxy=name != "direct",
                features=set(features) if name.startswith("checks") else set(),
                planned=planned or not name.startswith("checks"),
            )
            for name in args.paths
        ]
        load_settings = LoadSettings(procs=args.procs, pool=args.pool)
        results: list[dict[str, Any]] = []
        with managed(*procs):
            for proc in procs:
                proc.start()
            for sink in sinks.values():
                wait_smtp_ready("127.0.0.1", sink.port, sink)
            for name, server in servers.items():
                # No client address in the probe's header: no check looks anything up for it.
                took = wait_smtp_ready(
                    "127.0.0.1", ports[name], server, send_first=b"PROXY UNKNOWN\r\n"
                )
                print(f"{name} answered 220 after {took:.2f} s")
            for cell in cells:
                for route in routes:
                    warm_up(route, cell, args.warmup, load_settings, dns)
                runs: dict[str, list[RunResult]] = {r.name: [] for r in routes}
                for i in range(args.runs):
                    for route in routes:
                        run = load(route, cell, args.duration, load_settings, dns)
                        runs[route.name].append(run)
                        print(
                            f"  {cell.label:18} run {i + 1}/{args.runs} {route.name:11} "
                            f"{run.rate:8,.0f} msg/s  SK {fmt(run.per_msg_ms(run.server_cpu_s), 3)}"
                            f" ms/msg  unbound {fmt(run.per_msg_ms(run.unbound_cpu_s), 3)} ms/msg"
                            f"  DNS q/conn {fmt(run.queries_per_conn, 2)}  rejected "
                            f"{run.rejected}  generator {run.gen_cores:.2f} cores  other "
                            f"{run.other_cores:.2f} cores",
                            flush=True,
                        )
                results.append(summarize(cell, runs))
        for proc in procs:
            print(f"  {proc.name} stopped with status {proc.proc.returncode if proc.proc else '-'}")

    print()
    print(
        f"median of {args.runs} run(s) of {args.duration:g} s; msg/s = messages accepted and "
        "received by smtp-sink; CPU per accepted message; other = cores used by processes "
        "outside the run; spread = (max - min) / median"
    )
    print_table(results)
    warn_generator(results, args.procs)
    path = write_results(
        "checks",
        {
            "machine": finish_machine_info(machine),
            "settings": {
                "workers": args.workers,
                "runs": args.runs,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "features": args.features,
                "server_switches": switches,
                "verdicts_checked": planned,
                "overrides": extra,
                "pool": args.pool,
                "generator_procs": args.procs,
                "message_bytes": MESSAGE_SIZE,
                "server_cmds": server_cmds,
                "configs": {name: str(p) for name, p in configs.items()},
            },
            "results": results,
            "logs": str(workdir),
        },
    )
    print(f"results: {path}")
    return 0


def warn_generator(results: list[dict[str, Any]], procs: int) -> None:
    """Say so when a generator process came near a full core: it may have capped the rate."""
    for cell in results:
        used = min(procs, cell["sessions"])
        for name, row in cell["paths"].items():
            per_proc = row["generator_cores"] / used
            if per_proc > 0.85:
                print(
                    f"WARNING: {cell['cell']} {name}: the generator used {per_proc:.2f} of a core "
                    "per process: it may have capped the rate",
                    file=sys.stderr,
                )


if __name__ == "__main__":
    run_main(main)
