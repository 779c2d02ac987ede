"""TLS: certificate files, the server and upstream contexts, SNI, mTLS pins, facts.

Handshakes are real: a server thread and a client over a socketpair (or asyncio on localhost),
with certificates from a trustme CA written to disk.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import socket
import ssl
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spamkiller.errors import TlsConfigError
from spamkiller.tls import (
    TLS12_CIPHERS,
    LoadedPair,
    ServerTls,
    TlsFacts,
    TlsStart,
    client_context,
    load_pairs,
    make_self_signed,
    pin_matches,
    spki_pin,
)
from spamkiller.tls.contexts import ffdhe2048_prime

MX = "mx.example.test"
OTHER = "other.example.test"

# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Files:
    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())

    @property
    def pair(self) -> tuple[Path, Path]:
        return (self.cert, self.key)


def write_leaf(directory: Path, stem: str, leaf: trustme.LeafCert) -> Files:
    files = Files(cert=directory / f"{stem}.pem", key=directory / f"{stem}.key")
    # The cert file carries the chain after the leaf, as a real deployment's fullchain.pem does.
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(files.key)
    return files


@dataclass(frozen=True, slots=True, kw_only=True)
class Certs:
    ca: trustme.CA
    ca_file: Path
    rsa: Files
    ecdsa: Files
    other: Files
    wildcard: Files
    client: Files
    client_ca: trustme.CA
    client_ca_file: Path
    stranger: Files


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    client_ca = trustme.CA()
    client_ca_file = directory / "client-ca.pem"
    client_ca.cert_pem.write_to_path(client_ca_file)
    return Certs(
        ca=ca,
        ca_file=ca_file,
        rsa=write_leaf(directory, "rsa", ca.issue_cert(MX, key_type=trustme.KeyType.RSA)),
        ecdsa=write_leaf(directory, "ecdsa", ca.issue_cert(MX, key_type=trustme.KeyType.ECDSA)),
        other=write_leaf(directory, "other", ca.issue_cert(OTHER)),
        wildcard=write_leaf(directory, "wild", ca.issue_cert("*.wild.example.test")),
        client=write_leaf(directory, "client", client_ca.issue_cert("client.example.test")),
        client_ca=client_ca,
        client_ca_file=client_ca_file,
        stranger=write_leaf(directory, "stranger", ca.issue_cert("client.example.test")),
    )


def loaded(*files: Files) -> list[LoadedPair]:
    return load_pairs([f.pair for f in files])


def trusting_client(certs: Certs) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    certs.ca.configure_trust(context)
    return context


@dataclass(kw_only=True)
class Outcome:
    server: ssl.SSLSocket | None = None
    server_error: BaseException | None = None
    client: ssl.SSLSocket | None = None
    client_error: BaseException | None = None
    served_der: bytes | None = None
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None

    def server_reason(self) -> str | None:
        return getattr(self.server_error, "reason", None)

    def client_reason(self) -> str | None:
        return getattr(self.client_error, "reason", None)


@contextmanager
def handshake(
    server_context: ssl.SSLContext,
    client: ssl.SSLContext,
    server_hostname: str | None = MX,
) -> Iterator[Outcome]:
    """Shake hands over a socketpair; the server then sends b"ok" so that a client certificate
    the server rejects after a TLS 1.3 handshake shows up on the client side too."""
    left, right = socket.socketpair()
    left.settimeout(5)
    right.settimeout(5)
    outcome = Outcome(sockets=[left, right])

    def serve() -> None:
        try:
            outcome.server = server_context.wrap_socket(left, server_side=True)
            outcome.server.sendall(b"ok")
        except (ssl.SSLError, OSError) as error:
            outcome.server_error = error
            left.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        try:
            outcome.client = client.wrap_socket(right, server_hostname=server_hostname)
            outcome.served_der = outcome.client.getpeercert(binary_form=True)
            if outcome.client.recv(2) != b"ok":
                outcome.client_error = ConnectionError("server closed")
        except (ssl.SSLError, OSError) as error:
            outcome.client_error = error
        thread.join(5)
        yield outcome
    finally:
        thread.join(5)
        for sock in (outcome.client, outcome.server, *outcome.sockets):
            if sock is not None:
                sock.close()


def pem_pin(files: Files) -> str:
    return spki_pin(files.der)


def self_signed(
    directory: Path,
    stem: str,
    *,
    common_name: str = MX,
    san: list[str] | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Files:
    """A certificate made with cryptography directly, for dates and names trustme does not set."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    files = Files(cert=directory / f"{stem}.pem", key=directory / f"{stem}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def problems(pairs: list[tuple[Path, Path]], **kwargs: object) -> list[str]:
    with pytest.raises(TlsConfigError) as caught:
        load_pairs(pairs, **kwargs)  # type: ignore[arg-type]
    return caught.value.problems


