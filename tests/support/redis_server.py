"""A real redis-server for tests: its own port, its own directory, no persistence, always stopped.

Tests never use a system service. `RedisServer` runs `redis-server` in the foreground on
127.0.0.1 and a free port, with its working directory, log and (disabled) dumps in a temp dir.
It can be stopped and started again on the same port (an outage), paused with SIGSTOP (a hung
server: sockets stay open, nothing answers) and resumed.

For highly available Redis: `RedisSentinel` runs a sentinel (`redis-server <conf> --sentinel`,
Debian ships no separate redis-sentinel binary) that monitors one primary with quorum 1 and
fast timeouts, and `RedisClusterNodes` runs a Cluster of N primaries made with
`redis-cli --cluster create`. `command()` sends one command to any of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from support.net import free_port

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def redis_server_bin() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not installed: run scripts/install-deps.sh")
    return path


class RedisServer:
    """One redis-server process. `url` is valid once started."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra_args = list(extra_args)  # more redis-server options, e.g. --replicaof h p
        # requirepass, and masterauth so that a replica with the same password can follow it.
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [
            *self._head(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--databases",
            "4",
            *self.extra_args,
        ]
        if self.password is not None:
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING:\n{self._log_tail()}")
            time.sleep(0.01)
        return self

    def _head(self) -> list[str]:
        """The start of the command line: the binary (and, for a sentinel, its config file)."""
        return [redis_server_bin()]

    def command(self, *args: str | int, timeout: float = 2.0) -> Any:
        """One command on a fresh connection, replies decoded to str (RESP2)."""
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            protocol=2,
            password=self.password,
        )
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def info(self, section: str) -> dict[str, str]:
        """INFO <section> as strings: role, master_link_status, master_repl_offset..."""
        return _fields(self.command("INFO", section))

    def cluster_info(self) -> dict[str, str]:
        """CLUSTER INFO as strings: cluster_state, cluster_known_nodes..."""
        return _fields(self.command("CLUSTER", "INFO"))

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # NOAUTH: a password
        except OSError:
            return False

    def flush(self) -> None:
        """FLUSHALL, so a test starts from an empty server without a restart."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            reply = sock.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL answered {reply!r}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        return ""

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, like a hung server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it lingers) and reap. Safe to call twice."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if self.paused:
                self.resume()  # a stopped process would not act on SIGTERM
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _fields(reply: Any) -> dict[str, str]:
    """An INFO-style reply (parsed to a dict by redis-py, or "key:value" lines) as strings."""
    if isinstance(reply, dict):
        return {str(key): str(value) for key, value in reply.items()}
    lines = str(reply).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))


def _cluster_ok(node: RedisServer) -> Callable[[], bool]:
    return lambda: node.cluster_info().get("cluster_state") == "ok"


def wait_for(
    what: str, ready: Callable[[], object], timeout: float = 10.0, interval: float = 0.05
) -> None:
    """Poll `ready()` until it is true; RuntimeError naming `what` after `timeout` seconds.

    Exceptions from `ready` (a node not answering yet) count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what} (last error: {last})")


class RedisSentinel(RedisServer):
    """A sentinel monitoring one primary as `service`, quorum 1, with fast failure detection.

    `down-after-milliseconds` 1000 and `failover-timeout` 3000 so that a test's failover takes
    seconds, not minutes. The config file lives in the temp dir: a sentinel rewrites it.
    """

    def __init__(
        self,
        directory: Path,
        primary_port: int,
        *,
        service: str = "mymaster",
        port: int | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
        primary_password: str | None = None,
    ) -> None:
        super().__init__(directory, port, password=password)  # the sentinel's own requirepass
        self.primary_port = primary_port
        self.primary_password = primary_password  # sentinel auth-pass: how it logs in to Redis
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def config_path(self) -> Path:
        return self.directory / "sentinel.conf"

    @property
    def url(self) -> str:
        return f"redis-sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def start(self) -> RedisSentinel:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():  # a restart keeps what the sentinel learned
            name = self.service
            self.config_path.write_text(
                f"sentinel monitor {name} 127.0.0.1 {self.primary_port} 1\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
            if self.primary_password is not None:
                with self.config_path.open("a") as conf:
                    conf.write(f"sentinel auth-pass {name} {self.primary_password}\n")
        super().start()
        return self

    def _head(self) -> list[str]:
        return [redis_server_bin(), str(self.config_path), "--sentinel"]

    def primary(self) -> tuple[str, int]:
        """The primary's address from SENTINEL MASTER, which is what redis-py's clients ask.

        Not GET-MASTER-ADDR-BY-NAME: during a failover that already names the promoted replica
        while SENTINEL MASTER still shows the old, down primary until the switch completes, and
        a client finds no primary in between.
        """
        fields = self.primary_fields()
        return fields["ip"], int(fields["port"])

    def primary_fields(self) -> dict[str, str]:
        """SENTINEL MASTER <service>: ip, port, flags (s_down, o_down, ...), failover-state..."""
        reply = self.command("SENTINEL", "MASTER", self.service)
        if isinstance(reply, dict):
            return {str(k): str(v) for k, v in reply.items()}
        return dict(zip(reply[::2], reply[1::2], strict=True))

    def replicas(self) -> list[dict[str, str]]:
        """SENTINEL REPLICAS: one dict of fields per replica the sentinel knows."""
        rows = self.command("SENTINEL", "REPLICAS", self.service)
        if rows and isinstance(rows[0], dict):
            return [{str(k): str(v) for k, v in row.items()} for row in rows]
        return [dict(zip(row[::2], row[1::2], strict=True)) for row in rows]

    def __enter__(self) -> RedisSentinel:
        return self.start()


class RedisClusterNodes:
    """A Redis Cluster of `size` primaries (no replicas), each a RedisServer in its own dir.

    Each node gets its own cluster config file and an explicit bus port (`cluster-port`),
    so a free data port near 65535 cannot push the default bus port (port + 10000) out of range.
    """

    def __init__(
        self,
        directory: Path,
        size: int = 3,
        *,
        node_timeout_ms: int = 2000,
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.password = password
        self.nodes: list[RedisServer] = []
        for index in range(size):
            node_dir = directory / f"node{index}"
            self.nodes.append(
                RedisServer(
                    node_dir,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-port",
                        str(free_port()),
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                    ],
                    password=password,
                )
            )

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis-cluster://{hosts}"

    def start(self) -> RedisClusterNodes:
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed: run scripts/install-deps.sh")
            done = subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                # redis-cli reads the password from the environment: not on a command line.
                env={**os.environ, **({"REDISCLI_AUTH": self.password} if self.password else {})},
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}"
                )
            for node in self.nodes:
                wait_for(f"cluster_state:ok on port {node.port}", _cluster_ok(node))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterNodes:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
