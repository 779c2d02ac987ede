"""Shared fixtures: certificates from a test CA (trustme), and config builders for a real MX."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from support.net import free_port


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    rsa: tuple[Path, Path]
    ecdsa: tuple[Path, Path]
    other_name: tuple[Path, Path]  # a certificate for another name (SNI tests)
    upstream: tuple[Path, Path]  # for the recording upstream, name "localhost"/127.0.0.1
    client: tuple[Path, Path]  # a client certificate (mTLS)
    wrong_ca_file: Path  # a CA that signed nothing here


def _write(tmp: Path, name: str, cert: trustme.LeafCert) -> tuple[Path, Path]:
    c, k = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(c))
    for extra in cert.cert_chain_pems[1:]:
        with open(c, "ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(k))
    return c, k


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    tmp = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    wrong = trustme.CA()
    wrong_file = tmp / "wrong-ca.pem"
    wrong.cert_pem.write_to_path(str(wrong_file))
    names = ("mx.test.example", "localhost", "127.0.0.1")
    rsa = _write(tmp, "rsa", ca.issue_cert(*names, key_type=trustme.KeyType.RSA))
    ecdsa = _write(tmp, "ecdsa", ca.issue_cert(*names, key_type=trustme.KeyType.ECDSA))
    other = _write(
        tmp, "other", ca.issue_cert("other.test.example", key_type=trustme.KeyType.ECDSA)
    )
    upstream = _write(tmp, "upstream", ca.issue_cert("localhost", "127.0.0.1"))
    client = _write(tmp, "client", ca.issue_cert("client.test.example"))
    return Certs(ca, ca_file, rsa, ecdsa, other, upstream, client, wrong_file)


# Every rate limit of the `rate_limits` section switched off; a test turns on the one it means.
NO_RATE_LIMITS: dict[str, Any] = {
    "connections_per_ip": "off",
    "connections_per_network": "off",
    "messages_per_ip": "off",
    "messages_per_network": "off",
    "concurrent_per_ip": 0,
    "concurrent_per_network": 0,
}


def mx_config(
    tmp_path: Path,
    certs: Certs,
    *,
    upstream_port: int,
    listeners: list[dict[str, Any]] | None = None,
    upstream: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A config for a test MX: one STARTTLS listener on a free port, relaying to `upstream_port`."""
    config: dict[str, Any] = {
        "hostname": "mx.test.example",
        "domains": ["example.com", "example.org"],
        "listeners": listeners
        or [{"name": "mx", "address": "127.0.0.1", "port": free_port(), "tls": "starttls"}],
        "tls": {
            "certificates": [
                {"cert": str(certs.rsa[0]), "key": str(certs.rsa[1])},
                {"cert": str(certs.ecdsa[0]), "key": str(certs.ecdsa[1])},
            ]
        },
        "upstream": {
            "host": "127.0.0.1",
            "port": upstream_port,
            "use_tls": False,
            "timeout": "3s",
            "data_timeout": "3s",
            "connect_timeout": "3s",
        }
        | (upstream or {}),
        "dev_upstream": {"enabled": False},
        "data_dir": str(tmp_path / "data"),
        # Greylisting would defer every test's first message from a public-looking (PROXY)
        # address; the tests of it turn it on.
        "greylist": {"enabled": False},
    }
    config.update(extra)
    return config


@pytest.fixture()
def smtp_sink_bin() -> str:
    path = shutil.which("smtp-sink")
    if path is None:
        pytest.fail("smtp-sink is not installed: run scripts/install-deps.sh")
    return path