# ---------------------------------------------------------------------------------------------
# certs: load_pairs
# ---------------------------------------------------------------------------------------------


def test_load_pairs_describes_rsa_and_ecdsa(certs: Certs) -> None:
    rsa, ecdsa = loaded(certs.rsa, certs.ecdsa)
    assert (rsa.key_type, rsa.key_bits, rsa.names) == ("RSA", 2048, (MX,))
    assert (ecdsa.key_type, ecdsa.key_bits, ecdsa.names) == ("ECDSA", 256, (MX,))
    assert rsa.cert_path == certs.rsa.cert
    assert rsa.key_path == certs.rsa.key
    assert rsa.not_after.tzinfo is not None
    assert rsa.not_after > dt.datetime.now(dt.UTC)


def test_names_fall_back_to_the_common_name(tmp_path: Path) -> None:
    [pair] = loaded(self_signed(tmp_path, "cn", common_name="CN.Example.Test"))
    assert pair.names == ("cn.example.test",)
    [pair] = loaded(self_signed(tmp_path, "san", common_name="cn.x", san=["A.x", "b.x", "a.x"]))
    assert pair.names == ("a.x", "b.x")


def test_missing_files_are_named(tmp_path: Path, certs: Certs) -> None:
    cert, key = tmp_path / "no.pem", tmp_path / "no.key"
    assert problems([certs.rsa.pair, (cert, key)]) == [
        f"tls.certificates.1.cert: {cert}: no such file",
        f"tls.certificates.1.key: {key}: no such file",
    ]


def test_directory_instead_of_file(tmp_path: Path, certs: Certs) -> None:
    assert problems([(tmp_path, certs.rsa.key)]) == [
        f"tls.certificates.0.cert: {tmp_path}: is a directory, not a file"
    ]


def test_garbage_files_are_named(tmp_path: Path, certs: Certs) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN NONSENSE-----\nAAAA\n-----END NONSENSE-----\n")
    assert problems([(garbage, certs.rsa.key)], key_path_prefix="x.pairs") == [
        f"x.pairs.0.cert: {garbage} is not a PEM certificate"
    ]
    assert problems([(certs.rsa.cert, garbage)]) == [
        f"tls.certificates.0.key: {garbage} is not a PEM private key"
    ]
    # The usual slip: the certificate given where the key belongs.
    assert problems([(certs.rsa.cert, certs.rsa.cert)]) == [
        f"tls.certificates.0.key: {certs.rsa.cert} is not a PEM private key"
    ]


