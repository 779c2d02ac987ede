"""TLS for Spam Killer: certificate files, SSL contexts in and out, and per-session TLS facts.

Imports only ``ssl``, ``cryptography`` and ``spamkiller.errors`` (see docs/architecture.md), so the
checks can read ``TlsFacts`` without pulling in the server. The rules each part keeps are in the
docstrings of ``certs``, ``contexts`` and ``facts``.
"""

from spamkiller.tls.certs import (
    KeyType,
    LoadedPair,
    check_ca_file,
    inspect_pair,
    load_pairs,
    make_self_signed,
    spki_pin,
)
from spamkiller.tls.contexts import (
    MOZILLA_GUIDELINE,
    TLS12_CIPHERS,
    ClientCertMode,
    ServerTls,
    client_context,
    pin_matches,
    tls_version,
)
from spamkiller.tls.facts import TlsFacts, TlsStart

__all__ = [
    "MOZILLA_GUIDELINE",
    "TLS12_CIPHERS",
    "ClientCertMode",
    "KeyType",
    "LoadedPair",
    "ServerTls",
    "TlsFacts",
    "TlsStart",
    "check_ca_file",
    "client_context",
    "inspect_pair",
    "load_pairs",
    "make_self_signed",
    "pin_matches",
    "spki_pin",
    "tls_version",
]
