"""Timeouts over real sockets: idle commands, a DATA drip below the minimum rate, slow but fair."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Certs, mx_config
from support.mx import Mx
from support.net import RawClient
from support.upstream import RecordingUpstream


def test_idle_client_gets_421_after_command_timeout(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(tmp_path, certs, upstream_port=1, limits={"command_timeout": "1s"})
    with Mx(tmp_path, config) as mx, RawClient(mx.port()) as c:
        c.reply()
        started = time.monotonic()
        assert c.reply().startswith(b"421 4.4.2 Timeout")
        assert time.monotonic() - started >= 0.9
        assert c.nothing_more() == b""  # and the connection is closed
        assert mx.log.wait_for("reason=timeout")


def test_data_drip_below_min_data_rate_is_cut_off(tmp_path: Path, certs: Certs) -> None:
    limits = {"data_timeout": "2s", "min_data_rate": 500}
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port, limits=limits)) as mx,
        RawClient(mx.port(), timeout=10) as c,
    ):
        c.reply()
        c.send(b"EHLO drip.example\r\n")
        c.reply()
        c.send(b"MAIL FROM:<a@drip.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        assert [c.code(), c.code(), c.code()] == [250, 250, 354]
        started = time.monotonic()
        cut = b""
        # Each byte comes well inside data_timeout, so only the rate can end this.
        for _ in range(40):
            try:
                c.send(b"x")
            except OSError:
                break
            cut = c.nothing_more(0.25)
            if cut:
                break
        elapsed = time.monotonic() - started
        assert cut.startswith(b"421 4.4.2 Timeout"), cut
        assert 1.8 < elapsed < 6
    assert not up.messages
    assert mx.log.wait_for("reason=timeout")


def test_slow_but_steady_message_is_not_cut(tmp_path: Path, certs: Certs) -> None:
    limits = {"data_timeout": "2s", "min_data_rate": 500}
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port, limits=limits)) as mx,
        RawClient(mx.port(), timeout=10) as c,
    ):
        c.reply()
        c.send(b"EHLO slow.example\r\n")
        c.reply()
        c.send(b"MAIL FROM:<a@slow.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        assert [c.code(), c.code(), c.code()] == [250, 250, 354]
        # 3 s in all, 1,000 bytes each 0.5 s: 2,000 bytes/s, well above the minimum rate.
        for _ in range(6):
            c.send(b"y" * 998 + b"\r\n")
            time.sleep(0.5)
        c.send(b".\r\n")
        assert c.reply().startswith(b"250 2.0.0 Message accepted")
    assert len(up.messages) == 1
