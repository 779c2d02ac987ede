"""Resolutions per second: both backends (CaresResolver, DnspythonResolver) from their cache,
and uncached against a local unbound.

    python bench/resolve.py [--quick] [--duration 2] [--runs 3] [--loop both|asyncio|uvloop]
        [--backend both|cares|dnspython]

unbound is started by tests/support/dns_server.py (127.0.0.1, local zones, one thread) with
1,000 A records under `bench.test` and a DNSBL-like zone `zen.example` where every lookup is a
miss (NXDOMAIN), as most DNSBL lookups are. Cells:

- `cached`: 1,000 names already in the cache, looked up in turn by one coroutine: the cost of
  a hit (normalisation, one dict lookup, a list copy). No reference: nothing is sent.
- `A c=1` / `A c=50`: the 1,000 A records with the cache off (`cache_size=0`), one or 50
  coroutines at a time; `NX c=50`: fresh DNSBL misses, 50 at a time.
- each cell runs for each backend, `cares` (CaresResolver: c-ares) and `dnspython`
  (DnspythonResolver), in alternating rounds.
- each uncached cell also runs **bare dnspython** (`dns.asyncresolver.Resolver.resolve` with the
  same nameserver, EDNS and no cache) in the same rounds: the ratio is lookups/s against it, so
  for `dnspython` what our layer costs, for `cares` what c-ares saves.

Columns: lookups/s (median of the runs), client CPU us/lookup (this process), unbound CPU
us/lookup (its /proc counters, 10 ms ticks: rough below ~1 s of CPU), ratio to bare dnspython.
Results go to bench/results/dns-<time>.json. (Not named dns.py: a module of that name next to
the script would shadow dnspython's `dns` package, for this script and for ruff's import sorting.)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    finish_machine_info,
    fmt,
    machine_info,
    median,
    run_main,
    table,
    tree_cpu_seconds,
    write_results,
)

sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "src"))

import dns.asyncresolver
import dns.nameserver

from spamkiller.dns.cares import CaresResolver
from spamkiller.dns.dnspython import DnspythonResolver
from spamkiller.dns.resolver import DnsNxDomain
from support.dns_server import DnsServer

NAMES = 1000

Lookup = Callable[[str], Awaitable[object]]


def bare(address: str) -> Lookup:
    host, _, port = address.partition(":")
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, int(port))]
    resolver.cache = None
    resolver.use_edns(0, 0, 1232)
    resolver.lifetime = resolver.timeout = 5.0

    async def lookup(name: str) -> object:
        try:
            return await resolver.resolve(name + ".", "A", raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return None

    return lookup


BACKENDS: dict[str, type[CaresResolver | DnspythonResolver]] = {
    "cares": CaresResolver,
    "dnspython": DnspythonResolver,
}


def ours(resolver: CaresResolver | DnspythonResolver) -> Lookup:
    async def lookup(name: str) -> object:
        try:
            return await resolver.a(name)
        except DnsNxDomain:
            return None

    return lookup


async def measure(
    lookup: Lookup, names: Callable[[], str], concurrency: int, duration: float
) -> int:
    deadline = time.monotonic() + duration
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await lookup(names())
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def run_cell(
    *,
    loop_name: str,
    lookup_factory: Callable[[], Lookup],
    names: Callable[[], str],
    concurrency: int,
    duration: float,
    unbound_pid: int,
    warm: list[str] | None = None,
) -> dict[str, float]:
    async def main() -> tuple[int, float, float, float]:
        lookup = lookup_factory()
        for name in warm or []:
            await lookup(name)
        await measure(lookup, names, concurrency, min(0.2, duration))  # warm-up
        cpu0, srv0, t0 = time.process_time(), tree_cpu_seconds(unbound_pid), time.monotonic()
        count = await measure(lookup, names, concurrency, duration)
        wall = time.monotonic() - t0
        return count, wall, time.process_time() - cpu0, tree_cpu_seconds(unbound_pid) - srv0

    if loop_name == "uvloop":
        import uvloop

        count, wall, cpu, srv = uvloop.run(main())
    else:
        count, wall, cpu, srv = asyncio.run(main())
    return {
        "lookups": count,
        "per_s": count / wall,
        "client_us": cpu / count * 1e6,
        "unbound_us": srv / count * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one 0.5 s run per cell")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loop", choices=["both", "asyncio", "uvloop"], default="both")
    parser.add_argument("--backend", choices=["both", *BACKENDS], default="both")
    args = parser.parse_args()
    duration, runs = (0.5, 1) if args.quick else (args.duration, args.runs)
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    info = machine_info()

    with tempfile.TemporaryDirectory() as tmp:
        server = DnsServer(Path(tmp))
        hosts = [f"h{i}.bench.test" for i in range(NAMES)]
        for i, host in enumerate(hosts):
            server.add(host, "A", f"10.0.{i // 256}.{i % 256}", ttl=3600)
        server.zone("zen.example.")
        with server:
            assert server.proc is not None
            pid, address = server.proc.pid, server.address
            cycle = itertools.cycle(hosts).__next__
            counter = itertools.count()

            def fresh_miss() -> str:
                n = next(counter)
                return f"{n % 250}.{n // 250 % 250}.{n // 62500 % 250}.10.zen.example"

            cells: list[dict[str, Any]] = []
            for loop_name in loops:
                plan = [
                    ("cached c=1", 1, cycle, True),
                    ("A c=1", 1, cycle, False),
                    ("A c=50", 50, cycle, False),
                    ("NX c=50", 50, fresh_miss, False),
                ]
                for label, conc, names, cached in plan:
                    rounds: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
                    rounds["bare"] = []
                    for _ in range(runs):
                        for backend in backends:

                            def factory(cached: bool = cached, backend: str = backend) -> Lookup:
                                size = 10 * NAMES if cached else 0
                                cls = BACKENDS[backend]
                                return ours(cls([address], timeout=5.0, cache_size=size))

                            rounds[backend].append(
                                run_cell(
                                    loop_name=loop_name,
                                    lookup_factory=factory,
                                    names=names,
                                    concurrency=conc,
                                    duration=duration,
                                    unbound_pid=pid,
                                    warm=hosts if cached else None,
                                )
                            )
                        if not cached:
                            rounds["bare"].append(
                                run_cell(
                                    loop_name=loop_name,
                                    lookup_factory=lambda: bare(address),
                                    names=names,
                                    concurrency=conc,
                                    duration=duration,
                                    unbound_pid=pid,
                                )
                            )
                    cell: dict[str, Any] = {"loop": loop_name, "cell": label, "runs": rounds}
                    for who, results in rounds.items():
                        if results:
                            cell[who] = {k: median([r[k] for r in results]) for k in results[0]}
                    cells.append(cell)
                    for backend in backends:
                        rate = fmt(cell[backend]["per_s"])
                        print(f"  {loop_name:8} {label:11} {backend:9} {rate}/s", flush=True)

    rows = []
    for cell in cells:
        b = cell.get("bare")
        for backend in backends:
            o = cell[backend]
            rows.append(
                [
                    f"{cell['loop']} {cell['cell']} {backend}",
                    fmt(o["per_s"]),
                    fmt(o["client_us"], 1),
                    fmt(o["unbound_us"], 1) if b else "-",
                    fmt(b["per_s"]) if b else "-",
                    fmt(o["per_s"] / b["per_s"], 2) if b else "-",
                ]
            )
    print()
    print(
        table(
            [
                "cell",
                "lookups/s",
                "client us/lookup",
                "unbound us/lookup",
                "bare dnspython/s",
                "ratio",
            ],
            rows,
        )
    )
    path = write_results(
        "dns",
        {
            "duration": duration,
            "runs": runs,
            "backends": backends,
            "cells": cells,
            "machine": finish_machine_info(info),
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
