"""Relay throughput: smtp-source -> spam-killer -> smtp-sink against smtp-source -> smtp-sink.

Both paths are measured in the same run, round by round (direct, then spam-killer), so that
the machine's noise hits both. Every cell is the median of 3 runs (1 with --quick).

    python bench/relay.py [--quick] [--workers 2] [--cells '5KB-s10-*'] [--target CMD]

Cells: message size 5 KB or 100 KB (smtp-source -l), 1, 10 or 50 parallel sessions (-s), one
message per connection or all of a session's messages over one connection (-d). Per cell:
messages/s direct and through spam-killer, their ratio, spam-killer's CPU per message (its
whole process tree, from /proc) and the CPU of smtp-source and smtp-sink per message. smtp-sink
counts what it receives; a run in which it got fewer messages than smtp-source sent fails the
benchmark, so a relay that loses mail cannot look fast.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
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
    pin_prefix,
    require_tool,
    run_dir,
    run_main,
    server_config,
    table,
    venv_python,
    wait_smtp_ready,
    write_config,
    write_results,
)

SIZES = {"5KB": 5000, "100KB": 100_000}
SIZES_LABEL = {v: k for k, v in SIZES.items()}
SESSIONS = (1, 10, 50)
MODES = ("1/conn", "many/conn")
SENDER = "sender@sender.test"
RECIPIENT = "rcpt@bench.test"
HELO_NAME = "client.sender.test"
MAX_MESSAGES = 150_000  # per run; also bounds the connections a 1/conn run leaves in TIME_WAIT


@dataclass(frozen=True)
class Cell:
    size_name: str
    sessions: int
    mode: str

    @property
    def size(self) -> int:
        return SIZES[self.size_name]

    @property
    def name(self) -> str:
        return f"{self.size_name}-s{self.sessions}-{'1per' if self.mode == '1/conn' else 'many'}"

    @property
    def label(self) -> str:
        return f"{self.size_name} s={self.sessions} {self.mode}"

    def min_messages(self) -> int:
        # Enough that every session sends several messages.
        return max(20, 4 * self.sessions)


@dataclass
class Route:
    """One way from smtp-source to an smtp-sink: direct, or through the server under test."""

    name: str
    port: int
    sink: Sink
    server: ManagedProcess | None
    source_cpu: int | None = None


@dataclass
class RunResult:
    messages: int
    elapsed: float
    server_cpu_s: float | None
    source_cpu_s: float
    sink_cpu_s: float

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed

    def per_msg_ms(self, seconds: float | None) -> float | None:
        return None if seconds is None else 1000.0 * seconds / self.messages


def smtp_source_cmd(
    source: str, cell: Cell, count: int, port: int, cpu: int | None = None
) -> list[str]:
    cmd = [
        source,
        "-s",
        str(cell.sessions),
        "-m",
        str(count),
        "-l",
        str(cell.size),
        "-r",
        "1",
        "-M",
        HELO_NAME,
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
    ]
    if cell.mode == "many/conn":
        cmd.insert(1, "-d")
    return [*pin_prefix(cpu), *cmd, f"127.0.0.1:{port}"]


def run_once(source: str, cell: Cell, count: int, path: Route) -> RunResult:
    """Send `count` messages along `path`; check smtp-sink got them all; account CPU."""
    sink = path.sink
    sink_before = sink.messages()
    sink_cpu0 = sink.cpu_seconds()
    server_cpu0 = path.server.cpu_seconds() if path.server is not None else None
    children0 = children_rusage_seconds()
    cmd = smtp_source_cmd(source, cell, count, path.port, path.source_cpu)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish in 600 s: {' '.join(cmd)}") from None
    elapsed = time.perf_counter() - t0
    source_cpu = children_rusage_seconds() - children0
    if path.server is not None:
        path.server.check_alive()
    if proc.returncode != 0:
        sink_state = "running" if sink.alive() else f"exited ({sink.proc and sink.proc.returncode})"
        hint = " (killed by a signal from another process)" if proc.returncode < 0 else ""
        raise BenchError(
            f"{path.name} {cell.label}: smtp-source failed (status {proc.returncode}{hint}): "
            f"{(proc.stderr or proc.stdout).strip()[-500:]}\n  command: {' '.join(cmd)}\n"
            f"  smtp-sink: {sink_state}, {sink.messages() - sink_before} of {count} received"
        )
    received = sink.wait_messages(sink_before + count) - sink_before
    if received != count:
        raise BenchError(
            f"{path.name} {cell.label}: smtp-source sent {count} messages and saw them accepted, "
            f"smtp-sink received {received}: mail went missing"
        )
    server_cpu = None
    if path.server is not None and server_cpu0 is not None:
        server_cpu = path.server.cpu_seconds() - server_cpu0
    return RunResult(
        messages=count,
        elapsed=elapsed,
        server_cpu_s=server_cpu,
        source_cpu_s=source_cpu,
        sink_cpu_s=sink.cpu_seconds() - sink_cpu0,
    )


def calibrate(source: str, cell: Cell, path: Route, duration: float) -> int:
    """Warm the path up and pick a message count that takes about `duration` seconds."""
    count = cell.min_messages()
    rate = 0.0
    for _ in range(3):
        result = run_once(source, cell, count, path)
        rate = result.rate
        if result.elapsed >= 0.25:
            break
        count = min(MAX_MESSAGES, max(count * 4, int(rate * 0.3)))
    return max(cell.min_messages(), min(MAX_MESSAGES, int(rate * duration)))


def select_cells(patterns: str | None) -> list[Cell]:
    cells = [Cell(size, s, mode) for size in SIZES for s in SESSIONS for mode in MODES]
    if not patterns:
        return cells
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [c for c in cells if any(fnmatch.fnmatch(c.name, p) for p in wanted)]
    if not chosen:
        names = ", ".join(c.name for c in cells)
        raise BenchError(f"--cells {patterns!r} matches no cell; cells are: {names}")
    return chosen


def summarize(
    cell: Cell, counts: dict[str, int], runs: dict[str, list[RunResult]]
) -> dict[str, Any]:
    def med(name: str, attr: str) -> float | None:
        values = [getattr(r, attr) for r in runs[name]]
        return median(values) if values else None

    def med_ms(name: str, what: str) -> float | None:
        values = [r.per_msg_ms(getattr(r, what)) for r in runs[name]]
        present = [v for v in values if v is not None]
        return median(present) if present else None

    def spread(name: str) -> float | None:
        rates = [r.rate for r in runs[name]]
        return (max(rates) - min(rates)) / median(rates) if len(rates) > 1 else None

    direct_rate = med("direct", "rate")
    sk_rate = med("spam-killer", "rate")
    return {
        "cell": cell.name,
        "size_bytes": cell.size,
        "sessions": cell.sessions,
        "mode": cell.mode,
        "messages_per_run": counts,
        "direct_msg_per_s": direct_rate,
        "spam_killer_msg_per_s": sk_rate,
        "ratio": (sk_rate / direct_rate) if sk_rate and direct_rate else None,
        "direct_spread": spread("direct"),
        "spam_killer_spread": spread("spam-killer"),
        "spam_killer_cpu_ms_per_msg": med_ms("spam-killer", "server_cpu_s"),
        "direct_source_cpu_ms_per_msg": med_ms("direct", "source_cpu_s"),
        "direct_sink_cpu_ms_per_msg": med_ms("direct", "sink_cpu_s"),
        "relay_source_cpu_ms_per_msg": med_ms("spam-killer", "source_cpu_s"),
        "relay_sink_cpu_ms_per_msg": med_ms("spam-killer", "sink_cpu_s"),
        "runs": {
            name: [
                {
                    "messages": r.messages,
                    "elapsed_s": round(r.elapsed, 4),
                    "msg_per_s": round(r.rate, 1),
                    "server_cpu_s": r.server_cpu_s,
                    "source_cpu_s": round(r.source_cpu_s, 4),
                    "sink_cpu_s": r.sink_cpu_s,
                }
                for r in results
            ]
            for name, results in runs.items()
        },
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = [
        "cell",
        "direct msg/s",
        "spam-killer msg/s",
        "ratio",
        "SK CPU ms/msg",
        "src+sink CPU ms/msg direct",
        "src+sink CPU ms/msg relay",
        "spread direct/SK",
    ]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    def add(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a + b

    lines = []
    for row in rows:
        lines.append(
            [
                f"{SIZES_LABEL[row['size_bytes']]} s={row['sessions']} {row['mode']}",
                fmt(row["direct_msg_per_s"]),
                fmt(row["spam_killer_msg_per_s"]),
                fmt(row["ratio"], 3),
                fmt(row["spam_killer_cpu_ms_per_msg"], 3),
                fmt(add(row["direct_source_cpu_ms_per_msg"], row["direct_sink_cpu_ms_per_msg"]), 3),
                fmt(add(row["relay_source_cpu_ms_per_msg"], row["relay_sink_cpu_ms_per_msg"]), 3),
                f"{pct(row['direct_spread'])}/{pct(row['spam_killer_spread'])}",
            ]
        )
    print(table(headers, lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Relay msg/s: smtp-source -> spam-killer -> smtp-sink vs direct, same run."
    )
    parser.add_argument("--quick", action="store_true", help="1 run of ~0.5 s per cell and path")
    parser.add_argument("--workers", type=int, default=2, help="spam-killer workers (default 2)")
    parser.add_argument(
        "--cells",
        help="comma-separated glob patterns over cell names such as 5KB-s10-many, 100KB-s1-1per "
        "(e.g. '5KB-*' or '*-s50-*')",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per cell and path (3)")
    parser.add_argument(
        "--duration", type=float, default=None, help="target seconds per run (3; --quick 0.5)"
    )
    parser.add_argument(
        "--target",
        metavar="CMD",
        help="server command instead of `spam-killer run -c {config}`; placeholders {config} "
        "{port} {upstream_port} {workers} {data_dir} {python} {repo}",
    )
    parser.add_argument("--direct-only", action="store_true", help="measure direct paths only")
    parser.add_argument(
        "--pin",
        choices=("none", "split"),
        default="none",
        help="split: smtp-source on CPU 0 and the smtp-sinks on CPU 1 (taskset), the server "
        "unpinned; steadier s=1 cells on VMs where cross-CPU wake-ups are slow",
    )
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 0.5 if args.quick else 3.0
    if args.runs < 1 or args.workers < 1 or args.duration <= 0:
        parser.error("--runs and --workers must be >= 1, --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cells = select_cells(args.cells)
    source = require_tool("smtp-source")
    machine = machine_info()
    print(f"machine: {machine['cpu_model']}, load {machine['loadavg_at_start']}")
    workdir = run_dir("relay")
    tmp = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    try:
        return _run(args, cells=cells, source=source, workdir=workdir, tmp=tmp, machine=machine)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    *,
    cells: list[Cell],
    source: str,
    workdir: Path,
    tmp: Path,
    machine: dict[str, Any],
) -> int:

    sink_cpu, source_cpu = (1, 0) if args.pin == "split" else (None, None)
    direct_sink = Sink(free_port(), workdir / "smtp-sink-direct.log", cpu=sink_cpu)
    relay_sink = Sink(free_port(), workdir / "smtp-sink-relay.log", cpu=sink_cpu)
    sk_port = free_port()
    config = write_config(
        workdir / "spam-killer.yaml",
        server_config(
            port=sk_port, upstream_port=relay_sink.port, workers=args.workers, data_dir=tmp
        ),
    )
    values: dict[str, str | int] = {
        "config": str(config),
        "port": sk_port,
        "upstream_port": relay_sink.port,
        "workers": args.workers,
        "data_dir": str(tmp),
        "python": venv_python(),
        "repo": str(REPO_ROOT),
    }
    if args.target:
        sk_cmd = expand_target(args.target, values)
    else:
        sk_cmd = [*default_server_cmd(), "run", "-c", str(config)]
    server = ManagedProcess("spam-killer", sk_cmd, workdir / "spam-killer.log")

    print(
        f"relay benchmark: {len(cells)} cells, {args.runs} run(s) of ~{args.duration:g} s per "
        f"cell and path, spam-killer workers={args.workers}, {os.cpu_count()} cpus, "
        f"pin={args.pin}"
    )
    if not args.direct_only:
        print(f"server: {' '.join(sk_cmd)}")
    print(f"logs and config: {workdir}")

    procs: list[ManagedProcess] = [direct_sink]
    if not args.direct_only:
        procs += [relay_sink, server]
    paths = [Route("direct", direct_sink.port, direct_sink, None, source_cpu)]
    if not args.direct_only:
        paths.append(Route("spam-killer", sk_port, relay_sink, server, source_cpu))

    rows: list[dict[str, Any]] = []
    with managed(*procs):
        for proc in procs:
            proc.start()
        wait_smtp_ready("127.0.0.1", direct_sink.port, direct_sink)
        if not args.direct_only:
            wait_smtp_ready("127.0.0.1", relay_sink.port, relay_sink)
            took = wait_smtp_ready("127.0.0.1", sk_port, server)
            print(f"spam-killer answered 220 after {took:.2f} s")
        for cell in cells:
            counts = {p.name: calibrate(source, cell, p, args.duration) for p in paths}
            runs: dict[str, list[RunResult]] = {p.name: [] for p in paths}
            runs.setdefault("spam-killer", [])
            for _ in range(args.runs):
                for p in paths:
                    runs[p.name].append(run_once(source, cell, counts[p.name], p))
            row = summarize(cell, counts, runs)
            rows.append(row)
            print(
                f"  {cell.label:22} direct {fmt(row['direct_msg_per_s']):>7} msg/s   "
                f"spam-killer {fmt(row['spam_killer_msg_per_s']):>7} msg/s   "
                f"ratio {fmt(row['ratio'], 3):>6}   "
                f"SK CPU {fmt(row['spam_killer_cpu_ms_per_msg'], 3)} ms/msg",
                flush=True,
            )
    for proc in procs:
        code = proc.proc.returncode if proc.proc is not None else None
        print(f"  {proc.name} stopped with status {code}")

    print()
    print(
        f"median of {args.runs} run(s); spam-killer workers={args.workers}; "
        "spread = (max - min) / median of the runs"
    )
    print_table(rows)
    path = write_results(
        "relay",
        {
            "machine": finish_machine_info(machine),
            "settings": {
                "workers": args.workers,
                "runs": args.runs,
                "pin": args.pin,
                "target_duration_s": args.duration,
                "server_cmd": sk_cmd,
                "smtp_source_flags": "-s S [-d] -m N -l BYTES -r 1 -M client.sender.test "
                "-f sender@sender.test -t rcpt@bench.test",
                "smtp_sink_flags": "-c [-u nobody] 127.0.0.1:PORT 1000",
            },
            "results": rows,
            "logs": str(workdir),
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