def test_encrypted_key_is_refused(tmp_path: Path, certs: Certs) -> None:
    key = serialization.load_pem_private_key(certs.rsa.key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    [line] = problems([(certs.rsa.cert, encrypted)])
    assert line.startswith(f"tls.certificates.0.key: {encrypted} is encrypted")


def test_mismatched_key(certs: Certs) -> None:
    assert problems([(certs.rsa.cert, certs.ecdsa.key)]) == [
        f"tls.certificates.0.key: {certs.ecdsa.key} does not match certificate {certs.rsa.cert}"
    ]
    # Same key type, different key: compared by public key, not by type.
    assert problems([(certs.ecdsa.cert, certs.other.key)]) == [
        f"tls.certificates.0.key: {certs.other.key} does not match certificate {certs.ecdsa.cert}"
    ]


def test_expired_certificate(tmp_path: Path) -> None:
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    files = self_signed(
        tmp_path, "old", not_before=long_ago, not_after=long_ago + dt.timedelta(days=90)
    )
    assert problems([files.pair]) == [
        f"tls.certificates.0.cert: {files.cert} expired on 2020-03-31T00:00:00Z"
    ]


def test_not_yet_valid_certificate(tmp_path: Path) -> None:
    files = self_signed(tmp_path, "new")
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    [line] = problems([files.pair], now=earlier)
    assert line.startswith(f"tls.certificates.0.cert: {files.cert} is not valid before ")


def test_every_problem_is_listed(tmp_path: Path, certs: Certs) -> None:
    found = problems([(tmp_path / "a", certs.rsa.key), (certs.rsa.cert, certs.ecdsa.key)])
    assert [line.split(":")[0] for line in found] == [
        "tls.certificates.0.cert",
        "tls.certificates.1.key",
    ]


# ---------------------------------------------------------------------------------------------
# certs: pins and self-signed
# ---------------------------------------------------------------------------------------------


def test_spki_pin_hashes_the_subject_public_key_info(certs: Certs) -> None:
    cert = x509.load_der_x509_certificate(certs.rsa.der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    assert spki_pin(certs.rsa.der) == expected
    assert spki_pin(certs.rsa.der) != spki_pin(certs.ecdsa.der)


def test_pin_matches(certs: Certs) -> None:
    pin = pem_pin(certs.rsa)
    assert pin_matches(certs.rsa.der, [pem_pin(certs.other), pin])
    assert not pin_matches(certs.ecdsa.der, [pin])
    assert not pin_matches(None, [pin])
    assert not pin_matches(certs.rsa.der, [])


def test_make_self_signed(tmp_path: Path) -> None:
    cert, key = tmp_path / "new" / "dir" / "self.pem", tmp_path / "keys" / "self.key"
    make_self_signed(cert, key, "mx.example.org")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    [pair] = load_pairs([(cert, key)])
    assert (pair.key_type, pair.key_bits, pair.names) == ("RSA", 2048, ("mx.example.org",))
    assert pair.not_after > dt.datetime.now(dt.UTC) + dt.timedelta(days=800)


def test_make_self_signed_tightens_an_existing_key_file(tmp_path: Path) -> None:
    cert, key = tmp_path / "self.pem", tmp_path / "self.key"
    key.write_text("old")
    key.chmod(0o644)
    make_self_signed(cert, key, "mx.example.org", days=1)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_pairs([(cert, key)])[0].names == ("mx.example.org",)


def test_self_signed_pair_serves_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "self.pem", tmp_path / "self.key"
    make_self_signed(cert, key, MX)
    tls = ServerTls.build(load_pairs([(cert, key)]), min_version="TLSv1.2")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=cert)
    with handshake(tls.context, client) as outcome:
        assert outcome.ok, (outcome.server_error, outcome.client_error)


# ---------------------------------------------------------------------------------------------
# contexts: the server profile
# ---------------------------------------------------------------------------------------------


def test_profile_settings(certs: Certs) -> None:
    context = ServerTls.build(loaded(certs.rsa), min_version="TLSv1.2").context
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert not context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert not context.options & ssl.OP_NO_TICKET
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(TLS12_CIPHERS.split(":"))


def test_ffdhe2048_is_the_rfc_7919_group() -> None:
    prime = ffdhe2048_prime()
    assert prime.bit_length() == 2048
    # RFC 7919 appendix A.1: the top and bottom 64 bits are all ones, and these are its words.
    assert prime >> 1984 == 2**64 - 1
    assert prime & (2**64 - 1) == 2**64 - 1
    assert hex(prime).startswith("0xffffffffffffffffadf85458a2bb4a9aafdc5620273d3cf1")
    assert hex(prime).endswith("886b423861285c97ffffffffffffffff")
    assert pow(2, prime - 1, prime) == 1  # Fermat: a typo in the formula would not be prime


@pytest.mark.parametrize(
    ("cipher", "key_type"),
    [
        ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDSA"),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", "ECDSA"),
        ("ECDHE-RSA-AES128-GCM-SHA256", "RSA"),
        ("DHE-RSA-AES256-GCM-SHA384", "RSA"),
    ],
)
def test_rsa_and_ecdsa_served_together(certs: Certs, cipher: str, key_type: str) -> None:
    tls = ServerTls.build(loaded(certs.rsa, certs.ecdsa), min_version="TLSv1.2")
    client = trusting_client(certs)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(cipher)
    with handshake(tls.context, client) as outcome:
        assert outcome.ok, (outcome.server_error, outcome.client_error)
        expected = certs.ecdsa if key_type == "ECDSA" else certs.rsa
        assert outcome.served_der == expected.der
        assert outcome.client is not None
        assert outcome.client.cipher()[0] == cipher  # type: ignore[index]


