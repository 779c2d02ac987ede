"""Shared helpers for the benchmark scripts (standard library only).

Processes, ports, CPU accounting from /proc, the smtp-sink wrapper, config and certificate
generation, tables and JSON results. Every failure that would make a figure meaningless raises
:class:`BenchError`; :func:`run_main` turns it into a clear message and exit status 1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

READY_TIMEOUT = 20.0
STOP_GRACE = 10.0


class BenchError(Exception):
    """A condition that makes the benchmark's figures meaningless: report it and exit 1."""


def run_main(main: Callable[[], int]) -> None:
    """Run a benchmark's main function; BenchError and Ctrl-C become a message and exit 1."""
    try:
        code = main()
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 1
    sys.exit(code)


# --- tools and ports ---------------------------------------------------------------------------


def require_tool(name: str) -> str:
    """Absolute path of a program on PATH, or a BenchError that says how to get it."""
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} not found on PATH: run scripts/install-deps.sh first")
    return path


def pin_prefix(cpu: int | None) -> list[str]:
    """`taskset -c CPU` to pin a command to one CPU, or nothing."""
    return [] if cpu is None else [require_tool("taskset"), "-c", str(cpu)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_python() -> str:
    """The project's venv interpreter if present (it has uvloop), else this interpreter."""
    candidate = REPO_ROOT / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def default_server_cmd() -> list[str]:
    """The spam-killer command line before `run -c CONFIG`."""
    script = REPO_ROOT / ".venv" / "bin" / "spam-killer"
    if script.exists():
        return [str(script)]
    return [venv_python(), "-m", "spamkiller"]


def expand_target(template: str, values: dict[str, str | int]) -> list[str]:
    """Split a --target command template and fill its {placeholders}."""
    try:
        return [part.format(**values) for part in shlex.split(template)]
    except KeyError as exc:
        known = ", ".join("{" + k + "}" for k in sorted(values))
        raise BenchError(f"--target uses unknown placeholder {exc}; known: {known}") from None


# --- CPU accounting ----------------------------------------------------------------------------


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime+stime, cutime+cstime) in clock ticks, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): ppid is field 4, utime..cstime are 14..17.
    ppid = int(fields[1])
    own = int(fields[11]) + int(fields[12])
    reaped = int(fields[13]) + int(fields[14])
    return ppid, own, reaped


def process_tree(root: int) -> list[int]:
    """The pid and all live descendants of `root`."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    tree: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of a process and its descendants, live or already reaped by them.

    Read from /proc/<pid>/stat (clock ticks, usually 10 ms): good enough over runs of seconds.
    A descendant that exited and was reaped during the run is counted through its parent's
    cutime/cstime; one that exited unreaped is lost, which a long-running server does not do.
    """
    ticks = 0
    for pid in process_tree(root):
        stat = _read_stat(pid)
        if stat is not None:
            ticks += stat[1] + stat[2]
    return ticks / CLK_TCK


def tree_runtime_seconds(root: int) -> float:
    """CPU time of the live threads of a process and its live descendants, in nanoseconds from
    /proc/<pid>/task/<tid>/schedstat: for short spans, where 10 ms ticks are too coarse. Reaped
    descendants are not counted, so it suits servers whose processes outlive the measurement."""
    total = 0
    for pid in process_tree(root):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return total / 1e9


