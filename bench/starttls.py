"""STARTTLS session rate: spam-killer (relaying to smtp-sink) against the floor, in one run.

Every session is a new TCP connection: EHLO, STARTTLS, a full TLS 1.3 handshake (RSA-2048
certificate, client verifies nothing), EHLO, MAIL, RCPT, DATA with a 5 KB message, QUIT. A fixed
number of concurrent client loops (default 10) repeat sessions for a fixed time.

    python bench/starttls.py [--quick] [--workers 2] [--concurrency 10] [--duration 3]
    python bench/starttls.py --target-only 127.0.0.1:2525 [--server-pid PID]

Reports sessions/s, failed sessions, the generator's own CPU (so it visibly is not the
bottleneck) and the server's CPU per session (its process tree, from /proc), median of 5 runs
per server, and spam-killer's ratio to the floor: the ratio of the medians, and the median of
the round-by-round ratios (each run over the floor's run of the same round; the order of the
servers rotates from round to round). For spam-killer, every message the client saw
accepted must have reached smtp-sink.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import ssl
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    BenchError,
    ManagedProcess,
    Sink,
    default_server_cmd,
    expand_target,
    finish_machine_info,
    fmt,
    free_port,
    machine_info,
    make_rsa_cert,
    managed,
    median,
    run_dir,
    run_generators,
    run_main,
    server_config,
    split_evenly,
    table,
    tree_cpu_seconds,
    venv_python,
    wait_smtp_ready,
    write_config,
    write_results,
)

MESSAGE_SIZE = 5000
SESSION_TIMEOUT = 30.0
SENDER = b"sender@sender.test"
RECIPIENT = b"rcpt@bench.test"


# --- the load generator (runs in one or more child processes) ---------------------------------


class SmtpReplyError(Exception):
    pass


def build_message(size: int = MESSAGE_SIZE) -> bytes:
    """Headers and a body of 76-character lines, `size` bytes in all, without the final dot."""
    head = (
        b"From: <sender@sender.test>\r\n"
        b"To: <rcpt@bench.test>\r\n"
        b"Subject: starttls benchmark\r\n"
        b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
    )
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"ABCD\r\n"  # 78 bytes with CRLF
    body = bytearray()
    while len(head) + len(body) + len(line) <= size:
        body += line
    filler = size - len(head) - len(body)
    if filler >= 3:
        body += b"z" * (filler - 2) + b"\r\n"
    return head + bytes(body)


# The last line of a reply: three digits, then a space (or nothing) before the line end.
_LAST_LINE = re.compile(rb"^(\d{3})(?: [^\n]*)?\r?\n", re.MULTILINE)


class Replies:
    """Reads replies off one connection, a whole reply per match rather than a line per call:
    an EHLO reply of eight lines should cost the generator no more than one of four, or the
    server with more extensions would pay for the generator's Python on the shared cores."""

    __slots__ = ("buf", "reader")

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = b""

    async def expect(self, code: bytes, what: str) -> None:
        """Wait for the next complete reply and check its code."""
        while (last := _LAST_LINE.search(self.buf)) is None:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise SmtpReplyError(f"{what}: connection closed")
            self.buf += chunk
        self.buf = self.buf[last.end() :]
        if last.group(1) != code:
            text = last.group(0).decode(errors="replace").strip()
            raise SmtpReplyError(f"{what}: {text}")


async def one_session(
    host: str, port: int, ctx: ssl.SSLContext, message: bytes, pipeline: bool
) -> bool:
    """One full session; True once the message was accepted (250 after DATA)."""
    reader, writer = await asyncio.open_connection(host, port)
    replies = Replies(reader)
    delivered = False
    try:
        await replies.expect(b"220", "greeting")
        writer.write(b"EHLO gen.bench.test\r\n")
        await replies.expect(b"250", "EHLO")
        writer.write(b"STARTTLS\r\n")
        await replies.expect(b"220", "STARTTLS")
        await writer.start_tls(ctx, server_hostname="mx.bench.test")
        writer.write(b"EHLO gen.bench.test\r\n")
        await replies.expect(b"250", "EHLO after TLS")
        mail = b"MAIL FROM:<" + SENDER + b">\r\n"
        rcpt = b"RCPT TO:<" + RECIPIENT + b">\r\n"
        if pipeline:
            writer.write(mail + rcpt + b"DATA\r\n")
            await replies.expect(b"250", "MAIL")
            await replies.expect(b"250", "RCPT")
            await replies.expect(b"354", "DATA")
        else:
            writer.write(mail)
            await replies.expect(b"250", "MAIL")
            writer.write(rcpt)
            await replies.expect(b"250", "RCPT")
            writer.write(b"DATA\r\n")
            await replies.expect(b"354", "DATA")
        writer.write(message + b".\r\n")
        await replies.expect(b"250", "end of data")
        delivered = True
        writer.write(b"QUIT\r\n")
        await replies.expect(b"221", "QUIT")
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5.0)
    return delivered


