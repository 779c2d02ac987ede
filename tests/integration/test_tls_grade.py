"""TLS grade gate: sslyze scans each TLS listener of a real MX, and every regression is named.

One MX with a STARTTLS listener and an implicit-TLS listener, both serving an RSA and an ECDSA
certificate, is scanned once per module by sslyze (PyPI). sslyze pins an older `cryptography`
than the project's, so it lives in a venv of its own made by `scripts/install-sslyze.sh`. The scan
runs there through sslyze's Python API (a short program handed to that venv's interpreter) and
comes back as JSON: sslyze's own serialisation of each server's results, plus the issues found by
its Mozilla "intermediate" checker (what the CLI's `--mozilla_config=intermediate` runs; the CLI
skips that check whenever it prints JSON). The tests read specific fields and name the regression.

The MX serves leaves issued here by the session's test CA and shaped like a public CA's (see
`realistic_leaf`); the CA file is sslyze's trust store. Only the scan commands the Mozilla checker
needs are run (they include every one the other tests read): a few seconds for both listeners.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import NO_RATE_LIMITS, Certs, mx_config
from support.mx import Mx
from support.net import free_port
from support.upstream import RecordingUpstream

INSTALL_SCRIPT = "scripts/install-sslyze.sh"
HOSTNAME = "mx.test.example"
LISTENERS = {"mx": "starttls", "smtps": "implicit"}
SCAN_TIMEOUT = 120.0

SCAN_PROGRAM = r"""
import json
import sys
from pathlib import Path

from sslyze import (
    CertificateInfoExtraArgument,
    ProtocolWithOpportunisticTlsEnum,
    Scanner,
    ScanCommandsExtraArguments,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResultAsJson,
)
from sslyze.__version__ import __version__
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    ServerScanResultIncomplete,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

job = json.load(sys.stdin)
extra = ScanCommandsExtraArguments(
    certificate_info=CertificateInfoExtraArgument(custom_ca_file=Path(job["ca_file"]))
)
requests = []
for target in job["targets"]:
    starttls = target["tls"] == "starttls"
    requests.append(
        ServerScanRequest(
            server_location=ServerNetworkLocation(
                job["hostname"], target["port"], ip_address="127.0.0.1"
            ),
            network_configuration=ServerNetworkConfiguration(
                tls_server_name_indication=job["hostname"],
                tls_opportunistic_encryption=(
                    ProtocolWithOpportunisticTlsEnum.SMTP if starttls else None
                ),
                smtp_ehlo_hostname="sslyze.test.example" if starttls else None,
            ),
            scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
            scan_commands_extra_arguments=extra,
        )
    )
profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
scanner = Scanner()
scanner.queue_scans(requests)
servers = {}
for result in scanner.get_results():
    try:
        check_server_against_tls_configuration(result, profile)
        verdict = {}
    except ServerNotCompliantWithTlsConfiguration as exc:
        verdict = dict(exc.issues)
    except ServerScanResultIncomplete as exc:
        verdict = {"scan_incomplete": str(exc)}
    servers[str(result.server_location.port)] = {
        "result": json.loads(ServerScanResultAsJson.model_validate(result).model_dump_json()),
        "mozilla_intermediate_issues": verdict,
    }
json.dump({"sslyze_version": __version__, "servers": servers}, sys.stdout)
"""


def sslyze_python() -> Path:
    """The interpreter of the venv that scripts/install-sslyze.sh makes (it may be missing)."""
    deps = Path(os.environ.get("SPAM_KILLER_DEPS_DIR", "/opt/spam-killer-deps"))
    return deps / "sslyze-venv" / "bin" / "python"


@dataclass
class Grade:
    """sslyze's report per listener, or why there is none: then every test fails with that."""

    report_path: Path
    ca_file: Path
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # listener name -> report
    error: str | None = None

    def server(self, name: str) -> dict[str, Any]:
        if self.error is not None:
            pytest.fail(self.error, pytrace=False)
        return self.servers[name]

    def result(self, name: str, command: str) -> dict[str, Any]:
        """The result of one scan command on one listener; fails if the command did not run."""
        attempt = self.server(name)["result"]["scan_result"][command]
        if attempt["status"] != "COMPLETED" or attempt["result"] is None:
            pytest.fail(
                f"{name}: sslyze's {command} did not complete ({attempt['status']}, "
                f"{attempt.get('error_reason')}): {attempt.get('error_trace')}; "
                f"full report in {self.report_path}",
                pytrace=False,
            )
        result: dict[str, Any] = attempt["result"]
        return result


