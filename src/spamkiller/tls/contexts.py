"""The SSLContexts Spam Killer speaks TLS with: inbound (``ServerTls``) and to the upstream.

Rules this module keeps:

- Profile: Mozilla's "intermediate" server-side TLS guideline, version 5.7. TLS 1.2 and 1.3 only;
  the floor comes from config and is never below TLS 1.2. TLS 1.2 suites are exactly the
  guideline's nine ECDHE/DHE AEAD suites; TLS 1.3 suites are OpenSSL's defaults (the guideline's
  three). The client picks the suite (the guideline turns server preference off: every allowed
  suite is strong, and clients know best whether they have AES hardware). Compression and
  renegotiation are off; session tickets stay on (cheap resumption for busy senders), one per
  TLS 1.3 handshake as Postfix does.
- The DHE suites need finite-field parameters, which Python cannot ask OpenSSL to choose by
  itself; we load the RFC 7919 ``ffdhe2048`` group the guideline names, computed from the RFC's
  formula rather than pasted as an opaque blob.
- RSA and ECDSA certificates for the same names are served together: OpenSSL holds one certificate
  per key type in a context and picks by the client's signature algorithms, so old RSA-only peers
  and modern ones both get a certificate they can check.
- Pairs whose names overlap form one group and share one context; groups with different names get
  their own context, chosen by SNI (exact name, or a ``*.`` wildcard covering one label). Unknown
  or absent SNI keeps the default context: the group of the first configured pair. Two pairs of
  the same key type in one group are a config error, because OpenSSL would silently serve only
  the later one.
- The name a client asked for is recorded by the SNI callback (``ServerTls.sni_of``): on the
  server side ``ssl_object.server_hostname`` stays None. It is the peer's input: recorded
  lowercased, at most 255 characters, anything outside a host name's alphabet replaced by "?".

Client certificates (mTLS) and pins: Python's ``ssl`` cannot ask a client for a certificate
without also verifying its chain against loaded CAs (there is no "accept any chain" verify
callback), and a pin list alone gives OpenSSL nothing to verify against. So a listener with
``client_cert: optional|required`` must name ``client_ca_file``; the handshake verifies the chain
against it, and ``client_cert_pins``, when given, narrow further: after the handshake the server
asks ``ServerTls.peer_allowed``, which accepts a presented certificate only if its SPKI pin is
listed. Fail closed: a verified certificate with the wrong key is refused, not downgraded. A
client that shows no certificate on an ``optional`` listener is allowed, exactly as it would be
without pins. ``VERIFY_X509_PARTIAL_CHAIN`` lets the CA file hold an intermediate or the client's
own self-signed certificate as the trust anchor, which is how small internal hops are often run.

To the upstream (``client_context``): verification on means the system trust store plus the
optional ``ca_file``, hostname checked, same version floor and suites. Verification off is the
admin's explicit choice (``verify_cert: false``) and nothing here second-guesses it.
"""

from __future__ import annotations

import _ssl
import base64
import ctypes
import functools
import ssl
import sys
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

from spamkiller.errors import TlsConfigError
from spamkiller.tls.certs import LoadedPair, spki_pin

__all__ = [
    "MOZILLA_GUIDELINE",
    "TLS12_CIPHERS",
    "ClientCertMode",
    "ServerTls",
    "client_context",
    "ffdhe2048_prime",
    "pin_matches",
    "tls_version",
]

MOZILLA_GUIDELINE = "5.7"
"""The Mozilla server-side TLS guideline version whose "intermediate" profile we follow."""

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)
"""TLS 1.2 suites of the intermediate profile, in its order (OpenSSL names)."""

ClientCertMode = Literal["none", "optional", "required"]

_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_VERIFY_MODES: dict[str, ssl.VerifyMode] = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
# OpenSSL caps a host_name extension at 255 bytes; a recorded SNI never exceeds that either.
_MAX_SNI = 255
_SNI_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_*")


def tls_version(name: str) -> ssl.TLSVersion:
    """Map "TLSv1.2" or "TLSv1.3" to ``ssl.TLSVersion``; anything else (older too): ValueError."""
    try:
        return _VERSIONS[name]
    except KeyError:
        raise ValueError(f"must be TLSv1.2 or TLSv1.3, got {name!r}") from None