@dataclass
class GenResult:
    sessions: int = 0
    delivered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    cpu_s: float = 0.0


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def generate(
    host: str, port: int, *, concurrency: int, duration: float, start_at: float, pipeline: bool
) -> GenResult:
    """Run `concurrency` session loops from wall-clock `start_at` for `duration` seconds."""
    ctx = client_context()
    message = build_message()
    result = GenResult()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def loop_sessions() -> None:
        while time.perf_counter() < deadline:
            try:
                async with asyncio.timeout(SESSION_TIMEOUT):
                    ok = await one_session(host, port, ctx, message, pipeline)
            except (OSError, ssl.SSLError, SmtpReplyError, TimeoutError) as exc:
                result.errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                await asyncio.sleep(0.01)  # do not spin on a refusing server
                continue
            result.sessions += 1
            result.delivered += ok

    await asyncio.gather(*(loop_sessions() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - t0
    result.cpu_s = time.process_time() - cpu0
    return result


def child_main(args: argparse.Namespace) -> int:
    """Hidden mode: one generator process; prints its result as JSON on stdout."""
    host, _, port = args.generate.rpartition(":")
    if args.loop != "asyncio":
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            if args.loop == "uvloop":
                raise SystemExit("--loop uvloop but uvloop is not importable") from None
    res = asyncio.run(
        generate(
            host,
            int(port),
            concurrency=args.concurrency,
            duration=args.duration,
            start_at=args.start_at,
            pipeline=args.pipeline,
        )
    )
    out = {
        "sessions": res.sessions,
        "delivered": res.delivered,
        "errors": dict(res.errors),
        "elapsed": res.elapsed,
        "cpu_s": res.cpu_s,
    }
    print(json.dumps(out))
    return 0


# --- orchestration -----------------------------------------------------------------------------


@dataclass
class RunResult:
    sessions: int
    delivered: int
    errors: dict[str, int]
    elapsed: float
    rate: float
    gen_cpu_s: float
    gen_procs: int
    server_cpu_s: float | None
    sink_received: int | None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def server_ms_per_session(self) -> float | None:
        if self.server_cpu_s is None or not self.sessions:
            return None
        return 1000.0 * self.server_cpu_s / self.sessions

    @property
    def gen_core_share(self) -> float:
        """Generator CPU as a fraction of one core (summed over its processes)."""
        return self.gen_cpu_s / self.elapsed if self.elapsed else float("nan")


@dataclass(frozen=True)
class LoadOptions:
    concurrency: int
    duration: float
    procs: int
    loop: str
    pipeline: bool


def load(
    address: str,
    opts: LoadOptions,
    *,
    server: ManagedProcess | None = None,
    server_pid: int | None = None,
    sink: Sink | None = None,
) -> RunResult:
    """One measured run: spawn the generator processes, collect, account CPU and delivery."""
    concurrency, duration = opts.concurrency, opts.duration
    procs = min(opts.procs, concurrency)
    shares = split_evenly(concurrency, procs)
    start_at = time.time() + 0.4 + 0.1 * procs  # time for the interpreters to start
    pid = server.pid if server is not None else server_pid
    sink_before = sink.messages() if sink is not None else 0
    cpu_before = _tree_cpu(pid)
    commands = [
        [
            venv_python(),
            __file__,
            "--generate",
            address,
            "--concurrency",
            str(share),
            "--duration",
            str(duration),
            "--start-at",
            repr(start_at),
            "--loop",
            opts.loop,
            *(["--pipeline"] if opts.pipeline else []),
        ]
        for share in shares
    ]
    outputs = run_generators(commands, timeout=duration + SESSION_TIMEOUT + 30)
    cpu_after = _tree_cpu(pid)
    if server is not None:
        server.check_alive()
    sessions = sum(o["sessions"] for o in outputs)
    delivered = sum(o["delivered"] for o in outputs)
    errors: Counter[str] = Counter()
    for o in outputs:
        errors.update(o["errors"])
    # Each process timed its own window from the same start instant.
    elapsed = max(o["elapsed"] for o in outputs)
    sink_received = None
    if sink is not None:
        sink_received = sink.wait_messages(sink_before + delivered) - sink_before
        if sink_received < delivered:
            raise BenchError(
                f"messages went missing: the client saw {delivered} accepted, "
                f"smtp-sink received {sink_received}"
            )
    if sessions == 0:
        sample = "; ".join(f"{k} (x{v})" for k, v in errors.most_common(3))
        raise BenchError(f"no session completed against {address}: {sample or 'no error seen'}")
    return RunResult(
        sessions=sessions,
        delivered=delivered,
        errors=dict(errors),
        elapsed=elapsed,
        rate=sessions / elapsed,
        gen_cpu_s=sum(o["cpu_s"] for o in outputs),
        gen_procs=len(outputs),
        server_cpu_s=(
            cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
        ),
        sink_received=sink_received,
    )


def _tree_cpu(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return tree_cpu_seconds(pid)
    except OSError:
        return None


def summarize(name: str, runs: list[RunResult]) -> dict[str, Any]:
    server_ms = [r.server_ms_per_session for r in runs if r.server_ms_per_session is not None]
    return {
        "server": name,
        "sessions_per_s": median([r.rate for r in runs]),
        "server_cpu_ms_per_session": median(server_ms) if server_ms else None,
        "generator_core_share": median([r.gen_core_share for r in runs]),
        "generator_cpu_ms_per_session": median(
            [1000.0 * r.gen_cpu_s / r.sessions for r in runs if r.sessions]
        ),
        "failed_sessions": sum(r.error_count for r in runs),
        "sessions": sum(r.sessions for r in runs),
        "runs": [
            {
                "sessions": r.sessions,
                "delivered": r.delivered,
                "sink_received": r.sink_received,
                "elapsed_s": round(r.elapsed, 4),
                "sessions_per_s": round(r.rate, 1),
                "server_cpu_s": r.server_cpu_s,
                "generator_cpu_s": round(r.gen_cpu_s, 4),
                "generator_procs": r.gen_procs,
                "errors": r.errors,
            }
            for r in runs
        ],
    }


def add_paired_ratios(rows: list[dict[str, Any]], results: dict[str, list[RunResult]]) -> None:
    """Each round's rate over the floor's in the same round, and their median.

    The machine's speed drifts within a minute; the floor and a server measured in the same round
    saw nearly the same machine, so their ratio cancels most of that drift.
    """
    floor_runs = results["floor"]
    for row in rows:
        ratios = [
            run.rate / floor.rate
            for run, floor in zip(results[row["server"]], floor_runs, strict=True)
            if floor.rate
        ]
        row["paired_ratios"] = [round(r, 4) for r in ratios]
        row["paired_ratio"] = median(ratios) if ratios else None


def print_table(rows: list[dict[str, Any]], floor_rate: float | None) -> None:
    headers = [
        "server",
        "sessions/s",
        "x floor",
        "x floor, by round",
        "server CPU ms/session",
        "generator CPU (cores)",
        "failed",
    ]
    lines = []
    for row in rows:
        ratio = row["sessions_per_s"] / floor_rate if floor_rate else None
        lines.append(
            [
                row["server"],
                fmt(row["sessions_per_s"]),
                fmt(ratio, 2),
                fmt(row.get("paired_ratio"), 2),
                fmt(row["server_cpu_ms_per_session"], 2),
                fmt(row["generator_core_share"], 2),
                str(row["failed_sessions"]),
            ]
        )
    print(table(headers, lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="STARTTLS sessions/s: spam-killer relaying vs the bare floor server."
    )
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s per server")
    parser.add_argument("--workers", type=int, default=2, help="spam-killer workers (default 2)")
    parser.add_argument(
        "--floor-workers", type=int, default=None, help="floor processes (default: --workers)"
    )
    parser.add_argument("--floor-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent sessions")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (3)")
    parser.add_argument("--runs", type=int, default=None, help="runs per server (5)")
    parser.add_argument(
        "--procs", type=int, default=2, help="generator processes sharing --concurrency (2)"
    )
    parser.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="generator loop"
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="send MAIL, RCPT and DATA in one write"
    )
    parser.add_argument(
        "--target",
        metavar="CMD",
        help="server command instead of spam-killer; placeholders {config} {port} {cert} {key} "
        "{workers} {upstream_port} {data_dir} {python} {repo}",
    )
    parser.add_argument(
        "--target-only", metavar="HOST:PORT", help="only load this running server (no floor)"
    )
    parser.add_argument("--server-pid", type=int, help="with --target-only: account its CPU")
    parser.add_argument(
        "--lean",
        action="store_true",
        help="also measure bench/lean_relay.py (the floor plus a bare relay) with --workers",
    )
    parser.add_argument("--skip-floor", action="store_true", help="do not run the floor")
    parser.add_argument("--floor-only", action="store_true", help="run the floor only")
    # Hidden: the generator child process.
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 1.0 if args.quick else 3.0
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.skip_floor and args.floor_only:
        parser.error("--skip-floor and --floor-only exclude each other")
    if args.floor_workers is None:
        args.floor_workers = args.workers
    if min(args.workers, args.floor_workers, args.concurrency, args.procs, args.runs) < 1:
        parser.error("--workers, --floor-workers, --concurrency, --procs and --runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate:
        return child_main(args)

    opts = LoadOptions(args.concurrency, args.duration, args.procs, args.loop, args.pipeline)
    settings: dict[str, Any] = {
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "runs": args.runs,
        "generator_procs": args.procs,
        "generator_loop": args.loop,
        "pipeline": args.pipeline,
        "message_bytes": MESSAGE_SIZE,
        "tls": "TLSv1.3, RSA-2048 self-signed, no client verification",
    }
    machine = machine_info()
    print(
        f"machine: {machine['cpu_model']}, {os.cpu_count()} cpus, "
        f"load {machine['loadavg_at_start']}"
    )

    if args.target_only:
        print(f"loading {args.target_only}: {args.runs} run(s) x {args.duration:g} s")
        load(args.target_only, replace(opts, duration=0.5), server_pid=args.server_pid)
        runs = [load(args.target_only, opts, server_pid=args.server_pid) for _ in range(args.runs)]
        row = summarize(args.target_only, runs)
        print()
        print_table([row], None)
        warn_generator([row], args.procs)
        path = write_results(
            "starttls",
            {"machine": finish_machine_info(machine), "settings": settings, "results": [row]},
        )
        print(f"results: {path}")
        return 1 if row["failed_sessions"] else 0

    with tempfile.TemporaryDirectory(prefix="bench-starttls-") as tmp:
        return run_servers(args, opts, settings, Path(tmp), machine)


def run_servers(
    args: argparse.Namespace,
    opts: LoadOptions,
    settings: dict[str, Any],
    tmp: Path,
    machine: dict[str, Any],
) -> int:
    """Start the floor and/or spam-killer (with its smtp-sink), load each in turn, report."""
    workdir = run_dir("starttls")
    cert, key = make_rsa_cert(tmp)
    python = venv_python()
    with_floor = not args.skip_floor
    with_sk = not args.floor_only

    def reference(name: str, script: str, port: int, workers: int, *extra: str) -> ManagedProcess:
        return reference_server(
            name,
            script,
            port,
            *extra,
            workers=workers,
            tls_cert=(cert, key),
            loop=args.floor_loop,
            workdir=workdir,
        )

    floor_port = free_port()
    floor = reference("floor", "floor.py", floor_port, args.floor_workers)
    lean_sink = Sink(free_port(), workdir / "lean-smtp-sink.log")
    lean_port = free_port()
    upstream = f"127.0.0.1:{lean_sink.port}"
    lean = reference("lean relay", "lean_relay.py", lean_port, args.workers, "--upstream", upstream)
    sink = Sink(free_port(), workdir / "smtp-sink.log")
    sk_port = free_port()
    data_dir = tmp / "data"
    data_dir.mkdir()
    config = write_config(
        workdir / "spam-killer.yaml",
        server_config(
            port=sk_port,
            upstream_port=sink.port,
            workers=args.workers,
            data_dir=data_dir,
            tls_cert=(cert, key),
        ),
    )
    values: dict[str, str | int] = {
        "config": str(config),
        "port": sk_port,
        "cert": str(cert),
        "key": str(key),
        "workers": args.workers,
        "upstream_port": sink.port,
        "data_dir": str(data_dir),
        "python": python,
        "repo": str(REPO_ROOT),
    }
    if args.target:
        sk_cmd = expand_target(args.target, values)
    else:
        sk_cmd = [*default_server_cmd(), "run", "-c", str(config)]
    server = ManagedProcess("spam-killer", sk_cmd, workdir / "spam-killer.log")
    settings |= {
        "workers": args.workers,
        "floor_workers": args.floor_workers,
        "floor_loop": args.floor_loop,
        "lean_relay": args.lean,
        "server_cmd": sk_cmd if with_sk else None,
    }
    print(
        f"STARTTLS sessions: {args.runs} run(s) x {args.duration:g} s per server, "
        f"concurrency {args.concurrency}, spam-killer workers {args.workers}, "
        f"floor workers {args.floor_workers} ({args.floor_loop} loop), "
        f"generator processes {args.procs}"
    )
    if with_sk:
        print(f"server: {' '.join(sk_cmd)}")
    print(f"logs and config: {workdir}")

    procs: list[ManagedProcess] = []
    targets: list[tuple[str, str, ManagedProcess, Sink | None]] = []
    if with_floor:
        procs.append(floor)
        targets.append(("floor", f"127.0.0.1:{floor_port}", floor, None))
    if args.lean:
        procs += [lean_sink, lean]
        targets.append(("lean relay", f"127.0.0.1:{lean_port}", lean, lean_sink))
    if with_sk:
        procs += [sink, server]
        targets.append(("spam-killer", f"127.0.0.1:{sk_port}", server, sink))
    results: dict[str, list[RunResult]] = {name: [] for name, *_ in targets}
    with managed(*procs):
        for proc in procs:
            proc.start()
        if with_floor:
            wait_smtp_ready("127.0.0.1", floor_port, floor)
        if args.lean:
            wait_smtp_ready("127.0.0.1", lean_sink.port, lean_sink)
            wait_smtp_ready("127.0.0.1", lean_port, lean)
        if with_sk:
            wait_smtp_ready("127.0.0.1", sink.port, sink)
            took = wait_smtp_ready("127.0.0.1", sk_port, server)
            print(f"spam-killer answered 220 after {took:.2f} s")
        for _name, address, proc, target_sink in targets:  # warm-up, not recorded
            load(address, replace(opts, duration=0.5), server=proc, sink=target_sink)
        for i in range(args.runs):
            # Each round starts with the next server: no server always follows the same one.
            for name, address, proc, target_sink in (
                targets[i % len(targets) :] + targets[: i % len(targets)]
            ):
                run = load(address, opts, server=proc, sink=target_sink)
                results[name].append(run)
                print(
                    f"  run {i + 1}/{args.runs} {name:12} {run.rate:8.1f} sessions/s  "
                    f"server {fmt(run.server_ms_per_session, 2)} ms/session  "
                    f"generator {run.gen_core_share:.2f} cores  failed {run.error_count}",
                    flush=True,
                )
    for proc in procs:
        print(f"  {proc.name} stopped with status {proc.proc.returncode if proc.proc else '-'}")

    rows = [summarize(name, runs) for name, runs in results.items()]
    floor_rate = rows[0]["sessions_per_s"] if with_floor else None
    if with_floor:
        add_paired_ratios(rows, results)
    print()
    print_table(rows, floor_rate)
    if floor_rate and with_sk:
        sk_row = rows[-1]
        print(
            f"\nspam-killer / floor = {sk_row['sessions_per_s'] / floor_rate:.2f} (medians); "
            f"round by round {sk_row['paired_ratio']:.2f} "
            f"(range {min(sk_row['paired_ratios']):.2f}-{max(sk_row['paired_ratios']):.2f})"
        )
    warn_generator(rows, args.procs)
    failed = sum(r["failed_sessions"] for r in rows)
    path = write_results(
        "starttls",
        {
            "machine": finish_machine_info(machine),
            "settings": settings,
            "floor_sessions_per_s": floor_rate,
            "results": rows,
            "logs": str(workdir),
        },
    )
    print(f"results: {path}")
    if failed:
        print(f"FAILED SESSIONS: {failed}; the errors are in {path}", file=sys.stderr)
        return 1
    return 0


def reference_server(
    name: str,
    script: str,
    port: int,
    *extra: str,
    workers: int,
    tls_cert: tuple[Path, Path],
    loop: str,
    workdir: Path,
) -> ManagedProcess:
    """bench/floor.py or bench/lean_relay.py on `port`, with the run's certificate and loop."""
    cert, key = tls_cert
    cmd = [venv_python(), str(Path(__file__).with_name(script)), "--port", str(port), *extra]
    cmd += ["--cert", str(cert), "--key", str(key), "--workers", str(workers), "--loop", loop]
    return ManagedProcess(name, cmd, workdir / f"{script.removesuffix('.py')}.log")


def warn_generator(rows: list[dict[str, Any]], procs: int) -> None:
    """Say so when a generator process came near a full core: it may have capped the rate."""
    for row in rows:
        per_proc = row["generator_core_share"] / procs
        if per_proc > 0.85:
            print(
                f"WARNING: the generator used {per_proc:.2f} of a core per process against "
                f"{row['server']}: it may be the bottleneck; try --procs {procs + 1}",
                file=sys.stderr,
            )


if __name__ == "__main__":
    run_main(main)
