"""TLS on our listeners over real sockets, with real clients (ssl, smtplib, openssl, swaks)."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import Certs, mx_config
from spamkiller.tls.certs import spki_pin
from support.mx import Mx
from support.net import RawClient, free_port
from support.upstream import RecordingUpstream

MESSAGE = b"Subject: tls\r\n\r\nhello\r\n"


def listener(tls: str = "starttls", **extra: Any) -> dict[str, Any]:
    return {"name": "mx", "address": "127.0.0.1", "port": free_port(), "tls": tls} | extra


def starttls_socket(
    port: int, ctx: ssl.SSLContext, server_hostname: str | None = None
) -> ssl.SSLSocket:
    """Plain connect, EHLO, STARTTLS, then the handshake: the socket after TLS is up."""
    raw = RawClient(port)
    raw.reply()
    raw.send(b"EHLO c.example\r\n")
    raw.reply()
    raw.send(b"STARTTLS\r\n")
    assert raw.reply().startswith(b"220 ")
    try:
        return ctx.wrap_socket(raw.sock, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def peer_key(sock: ssl.SSLSocket) -> object:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).public_key()


def test_rsa_and_ecdsa_both_served_by_client_support(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        for cipher, key_type in (
            ("ECDHE-ECDSA-AES128-GCM-SHA256", ec.EllipticCurvePublicKey),
            ("ECDHE-RSA-AES128-GCM-SHA256", rsa.RSAPublicKey),
        ):
            ctx = ssl.create_default_context(cafile=str(certs.ca_file))
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(cipher)
            with starttls_socket(mx.port(), ctx, "mx.test.example") as s:
                assert s.version() == "TLSv1.2"
                assert s.cipher()[0] == cipher  # type: ignore[index]
                assert isinstance(peer_key(s), key_type)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_before_1_2_is_refused(tmp_path: Path, certs: Certs, version: str) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # let the client really try the old version
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            starttls_socket(mx.port(), ctx).close()


def test_openssl_s_client_starttls(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        out = subprocess.run(
            [
                "openssl",
                "s_client",
                "-starttls",
                "smtp",
                "-connect",
                f"127.0.0.1:{mx.port()}",
                "-CAfile",
                str(certs.ca_file),
                "-servername",
                "mx.test.example",
                "-brief",
            ],
            input=b"QUIT\r\n",
            capture_output=True,
            timeout=20,
        )
        text = (out.stdout + out.stderr).decode()
        assert "Protocol version: TLSv1.3" in text
        assert "Verification: OK" in text
        for old in ("-tls1_1", "-tls1"):
            out = subprocess.run(
                [
                    "openssl",
                    "s_client",
                    "-starttls",
                    "smtp",
                    "-connect",
                    f"127.0.0.1:{mx.port()}",
                    old,
                    "-cipher",
                    "DEFAULT:@SECLEVEL=0",
                    "-brief",
                ],
                input=b"QUIT\r\n",
                capture_output=True,
                timeout=20,
            )
            assert out.returncode != 0
            assert "Protocol version" not in (out.stdout + out.stderr).decode()


def s_client_session(port: int, ca_file: Path, *session: str) -> str:
    """One `openssl s_client -starttls smtp` session that waits a moment for the server's
    post-handshake messages before it says QUIT; its whole output."""
    command = ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}"]
    client = subprocess.Popen(
        [*command, "-CAfile", str(ca_file), "-tls1_3", *session],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(0.5)
        out, _ = client.communicate(b"QUIT\r\n", timeout=20)
    finally:
        client.kill()
    return out.decode(errors="replace")


def test_one_tls_1_3_ticket_per_handshake_and_it_resumes(tmp_path: Path, certs: Certs) -> None:
    saved = tmp_path / "session.pem"
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        first = s_client_session(mx.port(), certs.ca_file, "-sess_out", str(saved))
        assert "New, TLSv1.3" in first
        assert first.count("Post-Handshake New Session Ticket arrived") == 1, first
        again = s_client_session(mx.port(), certs.ca_file, "-sess_in", str(saved))
        assert "Reused, TLSv1.3" in again, again


def test_swaks_delivers_over_starttls(tmp_path: Path, certs: Certs) -> None:
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed: run scripts/install-deps.sh")
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        out = subprocess.run(
            [
                "swaks",
                "--server",
                f"127.0.0.1:{mx.port()}",
                "--tls",
                "--from",
                "a@sender.example",
                "--to",
                "bob@example.com",
                "--helo",
                "swaks.example",
                "--body",
                "via swaks",
            ],
            capture_output=True,
            timeout=30,
        )
        text = out.stdout.decode()
        assert out.returncode == 0, text
        assert "<~  250 2.0.0 Message accepted" in text
        assert len(up.messages) == 1 and b"via swaks" in up.messages[0].data


def test_implicit_tls_listener(tmp_path: Path, certs: Certs) -> None:
    config_listeners = [listener("implicit")]
    with (
        RecordingUpstream() as up,
        Mx(
            tmp_path, mx_config(tmp_path, certs, upstream_port=up.port, listeners=config_listeners)
        ) as mx,
    ):
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        with smtplib.SMTP_SSL("127.0.0.1", mx.port(), context=ctx, timeout=10) as smtp:
            smtp._host = "mx.test.example"  # verify the name we serve, not the IP
            code, ehlo = smtp.ehlo("c.example")
            assert code == 250 and b"STARTTLS" not in ehlo
            assert smtp.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
        header = up.messages[0].data.decode()
        assert "with ESMTPS" in header and "(using TLSv1.3" in header
        assert mx.log.wait_for("tls=TLSv1.3", "began=implicit")


def test_require_tls_answers_530_until_starttls(tmp_path: Path, certs: Certs) -> None:
    config_listeners = [listener(require_tls=True)]
    with (
        RecordingUpstream() as up,
        Mx(
            tmp_path, mx_config(tmp_path, certs, upstream_port=up.port, listeners=config_listeners)
        ) as mx,
    ):
        with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp.ehlo("c.example")
            code, text = smtp.mail("a@sender.example")
            assert code == 530 and text.startswith(b"5.7.0 Must issue a STARTTLS command first")
            assert smtp.noop()[0] == 250
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
            smtp._host = "mx.test.example"
            smtp.ehlo("c.example")
            smtp.starttls(context=ctx)
            assert smtp.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
        assert len(up.messages) == 1


def test_sni_picks_the_certificate_for_the_name(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(tmp_path, certs, upstream_port=free_port())
    config["tls"]["certificates"].append(
        {"cert": str(certs.other_name[0]), "key": str(certs.other_name[1])}
    )
    with Mx(tmp_path, config) as mx:
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        with starttls_socket(mx.port(), ctx, "other.test.example") as s:
            assert s.getpeercert()["subjectAltName"] == (("DNS", "other.test.example"),)  # type: ignore[index]
        with starttls_socket(mx.port(), ctx, "mx.test.example") as s:
            assert ("DNS", "mx.test.example") in s.getpeercert()["subjectAltName"]  # type: ignore[index]
        assert mx.log.wait_for("sni=other.test.example")


def test_plaintext_pipelined_after_starttls_is_discarded(tmp_path: Path, certs: Certs) -> None:
    with (
        RecordingUpstream() as up,
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=up.port)) as mx,
    ):
        raw = RawClient(mx.port())
        raw.reply()
        raw.send(b"EHLO c.example\r\n")
        raw.reply()
        # CVE-2011-0411 class: commands injected behind STARTTLS in the same packet.
        raw.send(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<bob@example.com>\r\n")
        assert raw.reply().startswith(b"220 ")
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        with ctx.wrap_socket(raw.sock, server_hostname="mx.test.example") as s:
            f = s.makefile("rb")
            s.sendall(b"RCPT TO:<bob@example.com>\r\n")
            first = f.readline()
            # No reply was owed for the injected commands: the first one we read is for our RCPT,
            # and it says EHLO is needed again, so the injected MAIL was never executed.
            assert first.startswith(b"503 5.5.1 Send EHLO or HELO first"), first
            s.sendall(b"EHLO c.example\r\n")
            ehlo = b""
            while not ehlo.endswith(b"\r\n") or ehlo.split(b"\r\n")[-2][3:4] != b" ":
                ehlo += f.readline()
            assert b"STARTTLS" not in ehlo
            s.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"503 5.5.1 TLS already active")
            f.close()
        assert up.connections == 0
        assert mx.log.wait_for("discarded_after_starttls=")


def test_starttls_with_a_parameter_is_refused(tmp_path: Path, certs: Certs) -> None:
    with (
        Mx(tmp_path, mx_config(tmp_path, certs, upstream_port=free_port())) as mx,
        RawClient(mx.port()) as c,
    ):
        c.reply()
        c.send(b"EHLO c.example\r\n")
        c.reply()
        c.send(b"STARTTLS now\r\n")
        assert c.reply().startswith(b"501 5.5.4 ")


def mtls_listener(certs: Certs, pins: list[str]) -> dict[str, Any]:
    return listener(
        require_tls=True,
        client_cert="required",
        client_ca_file=str(certs.ca_file),
        client_cert_pins=pins,
    )


def test_mutual_tls_with_pinned_client_certificate(tmp_path: Path, certs: Certs) -> None:
    der = ssl.PEM_cert_to_DER_cert(
        certs.client[0].read_text().split("-----END CERTIFICATE-----")[0]
        + "-----END CERTIFICATE-----\n"
    )
    pins = [spki_pin(der)]
    config = mx_config(tmp_path, certs, upstream_port=0, listeners=[mtls_listener(certs, pins)])
    with RecordingUpstream() as up:
        config["upstream"]["port"] = up.port
        with Mx(tmp_path, config) as mx:
            ctx = ssl.create_default_context(cafile=str(certs.ca_file))
            ctx.load_cert_chain(str(certs.client[0]), str(certs.client[1]))
            with smtplib.SMTP("127.0.0.1", mx.port(), timeout=10) as smtp:
                smtp._host = "mx.test.example"
                smtp.ehlo("internal.example")
                smtp.starttls(context=ctx)
                assert smtp.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
            # A certificate from the same CA that is not pinned is turned away after the handshake.
            ctx2 = ssl.create_default_context(cafile=str(certs.ca_file))
            ctx2.load_cert_chain(str(certs.rsa[0]), str(certs.rsa[1]))
            with starttls_socket(mx.port(), ctx2, "mx.test.example") as s:
                s.sendall(b"EHLO internal.example\r\n")
                data = s.recv(4096)
                assert data.startswith(b"421 4.7.0 Client certificate not accepted")
            # No certificate at all: the handshake itself fails (client_cert: required).
            ctx3 = ssl.create_default_context(cafile=str(certs.ca_file))
            with (
                pytest.raises((ssl.SSLError, ConnectionError)),
                starttls_socket(mx.port(), ctx3, "mx.test.example") as s,
            ):
                s.sendall(b"EHLO internal.example\r\n")
                if not s.recv(4096):
                    raise ConnectionResetError("closed")
        assert len(up.messages) == 1


def test_stalled_handshake_times_out(tmp_path: Path, certs: Certs) -> None:
    config = mx_config(tmp_path, certs, upstream_port=free_port(), listeners=[listener("implicit")])
    config["tls"]["handshake_timeout"] = "1s"
    with Mx(tmp_path, config) as mx:
        s = socket.create_connection(("127.0.0.1", mx.port()), timeout=5)
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        assert s.recv(100) == b""  # closed by the server's handshake deadline
        s.close()
        assert mx.log.wait_for("TLS handshake failed")