def test_tls13_by_default(certs: Certs) -> None:
    tls = ServerTls.build(loaded(certs.rsa, certs.ecdsa), min_version="TLSv1.2")
    with handshake(tls.context, trusting_client(certs)) as outcome:
        assert outcome.ok
        assert outcome.client is not None
        assert outcome.client.version() == "TLSv1.3"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_protocol_versions_are_refused(certs: Certs, version: ssl.TLSVersion) -> None:
    tls = ServerTls.build(loaded(certs.rsa, certs.ecdsa), min_version="TLSv1.2")
    client = trusting_client(certs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # setting old versions warns
        client.minimum_version = version
        client.maximum_version = version
    # Security level 0 lets this OpenSSL actually send a TLS 1.0/1.1 hello, so it is our server
    # that says no, not the client refusing to try.
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with handshake(tls.context, client) as outcome:
        assert outcome.server_reason() == "UNSUPPORTED_PROTOCOL"
        assert outcome.client_reason() == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_tls13_floor_refuses_tls12(certs: Certs) -> None:
    tls = ServerTls.build(loaded(certs.rsa), min_version="TLSv1.3")
    client = trusting_client(certs)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with handshake(tls.context, client) as outcome:
        assert outcome.server_reason() == "UNSUPPORTED_PROTOCOL"


def test_weak_tls12_suites_are_refused(certs: Certs) -> None:
    tls = ServerTls.build(loaded(certs.rsa), min_version="TLSv1.2")
    client = trusting_client(certs)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-SHA256:AES128-GCM-SHA256")  # CBC; no forward secrecy
    with handshake(tls.context, client) as outcome:
        assert outcome.server_reason() == "NO_SHARED_CIPHER"


def test_build_refuses_what_it_cannot_serve(certs: Certs) -> None:
    with pytest.raises(TlsConfigError) as caught:
        ServerTls.build([], min_version="TLSv1.2")
    assert caught.value.problems == ["tls.certificates: no certificate to serve"]
    with pytest.raises(TlsConfigError) as caught:
        ServerTls.build(loaded(certs.rsa), min_version="TLSv1.1")
    assert caught.value.problems == ["tls.min_version: must be TLSv1.2 or TLSv1.3, got 'TLSv1.1'"]


def test_two_pairs_of_one_type_for_the_same_name_are_an_error(certs: Certs) -> None:
    with pytest.raises(TlsConfigError) as caught:
        ServerTls.build(loaded(certs.ecdsa, certs.rsa, certs.ecdsa), min_version="TLSv1.2")
    [line] = caught.value.problems
    assert line.startswith(
        f"tls.certificates.2.cert: {certs.ecdsa.cert} is a second ECDSA certificate for names "
        f"of tls.certificates.0 "
    )


# ---------------------------------------------------------------------------------------------
# contexts: SNI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected", "recorded"),
    [
        (OTHER, "other", OTHER),
        (MX, "ecdsa", MX),
        ("MX.Example.Test", "ecdsa", MX),
        ("a.wild.example.test", "wildcard", "a.wild.example.test"),
        ("b.a.wild.example.test", "ecdsa", "b.a.wild.example.test"),  # one label only
        ("unknown.example.test", "ecdsa", "unknown.example.test"),
        (None, "ecdsa", None),
    ],
)
def test_sni_picks_the_certificate(
    certs: Certs, name: str | None, expected: str, recorded: str | None
) -> None:
    tls = ServerTls.build(
        loaded(certs.ecdsa, certs.rsa, certs.other, certs.wildcard), min_version="TLSv1.2"
    )
    client = trusting_client(certs)
    # The default certificate does not cover every name asked for here; the test is about
    # which certificate is sent, not whether the client likes it.
    client.check_hostname = False
    with handshake(tls.context, client, server_hostname=name) as outcome:
        assert outcome.ok, (outcome.server_error, outcome.client_error)
        files: Files = getattr(certs, expected)
        assert outcome.served_der == files.der
        assert outcome.server is not None
        assert tls.sni_of(outcome.server) == recorded


