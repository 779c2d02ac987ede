"""nmap's smtp-open-relay script (Debian nmap) against a real MX: its 16 relay tests find nothing.

The script connects, sends EHLO, then for each of its 16 sender/recipient pairs RSET, MAIL FROM and
RCPT TO, and counts the RCPTs answered 2xx. Its pairs are the classic relay tricks: the null sender,
`user%domain@[ip]`, `"user@domain"`, `user@domain@[ip]`, `@[ip]:user@domain`, `domain!user` and
so on (see /usr/share/nmap/scripts/smtp-open-relay.nse).

Two things about running it here:
- Its portrule only matches ports 25, 465 and 587 or a port whose service was detected as SMTP; on
  a free high port the script is silently skipped unless forced with `--script +smtp-open-relay`.
- It talks plaintext SMTP (no STARTTLS), so the STARTTLS listener is tested in plaintext, as a
  relay scanner on the internet would.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Certs, mx_config
from support.mx import Mx
from support.net import free_port
from support.upstream import RecordingUpstream

NOT_A_RELAY = "Server doesn't seem to be an open relay, all tests failed"
_PORT_LINE = re.compile(r"(\d+)/tcp\s+(\S+)")


@pytest.fixture()
def nmap() -> str:
    path = shutil.which("nmap")
    if path is None:
        pytest.fail("nmap is not installed: run scripts/install-deps.sh")
    return path


def listeners() -> list[dict[str, Any]]:
    return [
        {"name": "mx", "address": "127.0.0.1", "port": free_port(), "tls": "starttls"},
        {"name": "plain", "address": "127.0.0.1", "port": free_port(), "tls": "none"},
    ]


def run_open_relay(nmap: str, ports: list[int], domain: str) -> tuple[dict[int, list[str]], str]:
    """Run the script against `ports`; its output lines per port, and nmap's whole output."""
    args = [
        nmap,
        "-n",  # no DNS
        "-Pn",  # no host discovery
        "-sT",  # plain connect scan, no raw sockets
        "-vv",  # the script lists every pair that relayed
        "-p",
        ",".join(map(str, ports)),
        "--script",
        "+smtp-open-relay",  # "+": run even though the portrule does not match a high port
        "--script-args",
        f"smtp-open-relay.domain={domain},smtp-open-relay.ip=127.0.0.1",
        "--script-timeout",
        "20s",
        "127.0.0.1",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    results: dict[int, list[str]] = {}
    port: int | None = None
    for line in done.stdout.splitlines():
        if m := _PORT_LINE.match(line):
            port = int(m.group(1))
        elif line.startswith("|") and port is not None:
            body = line[2:].strip()  # after "| " or "|_"
            results.setdefault(port, []).append(body.removeprefix("smtp-open-relay: "))
        else:
            port = None
    return results, text


def rcpt_tallies(mx: Mx, wanted: int) -> dict[str, list[str]]:
    """Listener name -> the `rcpt=ok/total` tallies of its sessions, from the MX's log lines.

    Waits (briefly) until `wanted` sessions have logged their disconnect line.
    """
    deadline = time.monotonic() + 5
    while len(mx.log.find(": disconnect ", " rcpt=")) < wanted and time.monotonic() < deadline:
        time.sleep(0.02)
    listener_of: dict[str, str] = {}
    for line in mx.log.find(": connect ", " listener="):
        listener_of[line.split(": ")[1]] = line.split(" listener=")[1].split()[0]
    tallies: dict[str, list[str]] = {}
    for line in mx.log.find(": disconnect ", " rcpt="):
        sid = line.split(": ")[1]
        tallies.setdefault(listener_of.get(sid, "?"), []).append(line.split(" rcpt=")[1].split()[0])
    return tallies


def upstream_count(up: RecordingUpstream, needle: bytes) -> int:
    return sum(raw.count(needle) for raw in up.raw)


def test_nmap_smtp_open_relay_finds_no_relay_on_starttls_and_plaintext_listeners(
    tmp_path: Path, certs: Certs, nmap: str
) -> None:
    config_listeners = listeners()
    with RecordingUpstream() as up:
        # nmap tries to relay to its `domain` argument, example.com: not one of ours here.
        config = mx_config(
            tmp_path,
            certs,
            upstream_port=up.port,
            listeners=config_listeners,
            domains=["example.org"],
        )
        with Mx(tmp_path, config) as mx:
            ports = [entry["port"] for entry in config_listeners]
            results, text = run_open_relay(nmap, ports, "example.com")
            for port in ports:
                assert results.get(port) == [NOT_A_RELAY], (port, text)
            # All 16 tests reached RCPT on each listener, and every RCPT was refused.
            tallies = rcpt_tallies(mx, wanted=2)
            assert tallies == {"mx": ["0/16"], "plain": ["0/16"]}, (tallies, mx.log.lines)
    assert up.messages == []
    assert upstream_count(up, b"RCPT") == 0, up.raw


def test_nmap_with_our_own_domain_finds_only_plain_local_recipients(
    tmp_path: Path, certs: Certs, nmap: str
) -> None:
    # Control: with nmap's domain one of ours, its 4 plain pairs (relaytest@example.org from four
    # senders) are local deliveries and accepted. This shows that the script does reach RCPT here
    # and that the parsing above sees a positive result; the 12 address tricks are refused all the
    # same, even toward our own domain.
    config_listeners = listeners()
    with RecordingUpstream() as up:
        config = mx_config(
            tmp_path,
            certs,
            upstream_port=up.port,
            listeners=config_listeners,
            domains=["example.org"],
        )
        with Mx(tmp_path, config) as mx:
            ports = [entry["port"] for entry in config_listeners]
            results, text = run_open_relay(nmap, ports, "example.org")
            for port in ports:
                lines = results.get(port, [])
                assert lines[:1] == ["Server is an open relay (4/16 tests)"], (port, text)
                accepted = [line.split(" -> ")[-1] for line in lines[1:]]
                assert accepted == ["RCPT TO:<relaytest@example.org>"] * 4, (port, text)
            tallies = rcpt_tallies(mx, wanted=2)
            assert tallies == {"mx": ["4/16"], "plain": ["4/16"]}, (tallies, mx.log.lines)
    assert up.messages == []  # nmap never sends DATA
    assert upstream_count(up, b"RCPT TO:") == 8, up.raw
    assert upstream_count(up, b"RCPT TO:<relaytest@example.org>") == 8, up.raw
