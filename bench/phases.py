"""Where a session's server CPU goes: the floor, the lean relay and spam-killer, phase by phase.

bench/starttls.py gives one figure per server for a whole STARTTLS session. This splits it. One
client (this process, blocking sockets, never measured) runs sessions one at a time, taking the
servers in turn, in four shapes:

    plain            EHLO, QUIT
    plain + mail     EHLO, MAIL, RCPT, DATA with a 5 KB message, QUIT
    starttls         EHLO, STARTTLS, EHLO, QUIT (TLS 1.3, RSA-2048)
    starttls + mail  the whole session of bench/starttls.py

and reports each server's CPU per session: the run time of its process tree's threads, from
/proc schedstat, in nanoseconds. The differences between the shapes are the cost of a session's
setup, of one relayed transaction, and of TLS. With one session at a time nothing is batched, so
the figures are higher than under load; the differences between servers are what this is for.

    python bench/phases.py [--sessions 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

from common import (
    ManagedProcess,
    Sink,
    default_server_cmd,
    fmt,
    free_port,
    make_rsa_cert,
    managed,
    run_dir,
    run_main,
    server_config,
    table,
    tree_runtime_seconds,
    wait_smtp_ready,
    write_config,
    write_results,
)
from starttls import build_message, client_context, reference_server

SHAPES = (  # name, STARTTLS, a message
    ("plain", False, False),
    ("plain + mail", False, True),
    ("starttls", True, False),
    ("starttls + mail", True, True),
)


class Client:
    """One SMTP session over a blocking socket; raises on any unexpected reply."""

    def __init__(self, port: int, tls: ssl.SSLContext) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.tls = tls
        self.buf = b""

    def expect(self, code: bytes) -> None:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed while waiting for {code!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                break
        if not line.startswith(code):
            raise ConnectionError(f"expected {code!r}, got {line[:80]!r}")

    def command(self, data: bytes, code: bytes) -> None:
        self.sock.sendall(data)
        self.expect(code)

    def session(self, *, starttls: bool, message: bytes | None) -> None:
        self.expect(b"220")
        self.command(b"EHLO client.bench.test\r\n", b"250")
        if starttls:
            self.command(b"STARTTLS\r\n", b"220")
            self.sock = self.tls.wrap_socket(self.sock, server_hostname="mx.bench.test")
            self.command(b"EHLO client.bench.test\r\n", b"250")
        if message is not None:
            self.command(b"MAIL FROM:<sender@sender.test>\r\n", b"250")
            self.command(b"RCPT TO:<rcpt@bench.test>\r\n", b"250")
            self.command(b"DATA\r\n", b"354")
            self.command(message + b".\r\n", b"250")
        self.command(b"QUIT\r\n", b"221")
        self.sock.close()


def measure(
    servers: list[tuple[str, int, ManagedProcess]], sessions: int, rounds: int
) -> dict[str, dict[str, float]]:
    """shape -> server -> CPU ms per session. Every round runs every shape on every server, so
    a slow spell of the machine falls on all of them, not on one shape."""
    tls = client_context()
    message = build_message()
    per_round = max(1, sessions // rounds)

    def run(port: int, count: int, starttls: bool, mail: bool) -> None:
        for _ in range(count):
            Client(port, tls).session(starttls=starttls, message=message if mail else None)

    for _shape, starttls, mail in SHAPES:  # warm-up, not counted
        for _name, port, _proc in servers:
            run(port, 20, starttls, mail)
    cpu = {shape: {name: 0.0 for name, _, _ in servers} for shape, _, _ in SHAPES}
    for i in range(rounds):
        for shape, starttls, mail in SHAPES:
            for name, port, proc in servers:
                cpu[shape][name] += timed(proc, run, port, per_round, starttls, mail)
        print(f"  round {i + 1}/{rounds}", flush=True)
    count = per_round * rounds
    return {
        shape: {name: 1000.0 * spent / count for name, spent in row.items()}
        for shape, row in cpu.items()
    }


def timed(proc: ManagedProcess, work: Callable[..., None], *args: object) -> float:
    """CPU seconds `proc`'s process tree spent while `work(*args)` ran."""
    before = tree_runtime_seconds(proc.pid)
    work(*args)
    proc.check_alive()
    return tree_runtime_seconds(proc.pid) - before


def report(figures: dict[str, dict[str, float]], names: list[str]) -> None:
    rows = [[shape, *(fmt(figures[shape][n], 3) for n in names)] for shape in figures]
    parts = (
        ("setup: plain", lambda f: f["plain"]),
        ("one transaction", lambda f: f["plain + mail"] - f["plain"]),
        ("TLS: starttls - plain", lambda f: f["starttls"] - f["plain"]),
    )
    columns = {n: {shape: figures[shape][n] for shape in figures} for n in names}
    for label, part in parts:
        rows.append([label, *(fmt(part(columns[n]), 3) for n in names)])
    print(table(["server CPU ms/session", *names], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2000, help="per shape and server")
    parser.add_argument("--rounds", type=int, default=5, help="turns the servers take")
    args = parser.parse_args(argv)
    workdir = run_dir("phases")
    with tempfile.TemporaryDirectory(prefix="bench-phases-") as tmp:
        cert_key = make_rsa_cert(Path(tmp))
        floor_port, lean_port, sk_port = free_port(), free_port(), free_port()
        lean_sink, sink = (
            Sink(free_port(), workdir / "lean-sink.log"),
            Sink(free_port(), workdir / "sink.log"),
        )
        common = {"workers": 1, "tls_cert": cert_key, "loop": "auto", "workdir": workdir}
        floor = reference_server("floor", "floor.py", floor_port, **common)
        upstream = f"127.0.0.1:{lean_sink.port}"
        lean = reference_server(
            "lean relay", "lean_relay.py", lean_port, "--upstream", upstream, **common
        )
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        config = server_config(
            port=sk_port, upstream_port=sink.port, workers=1, data_dir=data_dir, tls_cert=cert_key
        )
        sk_cmd = [
            *default_server_cmd(),
            "run",
            "-c",
            str(write_config(workdir / "sk.yaml", config)),
        ]
        sk = ManagedProcess("spam-killer", sk_cmd, workdir / "spam-killer.log")
        servers = [
            ("floor", floor_port, floor),
            ("lean relay", lean_port, lean),
            ("spam-killer", sk_port, sk),
        ]
        print(f"{args.sessions} sessions per shape and server, one at a time; logs: {workdir}")
        with managed(floor, lean_sink, lean, sink, sk):
            for proc in (floor, lean_sink, lean, sink, sk):
                proc.start()
            for port, proc in ((lean_sink.port, lean_sink), (sink.port, sink)):
                wait_smtp_ready("127.0.0.1", port, proc)
            for _name, port, proc in servers:
                wait_smtp_ready("127.0.0.1", port, proc)
            figures = measure(servers, args.sessions, args.rounds)
    names = [name for name, _, _ in servers]
    print()
    report(figures, names)
    path = write_results("phases", {"sessions": args.sessions, "figures": figures})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