def test_sni_recorded_with_a_single_group(certs: Certs) -> None:
    tls = ServerTls.build(loaded(certs.rsa, certs.ecdsa), min_version="TLSv1.2")
    with handshake(tls.context, trusting_client(certs)) as outcome:
        assert outcome.server is not None
        assert tls.sni_of(outcome.server) == MX


def test_recorded_sni_is_cleaned(certs: Certs) -> None:
    """A crafted name must not carry control bytes into logs; test the callback directly,
    since no well-behaved client library will send one."""
    tls = ServerTls.build(loaded(certs.rsa), min_version="TLSv1.2")
    ssl_object = tls.context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    callback = tls.context.sni_callback
    assert callback is not None
    callback(ssl_object, "EVIL\r\nX-Injected: 1." + "a" * 300, tls.context)
    recorded = tls.sni_of(ssl_object)
    assert recorded is not None
    assert recorded.startswith("evil??x-injected??1.aaa")
    assert len(recorded) == 255


def test_context_for(certs: Certs) -> None:
    tls = ServerTls.build(loaded(certs.rsa, certs.other), min_version="TLSv1.2")
    assert tls.context_for(OTHER) is not tls.context
    assert tls.context_for(OTHER + ".") is tls.context_for(OTHER)
    assert tls.context_for(MX) is tls.context
    assert tls.context_for(None) is tls.context


def test_sni_and_facts_through_asyncio(certs: Certs) -> None:
    """The server drives TLS through asyncio's SSLObject; sni_of must work there too."""
    tls = ServerTls.build(loaded(certs.ecdsa, certs.other), min_version="TLSv1.2")
    seen: list[TlsFacts] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        seen.append(
            TlsFacts.from_ssl_object(
                ssl_object, began=TlsStart.IMPLICIT, sni=tls.sni_of(ssl_object)
            )
        )
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main() -> bytes:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls.context)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=trusting_client(certs), server_hostname=OTHER
            )
            data = await reader.read(2)
            writer.close()
            await writer.wait_closed()
        return data

    assert asyncio.run(main()) == b"ok"
    [facts] = seen
    assert facts.sni == OTHER
    assert facts.version == "TLSv1.3"
    assert facts.active


# ---------------------------------------------------------------------------------------------
# contexts: client certificates and pins
# ---------------------------------------------------------------------------------------------


def with_client_cert(certs: Certs, files: Files) -> ssl.SSLContext:
    client = trusting_client(certs)
    client.load_cert_chain(files.cert, files.key)
    return client


def test_required_client_certificate(certs: Certs) -> None:
    tls = ServerTls.build(
        loaded(certs.rsa),
        min_version="TLSv1.2",
        client_cert="required",
        client_ca_file=certs.client_ca_file,
    )
    with handshake(tls.context, with_client_cert(certs, certs.client)) as outcome:
        assert outcome.ok, (outcome.server_error, outcome.client_error)
        assert outcome.server is not None
        assert tls.peer_allowed(outcome.server)
        facts = TlsFacts.from_ssl_object(outcome.server, began=TlsStart.STARTTLS, sni=None)
        assert facts.peer_cert_sha256 == pem_pin(certs.client)
    with handshake(tls.context, trusting_client(certs)) as outcome:
        assert outcome.server_reason() == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    # Issued by a CA the listener does not trust.
    with handshake(tls.context, with_client_cert(certs, certs.stranger)) as outcome:
        assert outcome.server_reason() == "CERTIFICATE_VERIFY_FAILED"


