"""The exception tree of Spam Killer. Imports nothing.

Each error says whose fault it is: the admin's (config), the remote peer's (protocol), or a
dependency's (upstream). Errors subclass the builtin they resemble, so callers that only know the
builtin still catch them.

    SpamKillerError
    ├── ConfigError(ValueError)          the admin's file is wrong; carries "key.path: reason" lines
    │   └── TlsConfigError               a certificate or key named in the config is unusable
    ├── DnsError (dns/resolver.py)       a lookup failed: DnsTempError (retry) or DnsPermError
    │                                    (DnsNxDomain, DnsNoData, DnsInvalidName)
    ├── StoreError (store/base.py)       the state store failed; the check's on_error applies
    ├── ProtocolError                    a peer broke SMTP
    │   ├── RemoteProtocolError          the other side did it (client inbound, upstream outbound)
    │   └── LocalProtocolError           we tried to send something illegal now (a bug)
    └── UpstreamError(ConnectionError)   the upstream could not take the mail; the client gets 4xx
        ├── UpstreamUnavailable          refused, unreachable, timed out, TLS or certificate failure
        └── UpstreamRejected             the upstream answered 4xx/5xx; carries its reply
"""

from __future__ import annotations


class SpamKillerError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SpamKillerError, ValueError):
    """The configuration is invalid. `problems` holds one "key.path: reason" line each."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TlsConfigError(ConfigError):
    """A certificate or key file named in the configuration is missing, broken or expired."""


class ProtocolError(SpamKillerError):
    """Someone broke the SMTP protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something SMTP forbids."""


class LocalProtocolError(ProtocolError):
    """We were about to send something illegal in the current state: a bug in the caller."""


class UpstreamError(SpamKillerError, ConnectionError):
    """The upstream did not take the mail; the inbound client must not see 250."""


class UpstreamUnavailable(UpstreamError):
    """No upstream could be reached, or TLS to it failed verification, or it stopped answering."""


class UpstreamRejected(UpstreamError):
    """The upstream answered with a 4xx or 5xx reply."""

    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text
        super().__init__(f"{code} {text}")