@functools.cache
def ffdhe2048_prime() -> int:
    """The RFC 7919 ffdhe2048 prime: 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1."""
    # floor(2^1918 * e) from the series e = sum(1/k!), in integers with 128 guard bits: each term
    # is truncated, so the sum is low by at most one unit per term (about 300), far below 2^128.
    guard = 128
    term = 1 << (1918 + guard)
    total = 0
    k = 0
    while term:
        total += term
        k += 1
        term //= k
    e_scaled = total >> guard
    return 2**2048 - 2**1984 + (e_scaled + 560316) * 2**64 - 1


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))  # leading 0: positive


@functools.cache
def _ffdhe2048_pem() -> bytes:
    """PKCS#3 DHParameter {p, g=2} as PEM, encoded here: cryptography deprecates its FFDH API."""
    der = _der(0x30, _der_int(ffdhe2048_prime()) + _der_int(2))
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    text = "\n".join(["-----BEGIN DH PARAMETERS-----", *lines, "-----END DH PARAMETERS-----", ""])
    return text.encode()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"spam-killer: warning: {message}", file=sys.stderr)


_WARNED: set[str] = set()


# Mozilla intermediate's key-exchange groups. Python's ssl has no setter for them before 3.15
# (SSLContext.set_groups); OpenSSL's defaults add X448, secp521r1 and the ffdhe groups.
TLS_GROUPS = b"X25519:prime256v1:secp384r1"
_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list() is this SSL_CTX_ctrl() call


@functools.cache
def _libssl() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(_ssl.__file__)  # dlsym on it reaches the libssl it is linked to
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    except (OSError, AttributeError):
        return None
    return lib


def restrict_groups(context: ssl.SSLContext, groups: bytes = TLS_GROUPS) -> bool:
    """Limit key exchange to `groups`; False (and the context unchanged) if it cannot be done.

    Uses `set_groups` where Python has it. Otherwise the OpenSSL call goes through ctypes on the
    SSL_CTX pointer CPython keeps right after the object header; the pointer is trusted only if
    OpenSSL reads back the very options Python reports for this context.
    """
    setter = getattr(context, "set_groups", None)
    if setter is not None:
        setter(groups.decode())
        return True
    lib = _libssl()
    if lib is None:
        return False
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(context.options):
        return False
    done = lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(groups))
    return bool(done == 1)


def _harden(context: ssl.SSLContext, min_version: ssl.TLSVersion) -> None:
    """Apply the profile shared by server and client contexts."""
    context.minimum_version = min_version
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_SINGLE_DH_USE
    )
    # Python turns server preference on by default; the profile leaves the choice to the client.
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if not restrict_groups(context):
        _warn_once(
            "cannot restrict TLS key-exchange groups on this Python/OpenSSL: "
            "OpenSSL's default groups stay enabled"
        )


def _load_dh(context: ssl.SSLContext) -> None:
    # load_dh_params only reads from a path, so the computed PEM goes through a private temp file.
    with tempfile.NamedTemporaryFile(prefix="spamkiller-ffdhe2048-", suffix=".pem") as handle:
        handle.write(_ffdhe2048_pem())
        handle.flush()
        context.load_dh_params(handle.name)


def pin_matches(cert_der: bytes | None, pins: Sequence[str]) -> bool:
    """True if the DER certificate's SPKI pin is one of `pins` (False without a certificate)."""
    if cert_der is None or not pins:
        return False
    return spki_pin(cert_der) in pins