def test_optional_client_certificate(certs: Certs) -> None:
    tls = ServerTls.build(
        loaded(certs.rsa),
        min_version="TLSv1.2",
        client_cert="optional",
        client_ca_file=certs.client_ca_file,
    )
    with handshake(tls.context, trusting_client(certs)) as outcome:
        assert outcome.ok
        assert outcome.server is not None
        assert tls.peer_allowed(outcome.server)
        facts = TlsFacts.from_ssl_object(outcome.server, began=TlsStart.STARTTLS, sni=None)
        assert facts.peer_cert_sha256 is None


def test_pins_narrow_the_verified_certificates(certs: Certs) -> None:
    other_client = write_leaf(
        certs.client.cert.parent, "client2", certs.client_ca.issue_cert("client2.example.test")
    )

    def build(pins: list[str]) -> ServerTls:
        return ServerTls.build(
            loaded(certs.rsa),
            min_version="TLSv1.2",
            client_cert="optional",
            client_ca_file=certs.client_ca_file,
            client_cert_pins=pins,
        )

    pinned = build([pem_pin(certs.client)])
    with handshake(pinned.context, with_client_cert(certs, certs.client)) as outcome:
        assert outcome.server is not None
        assert pinned.peer_allowed(outcome.server)
    # Verified by the CA, but not the pinned key: refused.
    with handshake(pinned.context, with_client_cert(certs, other_client)) as outcome:
        assert outcome.server is not None
        assert not pinned.peer_allowed(outcome.server)
    # No certificate on an optional listener: as without pins.
    with handshake(pinned.context, trusting_client(certs)) as outcome:
        assert outcome.server is not None
        assert pinned.peer_allowed(outcome.server)


def test_client_certificate_settings_follow_sni(certs: Certs) -> None:
    tls = ServerTls.build(
        loaded(certs.rsa, certs.other),
        min_version="TLSv1.2",
        client_cert="required",
        client_ca_file=certs.client_ca_file,
    )
    with handshake(tls.context, with_client_cert(certs, certs.client), OTHER) as outcome:
        assert outcome.ok, (outcome.server_error, outcome.client_error)
        assert outcome.served_der == certs.other.der
    with handshake(tls.context, trusting_client(certs), OTHER) as outcome:
        assert outcome.server_reason() == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


def test_client_certificate_config_errors(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(TlsConfigError) as caught:
        ServerTls.build(
            loaded(certs.rsa),
            min_version="TLSv1.2",
            client_cert="required",
            client_cert_pins=[pem_pin(certs.client)],
            listener_key="listeners.3",
        )
    [line] = caught.value.problems
    assert line.startswith("listeners.3.client_ca_file: required when client_cert is required")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nope\n")
    with pytest.raises(TlsConfigError) as caught:
        ServerTls.build(
            loaded(certs.rsa, certs.other),
            min_version="TLSv1.2",
            client_cert="optional",
            client_ca_file=garbage,
            listener_key="listeners.0",
        )
    [line] = caught.value.problems
    assert line.startswith(f"listeners.0.client_ca_file: {garbage}: ")
    with pytest.raises(TlsConfigError) as caught:
        ServerTls.build(
            loaded(certs.rsa), min_version="TLSv1.2", client_cert_pins=[pem_pin(certs.client)]
        )
    assert caught.value.problems == [
        "listener.client_cert_pins: need client_cert optional or required"
    ]


# ---------------------------------------------------------------------------------------------
# contexts: the upstream client
# ---------------------------------------------------------------------------------------------


def upstream_server(certs: Certs, **kwargs: object) -> ServerTls:
    return ServerTls.build(loaded(certs.rsa, certs.ecdsa), min_version="TLSv1.2", **kwargs)  # type: ignore[arg-type]


def test_client_context_verifies_against_the_ca_file(certs: Certs) -> None:
    context = client_context(verify=True, ca_file=certs.ca_file, client_cert=None, client_key=None)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    with handshake(upstream_server(certs).context, context, MX) as outcome:
        assert outcome.ok, (outcome.server_error, outcome.client_error)


def test_client_context_fails_on_a_wrong_name(certs: Certs) -> None:
    context = client_context(verify=True, ca_file=certs.ca_file, client_cert=None, client_key=None)
    with handshake(upstream_server(certs).context, context, "wrong.example.test") as outcome:
        assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
        assert "Hostname mismatch" in str(outcome.client_error)


def test_client_context_fails_on_an_unknown_ca(certs: Certs) -> None:
    context = client_context(
        verify=True, ca_file=certs.client_ca_file, client_cert=None, client_key=None
    )
    with handshake(upstream_server(certs).context, context, MX) as outcome:
        assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)


