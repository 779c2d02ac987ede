"""Certificate and key files: load and check them, make a self-signed pair, compute SPKI pins.

Rules this module keeps:

- Every problem with an admin's files is reported, not only the first, as one
  ``key.path: reason`` line that names the config key and the file (``TlsConfigError``). Nothing
  here lets a traceback reach the admin for a bad file.
- A pair is usable only if both files are readable PEM, the key is a private key, the key belongs
  to the certificate (public keys compared) and the certificate is valid now. The first
  certificate in the cert file is the leaf; any after it are the chain sent along with it.
- Encrypted private keys are refused: the server starts unattended, so there is nobody to type a
  passphrase. File permissions protect the key instead (``make_self_signed`` writes mode 0600).
- Names are the certificate's DNS subjectAltNames, lowercased; the subject CN only when there are
  none (what clients fall back to as well).
- An SPKI pin is ``sha256/`` + base64 of the SHA-256 of the DER SubjectPublicKeyInfo (the HPKP and
  DANE ``x 1 1`` form): it survives re-issuing a certificate for the same key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spamkiller.errors import TlsConfigError

__all__ = [
    "KeyType",
    "LoadedPair",
    "check_ca_file",
    "inspect_pair",
    "load_pairs",
    "make_self_signed",
    "spki_pin",
]

KeyType = Literal["RSA", "ECDSA", "Ed25519", "other"]

_PIN_PREFIX = "sha256/"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedPair:
    """A certificate and its key, checked and ready for ``ssl.SSLContext.load_cert_chain``."""

    cert_path: Path
    key_path: Path
    key_type: KeyType
    names: tuple[str, ...]
    not_after: dt.datetime
    key_bits: int


def spki_pin(cert_der: bytes) -> str:
    """Return ``sha256/<base64>`` of the SubjectPublicKeyInfo of a DER certificate."""
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _PIN_PREFIX + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def load_pairs(
    pairs: Sequence[tuple[Path, Path]],
    *,
    key_path_prefix: str = "tls.certificates",
    now: dt.datetime | None = None,
) -> list[LoadedPair]:
    """Load and check each (cert, key) pair; raise TlsConfigError listing every problem.

    Problem lines name ``{key_path_prefix}.{index}.cert`` or ``.key`` and the file.
    """
    moment = _utc(now)
    loaded: list[LoadedPair] = []
    problems: list[str] = []
    for index, (cert_path, key_path) in enumerate(pairs):
        pair, found = inspect_pair(
            Path(cert_path),
            Path(key_path),
            cert_key=f"{key_path_prefix}.{index}.cert",
            key_key=f"{key_path_prefix}.{index}.key",
            now=moment,
        )
        problems.extend(found)
        if pair is not None:
            loaded.append(pair)
    if problems:
        raise TlsConfigError(problems)
    return loaded


def inspect_pair(
    cert_path: Path,
    key_path: Path,
    *,
    cert_key: str,
    key_key: str,
    now: dt.datetime | None = None,
) -> tuple[LoadedPair | None, list[str]]:
    """Check one pair; return it (or None) with the problem lines, naming the given config keys.

    For callers whose keys do not follow the ``prefix.N.cert`` shape (``upstream.client_cert``).
    """
    moment = _utc(now)
    problems: list[str] = []
    cert_data = _read(cert_path, cert_key, problems)
    key_data = _read(key_path, key_key, problems)

    leaf: x509.Certificate | None = None
    if cert_data is not None:
        leaf = _leaf_certificate(cert_path, cert_data, cert_key, problems)
    private_key: PrivateKeyTypes | None = None
    if key_data is not None:
        private_key = _private_key(key_path, key_data, key_key, problems)

    if leaf is None:
        return None, problems
    not_before = leaf.not_valid_before_utc
    not_after = leaf.not_valid_after_utc
    if not_after < moment:
        problems.append(f"{cert_key}: {cert_path} expired on {_stamp(not_after)}")
    if not_before > moment:
        problems.append(f"{cert_key}: {cert_path} is not valid before {_stamp(not_before)}")
    if private_key is not None and not _same_public_key(private_key, leaf.public_key()):
        problems.append(f"{key_key}: {key_path} does not match certificate {cert_path}")
    if problems or private_key is None:
        return None, problems

    key_type, key_bits = _describe_key(leaf.public_key())
    pair = LoadedPair(
        cert_path=cert_path,
        key_path=key_path,
        key_type=key_type,
        names=_names(leaf),
        not_after=not_after,
        key_bits=key_bits,
    )
    return pair, problems


def check_ca_file(path: Path, *, key: str) -> list[str]:
    """Problem lines for a CA file: it must be readable and hold at least one PEM certificate."""
    problems: list[str] = []
    data = _read(path, key, problems)
    if data is not None:
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            problems.append(f"{key}: {path} holds no PEM certificate")
    return problems


def make_self_signed(cert_path: Path, key_path: Path, hostname: str, *, days: int = 825) -> None:
    """Write a self-signed RSA-2048 certificate for `hostname` and its key (mode 0600).

    RSA rather than ECDSA because every SMTP client that speaks TLS at all can use it; this pair
    exists so STARTTLS works on first start, before the admin installs a real certificate.
    825 days is the longest lifetime clients that check lifetimes still accept.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate slightly slow clocks
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
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
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    # Create the key file with 0600 from the start: writing first and chmod-ing after would leave
    # a window where another local user could read it.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        # O_CREAT's mode does not apply to a file that already existed: tighten it before writing.
        os.fchmod(fd, 0o600)
        key_file.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        # A naive datetime is taken as UTC, like cryptography's own naive accessors.
        return now.replace(tzinfo=dt.UTC)
    return now.astimezone(dt.UTC)


def _stamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: Path, key: str, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{key}: {path}: no such file")
    except IsADirectoryError:
        problems.append(f"{key}: {path}: is a directory, not a file")
    except PermissionError:
        problems.append(f"{key}: {path}: not readable (permission denied)")
    except OSError as error:
        problems.append(f"{key}: {path}: cannot read: {error.strerror or error}")
    return None


def _leaf_certificate(
    path: Path, data: bytes, key: str, problems: list[str]
) -> x509.Certificate | None:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        problems.append(f"{key}: {path} is not a PEM certificate")
        return None
    return certificates[0]


def _private_key(path: Path, data: bytes, key: str, problems: list[str]) -> PrivateKeyTypes | None:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password is needed but none was given.
        problems.append(f"{key}: {path} is encrypted; give an unencrypted key (mode 0600)")
    except (ValueError, UnsupportedAlgorithm):
        problems.append(f"{key}: {path} is not a PEM private key")
    return None


def _same_public_key(private_key: PrivateKeyTypes, public_key: CertificatePublicKeyTypes) -> bool:
    # Compare the encoded SubjectPublicKeyInfo: it works the same for every key type, and the
    # equality operators of the key objects are not defined across all of them.
    spki_format = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        ours = private_key.public_key().public_bytes(der, spki_format)
    except (ValueError, TypeError):
        return False
    return ours == public_key.public_bytes(der, spki_format)


def _describe_key(public_key: CertificatePublicKeyTypes) -> tuple[KeyType, int]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA", public_key.key_size
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ECDSA", public_key.curve.key_size
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "other", 456
    return "other", getattr(public_key, "key_size", 0)


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    names: list[str] = []
    if san is not None:
        names = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    if not names:
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value
            text = value if isinstance(value, str) else value.decode("utf-8", "replace")
            names.append(text.lower())
    # Keep the certificate's order (the first name is the one admins recognise) without repeats.
    return tuple(dict.fromkeys(names))
