"""Two spam-killer builds under one STARTTLS load, interleaved session by session.

The same-run ratio of bench/starttls.py moves by 10-15 % between runs on a shared VM, more than
most changes to the session path are worth. Here every client loop alternates between build A
(a git revision, default HEAD) and build B (the work tree), so both see the same machine at the
same instant, and the figure that matters is B's server CPU per session over A's:

    python bench/compare.py [--ref HEAD~1] [--rounds 5] [--duration 4] [--workers 1] [--pipeline]
    python bench/compare.py --ref HEAD --a-python /other/venv/bin/python   # two interpreters

Each build runs as `spam-killer run` with its own listener and its own smtp-sink (every message
a client saw accepted must reach it). Build A runs from `git archive REF src` on PYTHONPATH.
An A/A run (`--ref HEAD` on a clean tree) shows the resolution: about 2-3 % here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common import (
    REPO_ROOT,
    BenchError,
    ManagedProcess,
    Sink,
    default_server_cmd,
    fmt,
    free_port,
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
from starttls import SESSION_TIMEOUT, SmtpReplyError, build_message, client_context, one_session


async def generate(
    targets: list[str], concurrency: int, duration: float, offset: int, pipeline: bool
) -> dict[str, dict[str, int]]:
    """Session loops that take the targets in turn; counts per target."""
    ctx: ssl.SSLContext = client_context()
    message = build_message()
    sessions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + duration

    async def loop_sessions(start: int) -> None:
        turn = start
        while time.perf_counter() < deadline:
            address = targets[turn % len(targets)]
            turn += 1
            host, _, port = address.rpartition(":")
            try:
                async with asyncio.timeout(SESSION_TIMEOUT):
                    if await one_session(host, int(port), ctx, message, pipeline):
                        sessions[address] += 1
            except (OSError, ssl.SSLError, SmtpReplyError, TimeoutError) as exc:
                errors[f"{address}: {type(exc).__name__}: {exc}"[:160]] += 1
                await asyncio.sleep(0.01)

    await asyncio.gather(*(loop_sessions(offset + i) for i in range(concurrency)))
    return {"sessions": dict(sessions), "errors": dict(errors)}


def child_main(args: argparse.Namespace) -> int:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    targets = args.generate.split(",")
    result = asyncio.run(
        generate(targets, args.concurrency, args.duration, args.offset, args.pipeline)
    )
    print(json.dumps(result))
    return 0


@dataclass(frozen=True)
class Build:
    name: str
    address: str
    server: ManagedProcess
    sink: Sink


def one_round(builds: list[Build], args: argparse.Namespace) -> list[tuple[int, float]]:
    """One interleaved run; per build: (sessions, server CPU seconds)."""
    addresses = ",".join(b.address for b in builds)
    sinks_before = [b.sink.messages() for b in builds]
    cpu_before = [tree_cpu_seconds(b.server.pid) for b in builds]
    procs = max(1, min(args.procs, args.concurrency))
    commands = [
        [
            venv_python(),
            __file__,
            "--generate",
            addresses,
            "--concurrency",
            str(share),
            "--duration",
            str(args.duration),
            "--offset",
            str(i),
            *(["--pipeline"] if args.pipeline else []),
        ]
        for i, share in enumerate(split_evenly(args.concurrency, procs))
    ]
    sessions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for result in run_generators(commands, timeout=args.duration + SESSION_TIMEOUT + 30):
        sessions.update(result["sessions"])
        errors.update(result["errors"])
    if errors:
        raise BenchError(f"failed sessions: {dict(errors.most_common(3))}")
    measured = []
    for build, sink_before, cpu0 in zip(builds, sinks_before, cpu_before, strict=True):
        build.server.check_alive()
        done = sessions[build.address]
        received = build.sink.wait_messages(sink_before + done) - sink_before
        if received < done:
            raise BenchError(f"{build.name}: {done} accepted, smtp-sink received {received}")
        measured.append((done, tree_cpu_seconds(build.server.pid) - cpu0))
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="HEAD", help="git revision of build A (default HEAD)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per round")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--procs", type=int, default=2, help="generator processes")
    parser.add_argument("--workers", type=int, default=1, help="workers of each build")
    parser.add_argument(
        "--pipeline", action="store_true", help="send MAIL, RCPT and DATA in one write"
    )
    parser.add_argument(
        "--a-python",
        help="interpreter for build A (a venv's python with the dependencies; default: .venv's)",
    )
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        return child_main(args)
    if min(args.rounds, args.concurrency, args.procs, args.workers) < 1 or args.duration <= 0:
        parser.error("--rounds, --concurrency, --procs, --workers and --duration must be > 0")

    workdir = run_dir("compare")
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp_name:
        tmp = Path(tmp_name)
        ref_src = tmp / "ref"
        ref_src.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", args.ref, "src"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise BenchError(f"git archive {args.ref}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(ref_src)], input=archive.stdout, check=True)
        cert = make_rsa_cert(tmp)
        builds: list[Build] = []
        launcher = {"A": [args.a_python, "-m", "spamkiller"] if args.a_python else None}
        for name, src in (("A", ref_src / "src"), ("B", REPO_ROOT / "src")):
            sink = Sink(free_port(), workdir / f"smtp-sink-{name}.log")
            port = free_port()
            data_dir = tmp / f"data-{name}"
            data_dir.mkdir()
            config = write_config(
                workdir / f"spam-killer-{name}.yaml",
                server_config(
                    port=port,
                    upstream_port=sink.port,
                    workers=args.workers,
                    data_dir=data_dir,
                    tls_cert=cert,
                ),
            )
            start = launcher.get(name) or default_server_cmd()
            cmd = ["env", f"PYTHONPATH={src}", *start, "run", "-c", str(config)]
            server = ManagedProcess(f"spam-killer {name}", cmd, workdir / f"spam-killer-{name}.log")
            builds.append(Build(name, f"127.0.0.1:{port}", server, sink))
        print(
            f"A: {args.ref} ({ref_src / 'src'}, {args.a_python or venv_python()})  "
            f"B: work tree ({REPO_ROOT / 'src'}, {venv_python()})"
        )
        print(
            f"{args.rounds} rounds of {args.duration:g} s, concurrency {args.concurrency}, "
            f"workers {args.workers} each; logs in {workdir}"
        )
        rows: list[dict[str, float]] = []
        with managed(*(b.sink for b in builds), *(b.server for b in builds)):
            for build in builds:
                build.sink.start()
                build.server.start()
            for build in builds:
                wait_smtp_ready("127.0.0.1", build.sink.port, build.sink)
                host, _, port_text = build.address.rpartition(":")
                wait_smtp_ready(host, int(port_text), build.server)
            one_round(builds, argparse.Namespace(**{**vars(args), "duration": 1.0}))  # warm-up
            for i in range(args.rounds):
                (sa, ca), (sb, cb) = one_round(builds, args)
                ms_a, ms_b = 1000 * ca / sa, 1000 * cb / sb
                rows.append({"sessions_a": sa, "sessions_b": sb, "ms_a": ms_a, "ms_b": ms_b})
                print(
                    f"  round {i + 1}: A {ms_a:.3f} ms/session ({sa})  "
                    f"B {ms_b:.3f} ms/session ({sb})  B/A {ms_b / ms_a:.3f}",
                    flush=True,
                )
    ratios = [r["ms_b"] / r["ms_a"] for r in rows]
    print()
    print(
        table(
            ["build", "server CPU ms/session (median)", "sessions (all rounds)"],
            [
                [
                    "A " + args.ref,
                    fmt(median([r["ms_a"] for r in rows]), 3),
                    str(sum(r["sessions_a"] for r in rows)),
                ],
                [
                    "B work tree",
                    fmt(median([r["ms_b"] for r in rows]), 3),
                    str(sum(r["sessions_b"] for r in rows)),
                ],
            ],
        )
    )
    print(
        f"\nB/A CPU per session: median {median(ratios):.3f}, "
        f"range {min(ratios):.3f}-{max(ratios):.3f}"
    )
    path = write_results(
        "compare",
        {
            "ref": args.ref,
            "settings": {k: v for k, v in vars(args).items() if k != "generate"},
            "rounds": rows,
            "median_ratio": median(ratios),
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