def realistic_leaf(ca: trustme.CA, kind: str, tmp: Path) -> dict[str, str]:
    """A leaf from the test CA shaped like a public CA's: 90 days, CN plus a non-critical SAN.

    trustme's own leaves last from 2000 to 3000 and mark the SAN critical beside a non-empty
    subject, which strict X.509 verifiers (sslyze's) refuse under RFC 5280 section 4.2.1.6.
    """
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=89))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=kind == "rsa",
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(HOSTNAME),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{kind}.pem", tmp / f"{kind}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"cert": str(cert_path), "key": str(key_path)}


def run_sslyze(python: Path, job: dict[str, Any], grade: Grade) -> Grade:
    try:
        out = subprocess.run(
            [str(python), "-I", "-c", SCAN_PROGRAM],
            input=json.dumps(job).encode(),
            capture_output=True,
            timeout=SCAN_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        grade.error = f"sslyze did not finish within {SCAN_TIMEOUT:.0f} s"
        return grade
    grade.report_path.write_bytes(out.stdout)
    if out.returncode != 0:
        stderr = out.stderr.decode(errors="replace")[-3000:]
        grade.error = f"sslyze failed (exit {out.returncode}; run {INSTALL_SCRIPT}?):\n{stderr}"
        return grade
    report = json.loads(out.stdout)
    for target in job["targets"]:
        server = report["servers"].get(str(target["port"]))
        if server is None or server["result"]["connectivity_status"] != "COMPLETED":
            trace = server and server["result"]["connectivity_error_trace"]
            grade.error = f"sslyze could not scan listener {target['name']}: {trace}"
            return grade
        grade.servers[target["name"]] = server
    return grade


@pytest.fixture(scope="module")
def grade(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Grade]:
    tmp = tmp_path_factory.mktemp("tls-grade")
    python = sslyze_python()
    if not os.access(python, os.X_OK):
        error = f"sslyze is not installed ({python} missing): run {INSTALL_SCRIPT}"
        yield Grade(tmp / "sslyze.json", certs.ca_file, error=error)
        return
    listeners = [
        {"name": name, "address": "127.0.0.1", "port": free_port(), "tls": tls}
        for name, tls in LISTENERS.items()
    ]
    job = {
        "hostname": HOSTNAME,
        "ca_file": str(certs.ca_file),
        "targets": [{"name": x["name"], "port": x["port"], "tls": x["tls"]} for x in listeners],
    }
    with RecordingUpstream() as up:
        # sslyze scans both listeners at once from one address, and the server may not yet
        # have seen the close of a scan connection when the next arrives: the per-address caps
        # would refuse a scan that grades TLS, not them.
        config = mx_config(
            tmp,
            certs,
            upstream_port=up.port,
            listeners=listeners,
            limits={"max_connections_per_ip": 1000},
            rate_limits=NO_RATE_LIMITS,
        )
        config["tls"]["certificates"] = [
            realistic_leaf(certs.ca, "rsa", tmp),
            realistic_leaf(certs.ca, "ecdsa", tmp),
        ]
        with Mx(tmp, config):
            yield run_sslyze(python, job, Grade(tmp / "sslyze.json", certs.ca_file))


OLD_VERSIONS = {
    "ssl_2_0_cipher_suites": "SSL 2.0",
    "ssl_3_0_cipher_suites": "SSL 3.0",
    "tls_1_0_cipher_suites": "TLS 1.0",
    "tls_1_1_cipher_suites": "TLS 1.1",
}
per_listener = pytest.mark.parametrize("name", list(LISTENERS))


@per_listener
def test_only_tls_1_2_and_1_3(grade: Grade, name: str) -> None:
    regressions = []
    for command, label in OLD_VERSIONS.items():
        result = grade.result(name, command)
        if result["is_tls_version_supported"] or result["accepted_cipher_suites"]:
            suites = [s["cipher_suite"]["name"] for s in result["accepted_cipher_suites"]]
            regressions.append(f"{label} accepted, with {suites}")
    assert not regressions, f"{name}: " + "; ".join(regressions)
    for command in ("tls_1_2_cipher_suites", "tls_1_3_cipher_suites"):
        assert grade.result(name, command)["is_tls_version_supported"], f"{name}: {command} refused"


def weaknesses(suite: dict[str, Any]) -> list[str]:
    """Why a TLS 1.2 suite (sslyze's CipherSuite as JSON, IANA name) is unacceptable, if it is."""
    iana, bits = suite["name"], suite["key_size"]
    found = []
    if suite["is_anonymous"] or "_anon_" in iana:
        found.append("anonymous")
    if "_WITH_NULL_" in iana or bits == 0:
        found.append("NULL")
    if "EXPORT" in iana:
        found.append("export")
    if "_RC4_" in iana:
        found.append("RC4")
    if "3DES" in iana or "_DES_" in iana:
        found.append("DES/3DES")
    if "_CBC_" in iana and iana.endswith("_SHA"):
        found.append("CBC with SHA-1 only")
    if 0 < bits < 128:
        found.append(f"weak ({bits}-bit key)")
    return found


@per_listener
def test_tls_1_2_suites_are_strong(grade: Grade, name: str) -> None:
    accepted = grade.result(name, "tls_1_2_cipher_suites")["accepted_cipher_suites"]
    bad = {s["cipher_suite"]["name"]: w for s in accepted if (w := weaknesses(s["cipher_suite"]))}
    assert not bad, f"{name}: weak TLS 1.2 suites accepted: {bad}"


@per_listener
def test_no_insecure_or_client_initiated_renegotiation(grade: Grade, name: str) -> None:
    reneg = grade.result(name, "session_renegotiation")
    assert reneg["supports_secure_renegotiation"], f"{name}: insecure renegotiation: {reneg}"
    assert not reneg["is_vulnerable_to_client_renegotiation_dos"], (
        f"{name}: client-initiated renegotiation honoured "
        f"{reneg['client_renegotiations_success_count']} times"
    )


@per_listener
def test_no_tls_compression(grade: Grade, name: str) -> None:
    assert not grade.result(name, "tls_compression")["supports_compression"], (
        f"{name}: TLS compression accepted (CRIME)"
    )


def key_kind(pem: str) -> str:
    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ecdsa"
    return type(key).__name__


@per_listener
def test_rsa_and_ecdsa_chains_valid_against_test_ca(grade: Grade, name: str) -> None:
    info = grade.result(name, "certificate_info")
    problems, kinds = [], []
    for deployment in info["certificate_deployments"]:
        kind = key_kind(deployment["received_certificate_chain"][0]["as_pem"])
        kinds.append(kind)
        ours = [
            r
            for r in deployment["path_validation_results"]
            if Path(r["trust_store"]["path"]) == grade.ca_file
        ]
        if not ours:
            problems.append(f"{kind}: sslyze did not validate against {grade.ca_file}")
        elif not ours[0]["was_validation_successful"]:
            # sslyze verifies the chain for the SNI name too (cryptography's server verifier).
            why = ours[0]["validation_error"]
            problems.append(f"{kind} chain not valid for {HOSTNAME} against the test CA: {why}")
        if deployment["received_chain_has_valid_order"] is False:
            problems.append(f"{kind} chain sent out of order")
    if sorted(kinds) != ["ecdsa", "rsa"]:
        problems.append(f"certificate deployments seen: {kinds}, want one RSA and one ECDSA")
    assert not problems, f"{name}: " + "; ".join(problems)


@per_listener
def test_mozilla_intermediate_profile(grade: Grade, name: str) -> None:
    issues = grade.server(name)["mozilla_intermediate_issues"]
    assert not issues, "\n".join(
        [f"{name}: not compliant with Mozilla's intermediate profile (sslyze):"]
        + [f"  {key}: {text}" for key, text in issues.items()]
    )


def test_weakness_classifier() -> None:
    """The TLS 1.2 classifier on IANA names as sslyze reports them; needs no scan."""

    def suite(iana: str, bits: int = 128, anon: bool = False) -> dict[str, Any]:
        return {"name": iana, "key_size": bits, "is_anonymous": anon}

    assert weaknesses(suite("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")) == []
    assert weaknesses(suite("TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256", 256)) == []
    assert weaknesses(suite("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384", 256)) == []  # Mozilla's job
    assert weaknesses(suite("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA")) == ["CBC with SHA-1 only"]
    assert weaknesses(suite("TLS_RSA_WITH_3DES_EDE_CBC_SHA", 168)) == [
        "DES/3DES",
        "CBC with SHA-1 only",
    ]
    assert weaknesses(suite("TLS_ECDHE_RSA_WITH_RC4_128_SHA")) == ["RC4"]
    assert weaknesses(suite("TLS_RSA_WITH_NULL_SHA256", 0)) == ["NULL"]
    assert weaknesses(suite("TLS_DH_anon_WITH_AES_128_GCM_SHA256", anon=True)) == ["anonymous"]
    assert weaknesses(suite("TLS_RSA_EXPORT_WITH_RC4_40_MD5", 40)) == [
        "export",
        "RC4",
        "weak (40-bit key)",
    ]
    assert "weak (56-bit key)" in weaknesses(suite("TLS_RSA_WITH_DES_CBC_SHA", 56))
