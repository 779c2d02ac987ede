"""No open relay: the hard rule that a recipient must be ours, whatever else is true.

This is session policy, not scoring: it runs for every RCPT regardless of TLS state, client
certificate or score. Address tricks that older MTAs interpreted as routing (source routes, the
`%` hack, `!` paths, `@` hidden in a quoted local part, IP literals) are refused outright, so no
downstream server can be talked into relaying through us.
"""

from __future__ import annotations

from collections.abc import Collection

from spamkiller.smtp.address import Address
from spamkiller.smtp.replies import Reply

RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
ROUTING_REFUSED = Reply(550, "5.7.1", "Source routes and routing characters are not accepted")


def check_recipient(recipient: Address, domains: Collection[str]) -> Reply | None:
    """None if we may accept `recipient`; otherwise the refusal (RFC 5321 3.6 and 7.1)."""
    if recipient.domain is None:
        # RFC 5321 4.5.1: a bare <postmaster> is ours by definition.
        return None if recipient.is_postmaster else RELAY_DENIED
    if recipient.source_route or recipient.literal:
        return ROUTING_REFUSED
    local = recipient.local
    if recipient.quoted or "%" in local or "!" in local or "@" in local:
        return ROUTING_REFUSED
    if recipient.domain not in domains:
        return RELAY_DENIED
    return None
