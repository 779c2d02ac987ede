"""limits.max_message_memory: what many slow senders of large messages can make a worker hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Certs, mx_config
from spamkiller.config import load
from spamkiller.errors import ConfigError
from support.mx import Mx
from support.net import RawClient
from support.upstream import RecordingUpstream

LIMITS = {"max_message_size": "1MiB", "max_message_memory": "2MiB"}


def in_data(port: int) -> RawClient:
    c = RawClient(port)
    c.reply()
    c.send(b"EHLO big.example\r\nMAIL FROM:<a@big.example>\r\nRCPT TO:<bob@example.com>\r\n")
    c.reply()
    assert c.code() == 250 and c.code() == 250
    c.send(b"DATA\r\n")
    return c


def test_memory_cap_refuses_new_data_and_cuts_the_session_that_passes_it(
    tmp_path: Path, certs: Certs
) -> None:
    config = mx_config(tmp_path, certs, upstream_port=0, limits=LIMITS)
    with RecordingUpstream() as up:
        config["upstream"]["port"] = up.port
        with Mx(tmp_path, config) as mx:
            a, b, c = in_data(mx.port()), in_data(mx.port()), in_data(mx.port())
            assert [a.code(), b.code(), c.code()] == [354, 354, 354]
            chunk = b"x" * 998 + b"\r\n"
            a.send(chunk * 900)  # about 0.9 MB held by a
            b.send(chunk * 900)  # about 1.8 MB held by a and b together
            assert a.nothing_more(0.3) == b"" and b.nothing_more(0.1) == b""
            c.send(chunk * 400)  # past 2 MiB: this session, not the others, is cut
            assert c.reply().startswith(b"421 4.3.1 Insufficient system storage")
            assert mx.log.wait_for("message memory exhausted"), "\n".join(mx.log.lines[-8:])
            # a and b hold over three quarters of the cap: a new DATA is refused up front.
            d = in_data(mx.port())
            assert d.reply().startswith(b"452 4.3.1 Insufficient system storage")
            # a and b finish normally, and the memory is theirs no longer.
            for s in (a, b):
                s.send(b".\r\n")
                assert s.reply().startswith(b"250 2.0.0 Message accepted")
            d.send(b"DATA\r\n")
            assert d.code() == 354
            d.send(b"small\r\n.\r\n")
            assert d.reply().startswith(b"250 2.0.0 Message accepted")
            for s in (a, b, c, d):
                s.close()
    assert len(up.messages) == 3


def test_memory_cap_below_the_message_size_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("limits: {max_message_size: 10MiB, max_message_memory: 5MiB}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert any(
        p.startswith("limits.max_message_memory: must be at least") for p in info.value.problems
    )
