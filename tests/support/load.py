"""Helpers for load and crash tests: the MX as a killable process, RSS, floods of sockets.

`MxProcess` runs `spam-killer run` (one worker, so the process we start is the one serving) and
can be killed with SIGKILL and started again on the same port. `KillingUpstream` is a recording
upstream that calls a hook after it has recorded a message and before it sends its 250, which is
how a test kills the MX inside the "both hold it" window.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from support.net import RawClient
from support.upstream import Received, RecordingUpstream

CLI = [sys.executable, "-m", "spamkiller"]


def proc_status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS: resident now, VmHWM: the peak so far)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mib(pid: int) -> float:
    return proc_status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    return proc_status_kib(pid, "VmHWM") / 1024


class RssSampler:
    """Samples a process's VmRSS in a thread while a test runs: `with RssSampler(pid) as s:`."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_mib(self.pid))
            except (OSError, KeyError):  # the process is gone
                return
            self._stop.wait(self.every)

    @property
    def peak(self) -> float:
        return max(self.samples, default=0.0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class MxProcess:
    """`spam-killer run -c FILE` in `cwd`; `kill9()` and `start()` again on the same port."""

    def __init__(self, cwd: Path, config: dict[str, Any]) -> None:
        self.cwd = cwd
        self.config = config
        self.port = int(config["listeners"][0]["port"])
        self.path = cwd / "spam-killer.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self._log: Any = None
        # kill9() may run in another thread (an upstream hook): whoever kills holds this until the
        # process is reaped, so start() and alive() never see a dead process as still running.
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        with self._lock:
            return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with self._lock:
            assert self.proc is None or self.proc.poll() is not None, "still running"
            self._start()

    def _start(self) -> None:
        self.starts += 1
        if self._log is None:
            self._log = open(self.cwd / "mx.log", "ab")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [*CLI, "run", "-c", str(self.path)],
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"spam-killer run exited early:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self._stop()
                    raise
                time.sleep(0.02)

    def kill9(self) -> None:
        """SIGKILL, and wait until the process is reaped: after this nothing of it runs."""
        with self._lock:
            assert self.proc is not None
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.kills += 1
            self.proc.wait(10)

    def log(self) -> str:
        return (self.cwd / "mx.log").read_text(errors="replace")

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MxProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _HookedMessages(list[Received]):
    """The upstream's message list; `on_record` runs after a message is recorded."""

    on_record: Callable[[Received], None] | None = None

    def append(self, item: Received) -> None:
        super().append(item)
        hook = self.on_record
        if hook is not None:
            hook(item)


class KillingUpstream(RecordingUpstream):
    """A recording upstream whose `on_record(message)` runs before the 250 goes back.

    RecordingUpstream appends a message to `messages` and only then answers the final dot, so a
    hook here sits exactly between "the upstream holds the message" and "the relay heard 250".
    The hook runs in the upstream's connection thread and blocks that reply until it returns.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.messages = _HookedMessages()

    def __enter__(self) -> KillingUpstream:
        super().__enter__()
        return self

    def arm(self, hook: Callable[[Received], None] | None) -> None:
        assert isinstance(self.messages, _HookedMessages)
        self.messages.on_record = hook


class BoundClient(RawClient):
    """A RawClient whose socket comes from `source` (127.0.0.2 is 'another IP' on loopback)."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.buf = b""


def open_idle(port: int, count: int, source: str = "127.0.0.1") -> list[BoundClient]:
    """`count` connections that read their greeting and then say nothing; each must get 220."""
    clients: list[BoundClient] = []
    try:
        for _ in range(count):
            clients.append(BoundClient(port, source))
        for c in clients:
            greeting = c.reply()
            assert greeting.startswith(b"220 "), greeting
    except BaseException:
        close_all(clients)
        raise
    return clients


def close_all(clients: list[Any]) -> None:
    for c in clients:
        with contextlib.suppress(OSError):
            c.close()


def wait_admitted(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> float:
    """Connect until the greeting is a 220 (counts released); seconds it took."""
    started = time.monotonic()
    while True:
        with BoundClient(port, source) as c:
            greeting = c.reply()
        if greeting.startswith(b"220 "):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"still refused after {timeout}s: {greeting!r}")
        time.sleep(0.05)


def client_hello() -> bytes:
    """A complete TLS ClientHello, as a client would send it first (no server needed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for a ServerHello that never comes
        obj.do_handshake()
    return outgoing.read()


def smtp_transaction(
    c: RawClient, body: bytes, sender: str = "a@load.example", rcpt: str = "bob@example.com"
) -> bytes:
    """EHLO, MAIL, RCPT, DATA, the body and the dot on a greeted client; the final reply."""
    c.send(b"EHLO load.example\r\n")
    assert c.reply().startswith(b"250"), "EHLO"
    c.send(f"MAIL FROM:<{sender}>\r\n".encode())
    assert c.code() == 250
    c.send(f"RCPT TO:<{rcpt}>\r\n".encode())
    assert c.code() == 250
    c.send(b"DATA\r\n")
    assert c.code() == 354
    c.send(body + b".\r\n")
    return c.reply()
