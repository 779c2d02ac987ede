"""Checks and policy over a real socket: findings count at RCPT time, with the envelope logged."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path

from conftest import Certs, mx_config
from support.mx import Mx
from support.upstream import RecordingUpstream

MESSAGE = b"Subject: checks\r\n\r\nhello\r\n"


def test_helo_claiming_our_name_is_scored_and_rejected_at_rcpt(
    tmp_path: Path, certs: Certs
) -> None:
    policy = {"thresholds": {"tag": 2.0, "reject": 5.0}}
    with RecordingUpstream() as up:
        config = mx_config(tmp_path, certs, upstream_port=up.port, policy=policy)
        with Mx(tmp_path, config) as mx, smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            assert smtp.ehlo("mx.test.example")[0] == 250  # our own hostname: noted, not refused
            assert smtp.mail("forger@sender.example")[0] == 250
            code, text = smtp.rcpt("bob@example.com")
            assert code == 550 and text.startswith(b"5.7.1 Rejected by policy (id ")
            assert mx.log.wait_for(
                "reject",
                "stage=rcpt",
                "from=<forger@sender.example>",
                "to=<bob@example.com>",
                "score=5",
                "rules=HELO_IS_OURS(5)",
            )
            # An honest HELO on the same connection starts afresh.
            assert smtp.ehlo("mail.sender.example")[0] == 250
            assert smtp.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
    assert up.connections == 1 and len(up.messages) == 1


def _tls(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_file))


def test_helo_findings_survive_starttls_and_a_new_name_replaces_them(
    tmp_path: Path, certs: Certs
) -> None:
    """The EHLO after STARTTLS repeats the name: its findings stand (they are kept, not judged
    again); a different name after STARTTLS is judged afresh."""
    policy = {"thresholds": {"tag": 2.0, "reject": 5.0}}
    with RecordingUpstream() as up:
        config = mx_config(tmp_path, certs, upstream_port=up.port, policy=policy)
        with Mx(tmp_path, config) as mx:
            with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
                smtp.ehlo("mx.test.example")
                smtp.starttls(context=_tls(certs))
                assert smtp.ehlo("mx.test.example")[0] == 250
                assert smtp.mail("forger@sender.example")[0] == 250
                assert smtp.rcpt("bob@example.com")[0] == 550
            assert mx.log.wait_for("reject", "stage=rcpt", "rules=HELO_IS_OURS(5)")
            with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
                smtp.ehlo("mx.test.example")
                smtp.starttls(context=_tls(certs))
                assert smtp.ehlo("mail.sender.example")[0] == 250
                assert smtp.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
    assert len(up.messages) == 1


def test_score_below_reject_is_logged_with_the_message(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
        smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp,
    ):
        smtp.ehlo("dsl-203-0-113-7.isp.example")
        assert smtp.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
        assert mx.log.wait_for("status=sent", "score=1.5", "rules=HELO_DYNAMIC(1.5)")
    assert len(up.messages) == 1


def test_disabled_check_reports_nothing(tmp_path: Path, certs: Certs) -> None:
    policy = {"thresholds": {"tag": 1.0, "reject": 1.0}}
    with RecordingUpstream() as up:
        config = mx_config(
            tmp_path,
            certs,
            upstream_port=up.port,
            policy=policy,
            checks={"helo": {"enabled": False}},
        )
        with Mx(tmp_path, config) as mx, smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp.ehlo("localhost")
            assert smtp.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
            assert mx.log.wait_for("status=sent")
            assert not mx.log.find("rules=")
    assert len(up.messages) == 1
