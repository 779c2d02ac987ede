"""`spam-killer` as an admin runs it: a real process, real signals, real config files."""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Certs, mx_config
from support.net import RawClient, free_port, wait_port
from support.upstream import RecordingUpstream

CLI = [sys.executable, "-m", "spamkiller"]
MESSAGE = b"Subject: process test\r\n\r\nhello\r\n"


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def running(config_file: Path | None, cwd: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    args = [*CLI, "run"] + (["-c", str(config_file)] if config_file else [])
    log = open(cwd / "mx.log", "w")  # noqa: SIM115 -- closed in finally, read by the tests
    proc = subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, timeout=20)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def log_of(cwd: Path) -> str:
    return (cwd / "mx.log").read_text()


def test_check_config_accepts_a_good_file(tmp_path: Path, certs: Certs) -> None:
    path = write_config(tmp_path / "ok.yaml", mx_config(tmp_path, certs, upstream_port=2526))
    out = subprocess.run([*CLI, "check-config", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{path}: ok"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"listeners": [{"name": "mx", "port": 25, "bogus": 1}]}, "listeners.0.bogus: unknown key"),
        ({"listeners": [{"name": "mx", "port": 99999}]}, "listeners.0.port: "),
        ({"upstream": {"port": 25, "timeout": "soon"}}, "upstream.timeout: "),
        (
            {
                "tls": {
                    "certificates": [{"cert": "/nonexistent/c.pem", "key": "/nonexistent/c.key"}]
                }
            },
            "/nonexistent/c.pem",
        ),
        ({"state": "sqlite:////dev/null/sk/state.db"}, "state: "),
        ({"state": "postgres://db/sk"}, "state: must start with sqlite:///"),
        ({"greylist": {"delay": "3d"}}, "greylist.delay: must be shorter than retry_window"),
        ({"rate_limits": {"connections_per_ip": "lots"}}, "rate_limits.connections_per_ip: "),
        ({"tarpit": {"delay": "2m"}}, "tarpit.delay: must be at most 1m"),
    ],
)
def test_check_config_names_the_key_and_exits_1(
    tmp_path: Path, certs: Certs, change: dict[str, Any], expected: str
) -> None:
    config = mx_config(tmp_path, certs, upstream_port=2526)
    config.update(change)
    path = write_config(tmp_path / "bad.yaml", config)
    for command in (["check-config", "-c", str(path)], ["run", "-c", str(path)]):
        out = subprocess.run([*CLI, *command], capture_output=True, text=True, timeout=30)
        assert out.returncode == 1
        assert expected in out.stderr, out.stderr
        assert "Traceback" not in out.stderr + out.stdout