def _group_pairs(pairs: Sequence[LoadedPair]) -> list[list[int]]:
    """Indices of `pairs` grouped so that pairs sharing any name land in the same group."""
    parent = list(range(len(pairs)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    owner: dict[str, int] = {}
    for index, pair in enumerate(pairs):
        for name in pair.names:
            if name in owner:
                first, second = root(owner[name]), root(index)
                # The lower index stays the root, so a group is named by its first pair.
                parent[max(first, second)] = min(first, second)
            else:
                owner[name] = index
    groups: dict[int, list[int]] = {}
    for index in range(len(pairs)):
        groups.setdefault(root(index), []).append(index)
    return [groups[key] for key in sorted(groups)]


class ServerTls:
    """Server-side TLS for one listener: the context to hand to asyncio, SNI, client certificates.

    Build with ``ServerTls.build``; ``context`` is the default context (first pair's names) and
    carries the SNI callback that switches to another group's context.
    """

    __slots__ = ("_by_name", "_requested", "client_cert", "context", "pairs", "pins")

    context: ssl.SSLContext
    pairs: tuple[LoadedPair, ...]
    client_cert: ClientCertMode
    pins: tuple[str, ...]

    def __init__(
        self,
        *,
        context: ssl.SSLContext,
        by_name: dict[str, ssl.SSLContext],
        pairs: tuple[LoadedPair, ...],
        client_cert: ClientCertMode,
        pins: tuple[str, ...],
    ) -> None:
        self.context = context
        self.pairs = pairs
        self.client_cert = client_cert
        self.pins = pins
        self._by_name = by_name
        self._requested: weakref.WeakKeyDictionary[ssl.SSLObject | ssl.SSLSocket, str] = (
            weakref.WeakKeyDictionary()
        )
        if len(set(by_name.values()) | {context}) > 1:
            context.sni_callback = self._on_sni
        else:
            # One group: no switching needed, but the name is still worth recording for logs.
            context.sni_callback = self._record_sni

    @classmethod
    def build(
        cls,
        pairs: Sequence[LoadedPair],
        *,
        min_version: str,
        client_cert: str = "none",
        client_ca_file: Path | None = None,
        client_cert_pins: Sequence[str] = (),
        key_path_prefix: str = "tls.certificates",
        listener_key: str = "listener",
    ) -> ServerTls:
        """Make the contexts; raise TlsConfigError (naming config keys) if they cannot be made.

        `key_path_prefix` names the pairs in problem lines (``tls.certificates.N``) and
        `listener_key` the listener whose client-certificate settings these are (``listeners.N``).
        """
        problems: list[str] = []
        if not pairs:
            raise TlsConfigError([f"{key_path_prefix}: no certificate to serve"])
        try:
            floor = tls_version(min_version)
        except ValueError as error:
            problems.append(f"tls.min_version: {error}")
            floor = ssl.TLSVersion.TLSv1_2
        if client_cert not in _VERIFY_MODES:
            problems.append(
                f"{listener_key}.client_cert: must be none, optional or required, "
                f"got {client_cert!r}"
            )
            client_cert = "required"  # keep going to report more; never fall back to "none"
        mode = cast(ClientCertMode, client_cert)
        if mode != "none" and client_ca_file is None:
            problems.append(
                f"{listener_key}.client_ca_file: required when client_cert is {mode} "
                "(pins alone cannot be checked during the handshake)"
            )
        if mode == "none" and client_cert_pins:
            problems.append(
                f"{listener_key}.client_cert_pins: need client_cert optional or required"
            )

        groups = _group_pairs(pairs)
        for group in groups:
            seen: dict[str, int] = {}
            for index in group:
                pair = pairs[index]
                if pair.key_type in seen:
                    other = seen[pair.key_type]
                    problems.append(
                        f"{key_path_prefix}.{index}.cert: {pair.cert_path} is a second "
                        f"{pair.key_type} certificate for names of {key_path_prefix}.{other} "
                        f"({pairs[other].cert_path}); one certificate per key type and name"
                    )
                else:
                    seen[pair.key_type] = index
        if problems:
            raise TlsConfigError(problems)

        contexts: list[ssl.SSLContext] = []
        by_name: dict[str, ssl.SSLContext] = {}
        for group in groups:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            _harden(context, floor)
            _load_dh(context)
            # One TLS 1.3 ticket per full handshake, as Postfix issues: a mail client resumes one
            # session per destination; OpenSSL's default of two serves browsers that open
            # connections in parallel, and the second costs every handshake its crypto and bytes.
            context.num_tickets = 1
            # Every context gets the same client-certificate settings: when the SNI callback
            # switches contexts, OpenSSL keeps the verify mode of the first but takes the trust
            # store of the new one.
            cls._configure_client_auth(
                context, mode, client_ca_file, f"{listener_key}.client_ca_file", problems
            )
            for index in group:
                pair = pairs[index]
                try:
                    context.load_cert_chain(pair.cert_path, pair.key_path)
                except (ssl.SSLError, OSError) as error:
                    problems.append(
                        f"{key_path_prefix}.{index}.cert: {pair.cert_path} with key "
                        f"{pair.key_path} cannot be served: {_reason(error)}"
                    )
                for name in pair.names:
                    by_name.setdefault(name, context)
            contexts.append(context)
        if problems:
            # The same CA problem repeats once per context; say it once.
            raise TlsConfigError(list(dict.fromkeys(problems)))
        return cls(
            context=contexts[0],
            by_name=by_name,
            pairs=tuple(pairs),
            client_cert=mode,
            pins=tuple(client_cert_pins),
        )

    @staticmethod
    def _configure_client_auth(
        context: ssl.SSLContext,
        mode: ClientCertMode,
        ca_file: Path | None,
        key: str,
        problems: list[str],
    ) -> None:
        if mode == "none" or ca_file is None:
            return
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as error:
            problems.append(f"{key}: {ca_file}: {_reason(error)}")
            return
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.verify_mode = _VERIFY_MODES[mode]

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context that serves `server_name` (the default one for unknown or no name)."""
        if not server_name:
            return self.context
        name = server_name.rstrip(".").lower()
        found = self._by_name.get(name)
        if found is None and "." in name:
            found = self._by_name.get("*." + name.split(".", 1)[1])
        return found if found is not None else self.context

    def sni_of(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
        """The server name the client sent in this handshake, lowercased; None if it sent none."""
        return self._requested.get(ssl_object)

    def peer_allowed(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> bool:
        """After the handshake: may this client proceed, given the listener's pins?

        The chain was already verified by OpenSSL; this adds the pin check. Without pins every
        verified (or, on an optional listener, absent) certificate is allowed.
        """
        der = ssl_object.getpeercert(binary_form=True)
        if der is None:
            return self.client_cert != "required"
        if not self.pins:
            return True
        return pin_matches(der, self.pins)

    def _record_sni(
        self,
        ssl_object: ssl.SSLObject | ssl.SSLSocket,
        server_name: str | None,
        context: ssl.SSLContext,
    ) -> None:
        if server_name:
            self._requested[ssl_object] = _clean_sni(server_name)

    def _on_sni(
        self,
        ssl_object: ssl.SSLObject | ssl.SSLSocket,
        server_name: str | None,
        context: ssl.SSLContext,
    ) -> None:
        self._record_sni(ssl_object, server_name, context)
        chosen = self.context_for(server_name)
        if chosen is not ssl_object.context:
            ssl_object.context = chosen


def _clean_sni(server_name: str) -> str:
    """The requested name as recorded: lowercased, and anything outside a host name's alphabet
    replaced by "?", so a crafted name carries no control bytes into logs or headers."""
    name = server_name.rstrip(".").lower()[:_MAX_SNI]
    if _SNI_ALPHABET.issuperset(name):
        return name  # the usual case, without a loop over the characters
    return "".join(char if char in _SNI_ALPHABET else "?" for char in name)


def client_context(
    *,
    verify: bool,
    ca_file: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    min_version: str = "TLSv1.2",
    key_path_prefix: str = "upstream",
) -> ssl.SSLContext:
    """The context for relaying to the upstream; raise TlsConfigError for unusable files.

    `verify` on: certificate chain (system trust store plus `ca_file`) and host name are checked;
    the caller passes the name to check as ``server_hostname`` (also sent as SNI).
    `verify` off: nothing is checked, because the admin said so (``verify_cert: false``).
    """
    problems: list[str] = []
    try:
        floor = tls_version(min_version)
    except ValueError as error:
        raise TlsConfigError([f"tls.min_version: {error}"]) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, floor)
    if verify:
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if ca_file is not None:
            try:
                context.load_verify_locations(cafile=ca_file)
            except (ssl.SSLError, OSError) as error:
                problems.append(f"{key_path_prefix}.ca_file: {ca_file}: {_reason(error)}")
            # A private upstream's CA file may hold an intermediate or the server's own
            # certificate; let it be the anchor without the root that issued it.
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if (client_cert is None) != (client_key is None):
        problems.append(f"{key_path_prefix}.client_key: client_cert and client_key go together")
    elif client_cert is not None and client_key is not None:
        try:
            context.load_cert_chain(client_cert, client_key)
        except (ssl.SSLError, OSError) as error:
            problems.append(
                f"{key_path_prefix}.client_cert: {client_cert} with key {client_key}: "
                f"{_reason(error)}"
            )
    if problems:
        raise TlsConfigError(problems)
    return context


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
