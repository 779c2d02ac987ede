"""Several MX hosts on one Redis, and several workers on one SQLite file: one memory.

Real `spam-killer run` processes, a real redis-server, a recording upstream; clients come through
a trusted PROXY hop so they have public-looking addresses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from conftest import NO_RATE_LIMITS, Certs, mx_config
from support.attempt import attempt
from support.load import MxProcess
from support.net import RawClient
from support.proxy import proxied_listener
from support.redis_server import RedisServer
from support.upstream import RecordingUpstream


def host_config(tmp_path: Path, certs: Certs, upstream: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "greylist": {"enabled": True, "delay": "1s", "auto_pass_accepted": 0},
        "rate_limits": NO_RATE_LIMITS,
        "pass_cache": {"enabled": False},
    }
    return mx_config(
        tmp_path, certs, upstream_port=upstream, listeners=proxied_listener(), **(base | extra)
    )


@contextmanager
def two_hosts(
    tmp_path: Path, certs: Certs, upstream: int, redis_url: str, **extra: Any
) -> Iterator[tuple[MxProcess, MxProcess]]:
    with ExitStack() as stack:
        hosts = []
        for name in ("a", "b"):
            cwd = tmp_path / name
            cwd.mkdir()
            config = host_config(cwd, certs, upstream, state=redis_url, **extra)
            hosts.append(stack.enter_context(MxProcess(cwd, config)))
        yield hosts[0], hosts[1]


def connect(port: int, ip: str) -> bytes:
    with RawClient(port) as c:
        c.send(f"PROXY TCP4 {ip} 192.0.2.25 40000 25\r\n".encode())
        return c.reply()


def test_greylisted_on_one_host_is_accepted_on_retry_at_the_other(
    tmp_path: Path, certs: Certs
) -> None:
    with (
        RedisServer(tmp_path / "redis") as redis,
        RecordingUpstream() as up,
        two_hosts(tmp_path, certs, up.port, redis.url) as (a, b),
    ):
        first = attempt(a.port, "198.51.100.77")
        assert first.rcpt.startswith(b"451 4.7.1 Greylisted")
        early = attempt(b.port, "198.51.100.77")  # B knows the first attempt already
        assert early.rcpt.startswith(b"451 4.7.1 Greylisted")
        deadline = time.monotonic() + 5
        while "greylist early" not in b.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "greylist early" in b.log()
        time.sleep(1.2)
        assert attempt(b.port, "198.51.100.78").delivered  # same /24, retried at B
        assert len(up.messages) == 1


def test_rate_limits_are_counted_across_hosts(tmp_path: Path, certs: Certs) -> None:
    limits = NO_RATE_LIMITS | {"connections_per_ip": "3/1m"}
    with (
        RedisServer(tmp_path / "redis") as redis,
        RecordingUpstream() as up,
        two_hosts(tmp_path, certs, up.port, redis.url, rate_limits=limits) as (a, b),
    ):
        for port in (a.port, b.port, a.port):
            assert connect(port, "203.0.113.5").startswith(b"220 ")
        assert connect(b.port, "203.0.113.5").startswith(b"421 4.7.0 Too many connections")


def test_concurrency_caps_are_counted_across_hosts(tmp_path: Path, certs: Certs) -> None:
    limits = NO_RATE_LIMITS | {"concurrent_per_ip": 1}
    with (
        RedisServer(tmp_path / "redis") as redis,
        RecordingUpstream() as up,
        two_hosts(tmp_path, certs, up.port, redis.url, rate_limits=limits) as (a, b),
        RawClient(a.port) as held,
    ):
        held.send(b"PROXY TCP4 203.0.113.6 192.0.2.25 40000 25\r\n")
        assert held.reply().startswith(b"220 ")
        assert connect(b.port, "203.0.113.6").startswith(b"421 4.7.0 Too many sessions")


def test_workers_of_one_host_share_the_sqlite_store(tmp_path: Path, certs: Certs) -> None:
    """Two SO_REUSEPORT workers, one state file: a retry passes whichever worker takes it, and
    a rate limit counts every worker's connections."""
    limits = NO_RATE_LIMITS | {"connections_per_ip": "20/1m"}
    with RecordingUpstream() as up:
        config = host_config(tmp_path, certs, up.port, workers=2, rate_limits=limits)
        with MxProcess(tmp_path, config) as mx:
            senders = [f"s{n}@sender.example" for n in range(8)]
            for sender in senders:
                assert attempt(mx.port, "198.51.100.90", sender=sender).rcpt.startswith(b"451 ")
            time.sleep(1.2)
            for sender in senders:
                assert attempt(mx.port, "198.51.100.90", sender=sender).delivered
            assert len(up.messages) == 8
            # 16 connections so far; the 20/1m limit leaves 4, whichever workers take them.
            banners = [connect(mx.port, "198.51.100.90") for _ in range(8)]
            assert sum(b.startswith(b"220 ") for b in banners) == 4
            assert sum(b.startswith(b"421 4.7.0") for b in banners) == 4
            assert "workers count=2" in mx.log()


def test_the_redis_password_works_and_never_reaches_the_log(tmp_path: Path, certs: Certs) -> None:
    secret = "s3cret-Pass-9f2"
    with (
        RedisServer(tmp_path / "redis", password=secret) as redis,
        RecordingUpstream() as up,
    ):
        url = f"redis://:{secret}@127.0.0.1:{redis.port}/0"
        config = host_config(tmp_path, certs, up.port, state=url)
        with MxProcess(tmp_path, config) as mx:
            # The store answers (greylisting works), so the password was used ...
            assert attempt(mx.port, "198.51.100.99").rcpt.startswith(b"451 4.7.1 Greylisted")
            deadline = time.monotonic() + 5
            while "store state=" not in mx.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert f"redis://:***@127.0.0.1:{redis.port}/0" in mx.log()
        # ... and no line of the log shows it.
        assert secret not in mx.log()
