"""A real DNS server for tests: Debian's unbound on 127.0.0.1:<free port>, zones written per test.

`DnsServer` writes an unbound config into a test's directory and runs `unbound -d` on it: no
daemon, no chroot, no privilege drop, no root hints used and no query ever leaves the machine
(`local-zone: "." refuse` answers everything that is not ours, and every outgoing address is
blocked). What a test can ask for:

- records of any type unbound's `local-data` knows (A, AAAA, TXT, MX, PTR, TLSA, ...), with
  their TTLs, in static zones: a name without data is NXDOMAIN, a name with data of another
  type is NODATA, and negative answers carry a SOA whose minimum is `negative_ttl`. `test.` and
  `example.` are always zones; a record outside every zone gets a zone for its last two labels;
  `ptr()` makes the reverse name its own zone (so unbound's RFC 6303 defaults for documentation
  addresses do not hide it);
- `servfail_zone(name)`: answered SERVFAIL at once (forwarded to an address unbound may not
  query);
- `drop_zone(name)`: queries are dropped (`deny`): the client times out;
- `signed_zone(name, records)`: a DNSSEC-signed zone (ECDSA P-256, signed here with dnspython,
  the only use of dnspython in the test support) served by unbound's `auth-zone` and validated
  by its validator against a trust anchor we configure: answers carry the AD bit. With
  `bogus=True` the trust anchor is another key, so validation fails and the answer is SERVFAIL.
  Plain `local-data` is never validated: records added with `add()` come without AD;
- changing records: edit, then `reload()` (`unbound-control reload` over a unix control socket;
  returns once the new data is served), or `stop()` and `start()` (same port);
- `queries()`: unbound's own query counter (`unbound-control stats_noreset`), to prove that an
  answer came from a client's cache. The readiness probes count too: compare before and after.

`with DnsServer(tmp_path) as dns:` starts it (records added before `start()` are served from
the start); `dns.address` is `"127.0.0.1:PORT"`, the form `DnspythonResolver` takes.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from support.net import free_port

UNBOUND = "/usr/sbin/unbound"
UNBOUND_CONTROL = "/usr/sbin/unbound-control"
START_TIMEOUT = 10.0
GENERATION_NAME = "_generation.test."  # a TXT record whose value says which config is served


def unbound_available() -> bool:
    return os.access(UNBOUND, os.X_OK) and os.access(UNBOUND_CONTROL, os.X_OK)


@dataclass
class _SignedZone:
    name: str
    records: list[tuple[str, str, str, int]]
    bogus: bool
    trust_anchor: str = ""


@dataclass
class DnsServer:
    workdir: Path
    negative_ttl: int = 30
    zones: dict[str, str] = field(default_factory=dict)  # name -> unbound local-zone type
    records: list[tuple[str, int, str, str]] = field(default_factory=list)  # name ttl type rdata
    servfail: list[str] = field(default_factory=list)
    signed: list[_SignedZone] = field(default_factory=list)
    port: int = 0
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not unbound_available():
            raise RuntimeError("unbound is not installed: run scripts/install-deps.sh")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.zone("test.")
        self.zone("example.")

    # --- what is served ------------------------------------------------------------------------

    def zone(self, name: str, kind: str = "static") -> None:
        """Declare a local zone (unbound `local-zone` types: static, transparent, deny, ...)."""
        self.zones[_absolute(name)] = kind

    def add(self, name: str, rtype: str, rdata: str, ttl: int = 300) -> None:
        """One record in zone-file syntax, e.g. `add("a.test", "MX", "10 mx.a.test.")`."""
        owner = _absolute(name)
        text = f"{owner} {ttl} IN {rtype} {rdata}"
        if "'" in text or "\n" in text:
            raise ValueError(f"{text!r}: quotes and newlines cannot be written to unbound.conf")
        if not any(owner == z or owner.endswith("." + z) for z in self.zones if z != "."):
            labels = owner.rstrip(".").split(".")
            self.zone(".".join(labels[-2:]) + ".")
        self.records.append((owner, ttl, rtype.upper(), rdata))

    def txt(self, name: str, *strings: str, ttl: int = 300) -> None:
        """A TXT record of one or more character-strings (quoted here)."""
        quoted = " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in strings)
        self.add(name, "TXT", quoted, ttl)

    def ptr(self, ip: str, name: str, ttl: int = 300) -> None:
        """A PTR record for an address; the reverse name becomes a zone of its own."""
        reverse = ipaddress.ip_address(ip).reverse_pointer + "."
        self.zone(reverse)
        self.add(reverse, "PTR", _absolute(name), ttl)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Drop the records of a name (of one type, or all); `reload()` to serve the change."""
        owner = _absolute(name)
        self.records = [r for r in self.records if not (r[0] == owner and rtype in (None, r[2]))]

    def servfail_zone(self, name: str) -> None:
        """Every query at or below `name` is answered SERVFAIL at once."""
        self.zone(name, "transparent")
        self.servfail.append(_absolute(name))

    def drop_zone(self, name: str) -> None:
        """Every query at or below `name` is dropped without an answer: the client times out."""
        self.zone(name, "deny")

    def signed_zone(
        self, name: str, records: list[tuple[str, str, str]], *, ttl: int = 300, bogus: bool = False
    ) -> None:
        """A DNSSEC-signed zone: `records` are (relative name or "@", type, rdata)."""
        origin = _absolute(name)
        self.zone(origin, "transparent")  # not local data: resolved (from the auth-zone)
        self.signed.append(_SignedZone(origin, [(n, t, d, ttl) for n, t, d in records], bogus))

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "unbound.conf"

    def start(self) -> DnsServer:
        """Start unbound (on the same port again after a `stop()`); return once it answers."""
        for attempt in range(3):
            if not self.port or attempt:
                self.port = _free_udp_and_tcp_port()
            self._write()
            log = open(self.workdir / "unbound.log", "ab")  # noqa: SIM115 (the child owns it)
            try:
                self.proc = subprocess.Popen(
                    [UNBOUND, "-d", "-c", str(self.config_path)],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            finally:
                log.close()
            if self._wait_served():
                return self
            self.stop()
            if "address already in use" not in self.log().lower():
                break
        raise RuntimeError(f"unbound did not start; its log:\n{self.log()}")

    def reload(self) -> None:
        """Serve the current records: rewrite the config, `unbound-control reload`, wait."""
        self._write()
        self.control("reload")
        if not self._wait_served():
            raise RuntimeError(f"unbound did not come back after reload; its log:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        path = self.workdir / "unbound.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def control(self, *args: str) -> str:
        result = subprocess.run(
            [UNBOUND_CONTROL, "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"unbound-control {' '.join(args)}: {result.stderr or result.stdout}"
            )
        return result.stdout

    def queries(self) -> int:
        """Queries unbound has received since it started (reload resets it to 0)."""
        for line in self.control("stats_noreset").splitlines():
            key, _, value = line.partition("=")
            if key == "total.num.queries":
                return int(value)
        raise RuntimeError("unbound-control stats_noreset has no total.num.queries")

    # --- the config -------------------------------------------------------------------------

    def _write(self) -> None:
        self.generation += 1
        d = self.workdir
        lines = [
            "server:",
            f'  interface: "127.0.0.1@{self.port}"',
            "  do-daemonize: no",
            '  chroot: ""',
            '  username: ""',
            f'  directory: "{d}"',
            f'  pidfile: "{d}/unbound.pid"',
            "  use-syslog: no",
            '  logfile: ""',
            "  verbosity: 1",
            "  num-threads: 1",
            "  so-reuseport: no",
            "  do-ip6: no",
            "  outgoing-range: 32",
            "  num-queries-per-thread: 32",
            "  msg-cache-size: 1m",
            "  rrset-cache-size: 1m",
            "  key-cache-size: 1m",
            "  neg-cache-size: 1m",
            "  access-control: 127.0.0.0/8 allow",
            "  statistics-cumulative: no",
            "  extended-statistics: yes",
            # No query leaves this machine: nothing to iterate to, no address may be asked.
            '  local-zone: "." refuse',
            "  do-not-query-address: 0.0.0.0/0",
            "  do-not-query-address: ::/0",
            '  module-config: "validator iterator"',
            "  trust-anchor-signaling: no",
            "  root-key-sentinel: no",
        ]
        soa = f"1 3600 600 86400 {self.negative_ttl}"
        for name, kind in sorted(self.zones.items()):
            lines.append(f'  local-zone: "{name}" {kind}')
            if kind == "static":
                ttl = self.negative_ttl
                lines.append(
                    f"  local-data: '{name} {ttl} IN SOA ns.{name} hostmaster.{name} {soa}'"
                )
        lines.append(f"  local-data: '{GENERATION_NAME} 0 IN TXT \"{self.generation}\"'")
        for owner, ttl, rtype, rdata in self.records:
            lines.append(f"  local-data: '{owner} {ttl} IN {rtype} {rdata}'")
        for zone in self.signed:
            if not zone.trust_anchor:
                zone.trust_anchor = _sign(zone, d / f"{zone.name}zone", self.negative_ttl)
            lines.append(f'  trust-anchor: "{zone.trust_anchor}"')
        for zone in self.signed:
            lines += [
                "auth-zone:",
                f'  name: "{zone.name}"',
                f'  zonefile: "{d}/{zone.name}zone"',
                "  for-upstream: yes",
                "  for-downstream: no",
                "  fallback-enabled: no",
            ]
        for name in self.servfail:
            # do-not-query-localhost (on by default) forbids this address: SERVFAIL, no wait.
            lines += ["forward-zone:", f'  name: "{name}"', "  forward-addr: 127.0.0.1@9"]
        lines += [
            "remote-control:",
            "  control-enable: yes",
            f'  control-interface: "{d}/control.sock"',
            "  control-use-cert: no",
        ]
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.config_path)

    def _wait_served(self) -> bool:
        """True once unbound answers with this config's generation; False if it exited."""
        deadline = time.monotonic() + START_TIMEOUT
        want = str(self.generation).encode()
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if _query_txt(self.port, GENERATION_NAME) == [want]:
                return True
            time.sleep(0.01)
        return False


def _absolute(name: str) -> str:
    return name.lower().rstrip(".") + "."


def _free_udp_and_tcp_port() -> int:
    for _ in range(20):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both UDP and TCP")


def _query_txt(port: int, name: str, timeout: float = 0.2) -> list[bytes] | None:
    """A hand-made UDP query for TXT: the strings of the answer, or None (no/other answer).

    Independent of the resolver under test on purpose: the harness must not trust it.
    """
    qid = secrets.randbits(16)
    qname = b"".join(bytes([len(p)]) + p for p in name.encode().split(b".") if p) + b"\0"
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 16, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(packet, ("127.0.0.1", port))
            reply = sock.recv(4096)
        except OSError:  # refused (not listening yet) or timed out
            return None
    rid, flags, _qd, ancount, _ns, _ar = struct.unpack("!HHHHHH", reply[:12])
    if rid != qid or flags & 0x000F or ancount == 0:
        return None
    pos = 12 + len(qname) + 4
    strings: list[bytes] = []
    for _ in range(ancount):
        while reply[pos] and reply[pos] < 0xC0:  # skip the owner name
            pos += reply[pos] + 1
        pos += 2 if reply[pos] >= 0xC0 else 1
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", reply[pos : pos + 10])
        pos += 10
        rdata, pos = reply[pos : pos + rdlen], pos + rdlen
        while rtype == 16 and rdata:
            strings.append(rdata[1 : 1 + rdata[0]])
            rdata = rdata[1 + rdata[0] :]
    return strings


def _sign(zone: _SignedZone, path: Path, negative_ttl: int) -> str:
    """Write `zone` signed with a fresh key to `path`; return the trust anchor for unbound."""
    # Test support only: src/ keeps dnspython inside spamkiller/dns/dnspython.py.
    import dns.dnssec
    import dns.rdtypes.ANY.DNSKEY
    import dns.zone
    from cryptography.hazmat.primitives.asymmetric import ec
    from dns.dnssectypes import Algorithm

    text = [
        f"$ORIGIN {zone.name}",
        f"@ {negative_ttl} IN SOA ns hostmaster 1 3600 600 86400 {negative_ttl}",
        "@ 300 IN NS ns",
        "ns 300 IN A 192.0.2.53",
    ]
    text += [f"{name} {ttl} IN {rtype} {rdata}" for name, rtype, rdata, ttl in zone.records]
    parsed = dns.zone.from_text("\n".join(text) + "\n", origin=zone.name, relativize=False)

    def new_key() -> tuple[ec.EllipticCurvePrivateKey, dns.rdtypes.ANY.DNSKEY.DNSKEY]:
        private = ec.generate_private_key(ec.SECP256R1())
        public = dns.dnssec.make_dnskey(private.public_key(), Algorithm.ECDSAP256SHA256, flags=257)
        return private, public

    key = new_key()
    now = time.time()
    with parsed.writer() as txn:
        dns.dnssec.sign_zone(parsed, txn, keys=[key], inception=now - 3600, lifetime=7 * 86400)
    parsed.to_file(str(path), relativize=False)
    anchor = new_key()[1] if zone.bogus else key[1]
    return f"{zone.name} 300 IN DNSKEY {anchor.to_text()}"
