"""What a session's TLS looked like: a small value the checks, logs and Received header read.

Rules this module keeps:

- ``TlsFacts`` is a frozen value taken once, right after the handshake (or at the start of a
  plaintext session). Nothing downstream touches an ``ssl`` object: checks score the facts, the
  log writes ``log_value()``, the Received header adds ``received_clause()``.
- How TLS began (``TlsStart``) is kept apart from whether it is active: a STARTTLS session and an
  implicit-TLS session look the same on the wire after the handshake, but not to the TLS signal
  checks, and a plaintext session on a listener that offered STARTTLS is a signal of its own
  (``starttls_offered``).
- The peer certificate is recorded only as its SPKI pin, never the certificate itself: enough to
  compare with ``client_cert_pins`` and to log, nothing that could leak more than the peer showed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import StrEnum

from spamkiller.tls.certs import spki_pin

__all__ = ["TlsFacts", "TlsStart"]


class TlsStart(StrEnum):
    """How a session came to use TLS."""

    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsFacts:
    """The TLS state of one SMTP session after its handshake (or of a plaintext session)."""

    began: TlsStart
    version: str | None = None
    """Protocol version as OpenSSL names it: "TLSv1.3"."""
    cipher: str | None = None
    """Cipher suite as OpenSSL names it: "TLS_AES_256_GCM_SHA384"."""
    bits: int | None = None
    """Secret bits of the cipher: 256."""
    sni: str | None = None
    """The server name the client asked for, if it sent one."""
    peer_cert_sha256: str | None = None
    """SPKI pin (``sha256/<base64>``) of the client's certificate, if it showed one."""
    starttls_offered: bool = False
    """We advertised STARTTLS in this session (a plaintext session that ignored it is a signal)."""

    @classmethod
    def plaintext(cls, *, starttls_offered: bool) -> TlsFacts:
        """Facts for a session without TLS (two shared instances: the facts are immutable)."""
        return _PLAINTEXT[starttls_offered]

    @classmethod
    def from_ssl_object(
        cls,
        ssl_object: ssl.SSLObject | ssl.SSLSocket,
        *,
        began: TlsStart,
        sni: str | None,
    ) -> TlsFacts:
        """Read the facts of a completed handshake.

        `sni` comes from the caller (``ServerTls.sni_of``): on the server side OpenSSL's requested
        name is only visible inside the SNI callback, not on the ssl object afterwards.
        """
        cipher = ssl_object.cipher()
        peer_der = ssl_object.getpeercert(binary_form=True)
        return cls(
            began=began,
            version=ssl_object.version(),
            cipher=cipher[0] if cipher else None,
            bits=cipher[2] if cipher else None,
            sni=sni,
            peer_cert_sha256=spki_pin(peer_der) if peer_der else None,
            # Implicit TLS never advertises STARTTLS; a STARTTLS session did, by definition.
            starttls_offered=began is TlsStart.STARTTLS,
        )

    @property
    def active(self) -> bool:
        """True when the session runs over TLS."""
        return self.began is not TlsStart.NONE

    def log_value(self) -> str:
        """The ``tls=`` log field: "TLSv1.3/TLS_AES_256_GCM_SHA384", or "none"."""
        if not self.active:
            return "none"
        return f"{self.version or 'unknown'}/{self.cipher or 'unknown'}"

    def received_clause(self) -> str:
        """The Received header's TLS comment, as Postfix's smtpd_tls_received_header writes it.

        "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))", or "" without TLS.
        Python's ssl exposes only the secret bits, not the algorithm bits OpenSSL reports
        separately; for every suite our profile allows the two are equal, so both slots show it.
        """
        if not self.active:
            return ""
        bits = "" if self.bits is None else f" ({self.bits}/{self.bits} bits)"
        return f"(using {self.version or 'unknown'} with cipher {self.cipher or 'unknown'}{bits})"


_PLAINTEXT = {
    offered: TlsFacts(began=TlsStart.NONE, starttls_offered=offered) for offered in (False, True)
}