def test_key_that_does_not_match_its_certificate_is_named(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(tmp_path, certs, upstream_port=2526)
    config["tls"]["certificates"] = [{"cert": str(certs.rsa[0]), "key": str(certs.ecdsa[1])}]
    path = write_config(tmp_path / "mismatch.yaml", config)
    out = subprocess.run([*CLI, "check-config", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "tls.certificates.0.key" in out.stderr and str(certs.ecdsa[1]) in out.stderr
    assert "Traceback" not in out.stderr


def test_quick_start_defaults_deliver_to_the_dev_maildir(tmp_path: Path) -> None:
    """`spam-killer run` with no config: self-signed certificate, dev upstream, Maildir."""
    with running(None, tmp_path, 2525):
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as smtp:
            smtp.ehlo("newcomer.example")
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the first-run certificate is self-signed
            smtp.starttls(context=ctx)
            smtp.ehlo("newcomer.example")
            assert smtp.sendmail("me@newcomer.example", ["postmaster@localhost"], MESSAGE) == {}
        new = tmp_path / "spam-killer-data" / "maildir" / "new"
        files = list(new.iterdir())
        assert len(files) == 1
        stored = files[0].read_bytes()
        assert stored.startswith(
            b"Return-Path: <me@newcomer.example>\r\nReceived: from newcomer.example"
        )
        assert stored.endswith(MESSAGE)
    assert (tmp_path / "spam-killer-data" / "tls" / "selfsigned.pem").exists()


def test_sigterm_drains_sessions_and_turns_new_ones_away(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up:
        config = mx_config(tmp_path, certs, upstream_port=up.port, shutdown_timeout="10s")
        path = write_config(tmp_path / "c.yaml", config)
        port = config["listeners"][0]["port"]
        with running(path, tmp_path, port) as proc:
            smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
            smtp.ehlo("c.example")
            smtp.mail("a@sender.example")
            assert smtp.rcpt("bob@example.com")[0] == 250
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            # A new connection is answered 421 while the old session finishes.
            with RawClient(port) as late:
                assert late.reply().startswith(b"421 4.3.2 ")
            assert smtp.data(MESSAGE)[0] == 250
            # The next transaction on the old session is turned away too.
            assert smtp.mail("a@sender.example")[0] == 421
            smtp.close()
            assert proc.wait(15) == 0
        assert len(up.messages) == 1


def test_sighup_reloads_certificates_and_refuses_a_bad_config(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(tmp_path, certs, upstream_port=free_port())
    config["tls"]["certificates"] = [{"cert": str(certs.rsa[0]), "key": str(certs.rsa[1])}]
    path = write_config(tmp_path / "c.yaml", config)
    port = config["listeners"][0]["port"]

    def served_cert_names() -> list[str]:
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        ctx.check_hostname = False
        raw = RawClient(port)
        raw.reply()
        raw.send(b"EHLO c.example\r\nSTARTTLS\r\n")
        raw.reply()
        raw.reply()
        with ctx.wrap_socket(raw.sock) as s:
            cert = s.getpeercert()
        assert cert is not None
        return [value for _, value in cert["subjectAltName"]]  # type: ignore[misc]

    with running(path, tmp_path, port) as proc:
        assert "mx.test.example" in served_cert_names()
        config["tls"]["certificates"] = [
            {"cert": str(certs.other_name[0]), "key": str(certs.other_name[1])}
        ]
        write_config(path, config)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload status=ok" not in log_of(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served_cert_names() == ["other.test.example"]
        path.write_text("listeners: [{name: mx, port: 0}]\nbogus: true\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "status=refused" not in log_of(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "bogus: unknown key" in log_of(tmp_path)
        assert served_cert_names() == ["other.test.example"]  # still serving the last good config
        assert proc.poll() is None


def test_two_workers_share_the_port(tmp_path: Path, certs: Certs) -> None:
    with RecordingUpstream() as up:
        config = mx_config(tmp_path, certs, upstream_port=up.port, workers=2)
        path = write_config(tmp_path / "c.yaml", config)
        port = config["listeners"][0]["port"]
        with running(path, tmp_path, port) as proc:
            deadline = time.monotonic() + 20
            while log_of(tmp_path).count(" listen ") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # both workers bound before we count who serves
            for i in range(20):
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    assert smtp.sendmail("a@sender.example", [f"u{i}@example.com"], MESSAGE) == {}
            deadline = time.monotonic() + 5
            pids: set[str] = set()
            while len(pids) < 2 and time.monotonic() < deadline:
                pids = {
                    line.split("sk[")[1].split("]")[0]
                    for line in log_of(tmp_path).splitlines()
                    if " message " in line
                }
                time.sleep(0.05)
            assert len(up.messages) == 20
            assert proc.pid not in {int(p) for p in pids}  # the parent only supervises
            assert len(pids) == 2, "both workers should have taken connections"
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(15) == 0


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(tmp_path, certs, upstream_port=free_port(), workers=2)
    path = write_config(tmp_path / "c.yaml", config)
    port = config["listeners"][0]["port"]
    with running(path, tmp_path, port) as proc:
        deadline = time.monotonic() + 20
        while log_of(tmp_path).count(" listen ") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = {
            int(line.split("sk[")[1].split("]")[0])
            for line in log_of(tmp_path).splitlines()
            if " listen " in line
        }
        assert len(workers) == 2
        proc.kill()  # SIGKILL: the supervisor gets no chance to forward anything
        proc.wait()
        deadline = time.monotonic() + 10
        alive = set(workers)
        while alive and time.monotonic() < deadline:
            for pid in list(alive):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    alive.discard(pid)
            time.sleep(0.1)
        assert not alive, f"orphaned workers still running: {alive}"