def children_rusage_seconds() -> float:
    """User+system CPU of this process's reaped children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_rusage_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- managed processes -------------------------------------------------------------------------


class ManagedProcess:
    """A long-running child (server or sink) with its output in a log file.

    Started in its own session so that workers it forks can be killed as a group if SIGTERM does
    not end them; stopped with SIGTERM, then SIGKILL after STOP_GRACE seconds.
    """

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self._log: TextIO | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, capture_stdout: bool = False) -> ManagedProcess:
        """Start the command; its output goes to the log (stdout to a pipe if asked)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self._log.write(f"# {shlex.join(self.cmd)}\n")
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else self._log,
                stderr=self._log if capture_stdout else subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise BenchError(f"cannot start {self.name} ({shlex.join(self.cmd)}): {exc}") from exc
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} was not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last traceback in the log if there is one, else its last lines, indented."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        all_lines = text.splitlines()
        starts = [i for i, line in enumerate(all_lines) if line.startswith("Traceback")]
        shown = all_lines[starts[-1] : starts[-1] + 30] if starts else all_lines[-lines:]
        return "\n".join("    " + line for line in shown)

    def check_alive(self) -> None:
        if not self.alive():
            code = self.proc.returncode if self.proc is not None else None
            raise BenchError(
                f"{self.name} exited (status {code}); log {self.log_path}:\n{self.log_tail()}"
            )

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def stop(self) -> int | None:
        """SIGTERM, wait up to STOP_GRACE, then SIGKILL the process group. Returns the status."""
        if self.proc is None:
            return None
        pid = self.proc.pid
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_exited(pid, STOP_GRACE):
                print(f"  {self.name} ignored SIGTERM for {STOP_GRACE:.0f} s: SIGKILL", flush=True)
        # Workers left behind by a server that died or ignored SIGTERM share its process group.
        # The group id is only signalled while a member (a worker, or the leader not yet reaped)
        # still holds the number, so that it cannot have been reused by an unrelated process.
        if _group_has_members(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait until child `pid` has exited, without reaping it; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _group_has_members(pgid: int) -> bool:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name: state, ppid, pgrp, ...
        if int(raw[raw.rindex(")") + 2 :].split()[2]) == pgid:
            return True
    return False


def wait_smtp_ready(
    host: str,
    port: int,
    proc: ManagedProcess | None = None,
    timeout: float = READY_TIMEOUT,
    *,
    send_first: bytes = b"",
) -> float:
    """Connect until the listener greets with 220; returns the seconds it took.

    `send_first` is written right after connecting, before the banner is awaited: a listener
    with `proxy_protocol: true` only greets once it has read a PROXY header.
    """
    start = time.monotonic()
    deadline = start + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check_alive()
        try:
            with socket.create_connection((host, port), timeout=2.0) as sock:
                if send_first:
                    sock.sendall(send_first)
                banner = sock.recv(512)
                if banner.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
                        sock.recv(512)
                    return time.monotonic() - start
                last_error = f"greeting {banner[:60]!r}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.05)
    name = proc.name if proc is not None else f"{host}:{port}"
    tail = f"\n  log {proc.log_path}:\n{proc.log_tail()}" if proc is not None else ""
    raise BenchError(
        f"{name} did not answer 220 on {host}:{port} within {timeout:.0f} s ({last_error}){tail}"
    )


# --- smtp-sink ---------------------------------------------------------------------------------


class Sink(ManagedProcess):
    """postfix's smtp-sink, counting what it receives (-c) so that lost mail shows.

    With -c it rewrites a counter "sess=N quit=N mesg=N" followed by a carriage return on stdout
    each time a session ends, QUIT is executed or "." is received. A thread reads that stream
    from a pipe and keeps the last count (a file would grow by tens of MB per run); the final
    counter is written to the log when smtp-sink exits.
    """

    def __init__(
        self, port: int, log_path: Path, backlog: int = 1000, cpu: int | None = None
    ) -> None:
        cmd = [*pin_prefix(cpu), require_tool("smtp-sink"), "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        cmd += [f"127.0.0.1:{port}", str(backlog)]
        super().__init__("smtp-sink", cmd, log_path)
        self.port = port
        self._count = 0
        self._reader: threading.Thread | None = None

    def start(self, capture_stdout: bool = True) -> Sink:
        """Start smtp-sink; its stdout is always captured, whatever `capture_stdout` says."""
        super().start(capture_stdout=True)
        assert self.proc is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):  # more slack before a slow reader could stall it
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        self._reader = threading.Thread(
            target=self._read_counters, args=(self.proc.stdout,), daemon=True
        )
        self._reader.start()
        return self

    def _read_counters(self, stream: IO[bytes]) -> None:
        carry = b""
        last_line = b""
        while True:
            chunk = os.read(stream.fileno(), 1 << 16)
            if not chunk:
                break
            data = carry + chunk
            count = _last_complete_count(data)
            if count is not None:
                self._count = count
            carry = data[-64:]
            last_line = data[-200:]
        final = last_line.decode(errors="replace").split("\r")
        with contextlib.suppress(OSError), self.log_path.open("a") as log:
            complete = [line for line in final if line.strip()]
            log.write(f"final counter: {complete[-1] if complete else 'none'}\n")

    def stop(self) -> int | None:
        code = super().stop()
        if self._reader is not None:
            self._reader.join(5)
        return code

    def messages(self) -> int:
        """Messages received so far (the last complete counter on its stdout)."""
        return self._count

    def wait_messages(self, expected: int, timeout: float = 5.0) -> int:
        """Poll until the counter reaches `expected` (or timeout); returns the last count."""
        deadline = time.monotonic() + timeout
        while self._count < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._count


def _last_complete_count(data: bytes) -> int | None:
    """N of the last "mesg=N" in `data` that is followed by something other than a digit."""
    end = len(data)
    while True:
        start = data.rfind(b"mesg=", 0, end)
        if start < 0:
            return None
        digits = start + len(b"mesg=")
        stop = digits
        while stop < len(data) and 48 <= data[stop] <= 57:
            stop += 1
        if digits < stop < len(data):
            return int(data[digits:stop])
        end = start


# --- configuration and certificates ------------------------------------------------------------


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid double-quoted YAML scalar


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for nested dicts, lists and scalars (all the configs here need)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines.append(to_yaml(item, indent + 2))
            elif isinstance(item, dict | list):
                lines.append(f"{pad}{key}: {'{}' if isinstance(item, dict) else '[]'}")
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = to_yaml(item, indent + 2).splitlines()
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    else:
        lines.append(pad + _yaml_scalar(value))
    return "\n".join(lines)


def server_config(
    *,
    port: int,
    upstream_port: int,
    workers: int,
    data_dir: Path,
    tls_cert: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """The spam-killer configuration the benchmarks run: one listener relaying to smtp-sink."""
    listener: dict[str, Any] = {
        "name": "bench",
        "address": "127.0.0.1",
        "port": port,
        "tls": "starttls" if tls_cert is not None else "none",
    }
    config: dict[str, Any] = {
        "hostname": "mx.bench.test",
        "domains": ["bench.test"],
        "listeners": [listener],
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "use_tls": False},
        "dev_upstream": {"enabled": False},
        "workers": workers,
        "data_dir": str(data_dir),
        # Every benchmark client comes from 127.0.0.1: the per-address default (20) would
        # answer 421 to the 50-session cells.
        "limits": {"max_connections": 1000, "max_connections_per_ip": 1000},
    }
    if tls_cert is not None:
        config["tls"] = {"certificates": [{"cert": str(tls_cert[0]), "key": str(tls_cert[1])}]}
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(to_yaml(config) + "\n")
    return path


def make_rsa_cert(directory: Path, name: str = "mx.bench.test") -> tuple[Path, Path]:
    """A self-signed RSA-2048 certificate and key made with openssl; returns (cert, key)."""
    cert, key = directory / "bench-rsa.pem", directory / "bench-rsa.key"
    cmd = [
        require_tool("openssl"),
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "7",
        "-subj",
        f"/CN={name}",
        "-addext",
        f"subjectAltName=DNS:{name}",
        "-keyout",
        str(key),
        "-out",
        str(cert),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"openssl req failed: {result.stderr.strip()}")
    return cert, key


# --- load generators ---------------------------------------------------------------------------


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` in `parts` whole shares that differ by at most one (the first ones larger)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_generators(commands: Sequence[Sequence[str]], timeout: float) -> list[Any]:
    """Start one generator process per command, all at once; wait for all of them and return
    what each printed on stdout, parsed as JSON. A generator that fails is a BenchError with its
    stderr."""
    children = [
        subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=timeout)
        if child.returncode != 0:
            raise BenchError(f"load generator failed (status {child.returncode}):\n{err}")
        outputs.append(json.loads(out))
    return outputs


# --- results -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table; the first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [cell.rjust(widths[i + 1]) for i, cell in enumerate(cells[1:])]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        postfix = Path("/opt/spam-killer-deps/cache").glob("postfix_*.deb")
        postfix_version = sorted(p.name for p in postfix)[-1].split("_")[1]
    except (IndexError, OSError):
        postfix_version = "unknown"
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": _first_line([shutil.which("openssl") or "openssl", "version"]),
        "postfix_tools": postfix_version,
        "loadavg_at_start": os.getloadavg(),
    }


def finish_machine_info(info: dict[str, Any]) -> dict[str, Any]:
    """`info` from machine_info() at the start, plus the load average at the end."""
    return {**info, "loadavg_at_end": os.getloadavg()}


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write JSON to bench/results/<name>-<UTC time>-<pid>.json and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{_stamp()}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def run_dir(name: str) -> Path:
    """A fresh directory under bench/results/ for one run's logs, configs and certificates."""
    path = RESULTS_DIR / f"{name}-{_stamp()}.d"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def managed(*procs: ManagedProcess) -> Iterator[None]:
    """Stop the given processes (in reverse order) however the block ends."""
    try:
        yield
    finally:
        for proc in reversed(procs):
            proc.stop()
