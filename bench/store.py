"""Store throughput and latency: greylist and hit_rate on SQLite and on a real redis-server.

    python bench/store.py [--quick] [--duration 2] [--rounds 3] [--concurrency 1,32]

For each backend, operation and concurrency, C coroutines in one process (one event loop, uvloop
when installed, as in a worker) call the operation back to back for `duration` seconds on one
Store; each call's latency is timed. Cells are measured in `rounds` alternating rounds and the
median round is reported: ops/s, p50 and p99 latency.

Backends:
- `sqlite`: the default store, a file in a temp dir, batching on (up to 256 jobs a transaction).
- `sqlite-b1`: the same with `max_batch=1`, one transaction per operation: the batching's worth.
- `redis`: redis-server on 127.0.0.1 started here (no persistence), one store with its default
  pool of 16 connections.

Workload: greylist over 10,000 keys (delay 300 s, expire 1 day: first sights and early retries,
like a flood of new triplets), hit_rate over 1,000 keys (window 60 s, a limit never reached, so
every call writes). Results go to bench/results/store-<time>.json as well.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    ManagedProcess,
    finish_machine_info,
    fmt,
    free_port,
    machine_info,
    managed,
    run_dir,
    run_main,
    table,
    write_results,
)
from spamkiller.store import Store, open_store
from spamkiller.store.sqlite import SqliteStore

GREY_KEYS = [f"192.0.2.{i % 256}/24|s{i}@sender.example|r{i}@example.com" for i in range(10_000)]
RATE_KEYS = [f"198.51.{i // 256}.{i % 256}" for i in range(1_000)]

Operation = Callable[[Store, random.Random], Awaitable[object]]


def _greylist(store: Store, rng: random.Random) -> Awaitable[object]:
    return store.greylist(rng.choice(GREY_KEYS), delay=300, expire=86_400)


def _hit_rate(store: Store, rng: random.Random) -> Awaitable[object]:
    return store.hit_rate(rng.choice(RATE_KEYS), window=60, limit=1_000_000_000)


OPERATIONS: dict[str, Operation] = {"greylist": _greylist, "hit_rate": _hit_rate}


def _loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    try:
        import uvloop
    except ImportError:
        return "asyncio", asyncio.new_event_loop
    return "uvloop", uvloop.new_event_loop


async def _measure(
    store: Store, operation: Operation, concurrency: int, duration: float
) -> dict[str, float]:
    latencies: list[int] = []
    deadline = time.perf_counter() + duration

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            started = time.perf_counter_ns()
            await operation(store, rng)
            latencies.append(time.perf_counter_ns() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(seed) for seed in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "ops": len(latencies),
        "ops_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] / 1e6,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1e6,
    }


async def _open(backend: str, tmp: Path, redis_url: str) -> Store:
    if backend == "sqlite":
        return await open_store(f"sqlite:///{tmp / 'state.db'}")
    if backend == "sqlite-b1":
        return await SqliteStore.open(tmp / "state-b1.db", max_batch=1)
    return await open_store(redis_url)


async def _bench(args: argparse.Namespace, tmp: Path, redis_url: str) -> list[dict[str, Any]]:
    cells = [
        (backend, op, c)
        for op in OPERATIONS
        for c in args.concurrency
        for backend in ("sqlite", "sqlite-b1", "redis")
    ]
    stores = {b: await _open(b, tmp, redis_url) for b in ("sqlite", "sqlite-b1", "redis")}
    try:
        for store in stores.values():
            await store.ping()
        # Warm-up: scripts loaded, pages cached, connections open.
        for backend, op, c in cells:
            await _measure(stores[backend], OPERATIONS[op], c, min(0.2, args.duration))
        rounds: dict[tuple[str, str, int], list[dict[str, float]]] = {cell: [] for cell in cells}
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}/{args.rounds}", flush=True)
            for cell in cells:  # alternating backends within a round: noise hits all alike
                backend, op, c = cell
                store = stores[backend]
                before = store.stats() if isinstance(store, SqliteStore) else None
                run = await _measure(store, OPERATIONS[op], c, args.duration)
                if isinstance(store, SqliteStore) and before is not None:
                    after = store.stats()
                    run["ops_per_transaction"] = (after.operations - before.operations) / max(
                        1, after.transactions - before.transactions
                    )
                rounds[cell].append(run)
    finally:
        for store in stores.values():
            await store.close()
    results = []
    for (backend, op, c), runs in rounds.items():
        by_rate = sorted(runs, key=lambda r: r["ops_per_s"])
        median_run = by_rate[len(by_rate) // 2]
        results.append(
            {
                "backend": backend,
                "operation": op,
                "concurrency": c,
                **median_run,
                "ops_per_s_rounds": [r["ops_per_s"] for r in runs],
                "spread": (by_rate[-1]["ops_per_s"] - by_rate[0]["ops_per_s"])
                / statistics.median(r["ops_per_s"] for r in runs),
            }
        )
    return results


def _start_redis(directory: Path) -> tuple[ManagedProcess, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed: run scripts/install-deps.sh")
    port = free_port()
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
    cmd += ["--save", "", "--appendonly", "no"]
    proc = ManagedProcess("redis-server", cmd, directory / "redis.log").start()
    deadline = time.monotonic() + 10
    while True:
        proc.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise BenchError("redis-server did not answer PING within 10 s")
        time.sleep(0.02)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 32],
        help="comma-separated coroutine counts",
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 0.5 s: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 0.5, 1

    info = machine_info()
    loop_name, loop_factory = _loop_factory()
    directory = run_dir("store")
    redis, redis_url = _start_redis(directory)
    with (
        managed(redis),
        tempfile.TemporaryDirectory(dir=directory) as tmp,
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        results = runner.run(_bench(args, Path(tmp), redis_url))

    rows = [
        [
            f"{r['operation']} {r['backend']}",
            str(r["concurrency"]),
            fmt(r["ops_per_s"]),
            fmt(r["p50_ms"], 3),
            fmt(r["p99_ms"], 3),
            fmt(r.get("ops_per_transaction"), 1),
            fmt(100 * r["spread"], 0) + "%",
        ]
        for r in sorted(results, key=lambda r: (r["operation"], r["concurrency"]))
    ]
    print()
    print(f"loop {loop_name}, {args.rounds} round(s) of {args.duration:g} s per cell, median round")
    headers = ["operation backend", "conc", "ops/s", "p50 ms", "p99 ms", "ops/txn", "spread"]
    print(table(headers, rows))
    path = write_results(
        "store",
        {
            "machine": finish_machine_info(info),
            "loop": loop_name,
            "duration": args.duration,
            "rounds": args.rounds,
            "results": results,
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