def test_client_context_without_verification(certs: Certs) -> None:
    context = client_context(verify=False, ca_file=None, client_cert=None, client_key=None)
    assert context.verify_mode == ssl.CERT_NONE
    with handshake(upstream_server(certs).context, context, "wrong.example.test") as outcome:
        assert outcome.ok


def test_client_context_presents_a_client_certificate(certs: Certs) -> None:
    server = upstream_server(certs, client_cert="required", client_ca_file=certs.client_ca_file)
    context = client_context(
        verify=True,
        ca_file=certs.ca_file,
        client_cert=certs.client.cert,
        client_key=certs.client.key,
    )
    with handshake(server.context, context, MX) as outcome:
        assert outcome.ok, (outcome.server_error, outcome.client_error)


def test_client_context_profile(certs: Certs) -> None:
    context = client_context(
        verify=True, ca_file=None, client_cert=None, client_key=None, min_version="TLSv1.3"
    )
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.options & ssl.OP_NO_COMPRESSION
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(TLS12_CIPHERS.split(":"))


def test_client_context_file_problems(tmp_path: Path, certs: Certs) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nope\n")
    with pytest.raises(TlsConfigError) as caught:
        client_context(
            verify=True, ca_file=garbage, client_cert=certs.rsa.cert, client_key=certs.ecdsa.key
        )
    assert [line.split(":")[0] for line in caught.value.problems] == [
        "upstream.ca_file",
        "upstream.client_cert",
    ]


# ---------------------------------------------------------------------------------------------
# facts
# ---------------------------------------------------------------------------------------------


def test_plaintext_facts() -> None:
    facts = TlsFacts.plaintext(starttls_offered=True)
    assert not facts.active
    assert facts.began is TlsStart.NONE
    assert facts.starttls_offered
    assert facts.log_value() == "none"
    assert facts.received_clause() == ""


def test_facts_text_forms() -> None:
    facts = TlsFacts(
        began=TlsStart.STARTTLS, version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256
    )
    assert facts.active
    assert facts.log_value() == "TLSv1.3/TLS_AES_256_GCM_SHA384"
    assert facts.received_clause() == (
        "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))"
    )


def test_facts_from_a_handshake(certs: Certs) -> None:
    tls = ServerTls.build(loaded(certs.rsa, certs.ecdsa), min_version="TLSv1.2")
    client = trusting_client(certs)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES256-GCM-SHA384")
    with handshake(tls.context, client) as outcome:
        assert outcome.server is not None
        facts = TlsFacts.from_ssl_object(
            outcome.server, began=TlsStart.STARTTLS, sni=tls.sni_of(outcome.server)
        )
    assert facts == TlsFacts(
        began=TlsStart.STARTTLS,
        version="TLSv1.2",
        cipher="ECDHE-RSA-AES256-GCM-SHA384",
        bits=256,
        sni=MX,
        peer_cert_sha256=None,
        starttls_offered=True,
    )
    assert facts.log_value() == "TLSv1.2/ECDHE-RSA-AES256-GCM-SHA384"
