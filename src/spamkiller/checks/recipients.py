"""Recipient checks: which local parts of our domains exist, and what counts as "unknown user".

Pure and stdlib-only: `config` builds the table (and reads the address files), the server asks
`RecipientDirectory.lookup` for every RCPT that passed the no-open-relay rule and counts unknown
recipients per session against `max_unknown` (the directory-harvest defence).

Matching is case-insensitive for the local part as well as the domain. RFC 5321 2.4 allows a
server to treat local parts case-sensitively, but almost none does (Postfix, Exim and Exchange
fold case), and a sender that writes Alice@ for alice@ should not get a bounce from us when the
mailbox would have taken it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from spamkiller.smtp.address import Address
from spamkiller.smtp.replies import Reply

TOO_MANY_UNKNOWN = Reply(421, "4.7.0", "Too many unknown recipients, closing connection")

# Reply codes that mean "no such mailbox" when an upstream gives no enhanced status code:
# 550 mailbox unavailable, 551 user not local, 553 mailbox name not allowed (RFC 5321 4.2.3).
_UNKNOWN_CODES = frozenset({550, 551, 553})


class Lookup(Enum):
    KNOWN = "known"
    UNKNOWN = "unknown"
    NOT_LISTED = "not listed"  # a domain without a list: only the upstream can tell


def user_unknown(recipient: str) -> Reply:
    """Our refusal of a recipient missing from its domain's list (Postfix's wording)."""
    return Reply(550, "5.1.1", f"<{recipient}>: Recipient address rejected: user unknown")


def means_unknown_user(reply: Reply) -> bool:
    """Does an upstream refusal at RCPT mean "no such user" (RFC 3463 class X.1.X, addressing)?

    With an enhanced status code only 5.1.x counts, so an upstream's policy refusal (550 5.7.1)
    is not taken for a harvest probe; without one, 550, 551 and 553 do.
    """
    if not reply.is_permanent:
        return False
    if reply.enhanced:
        return reply.enhanced.startswith("5.1.")
    return reply.code in _UNKNOWN_CODES


def _fold(local: str) -> str:
    return local.lower()


@dataclass(frozen=True, slots=True)
class RecipientDirectory:
    """Per-domain lists of the local parts that exist, sub-addressing, and the harvest cap.

    `known` maps a lowercase domain to its local parts (folded here, so callers may pass them as
    written). `delimiter` holds the sub-address delimiter characters (each one separates a tag,
    like Postfix's recipient_delimiter); "" turns sub-addressing off. `max_unknown` is the number
    of unknown recipients one session may try; 0 means no cap.
    """

    known: Mapping[str, frozenset[str]] = field(default_factory=dict)
    delimiter: str = "+"
    max_unknown: int = 5

    def __post_init__(self) -> None:
        folded = {d.lower(): frozenset(_fold(p) for p in parts) for d, parts in self.known.items()}
        object.__setattr__(self, "known", folded)

    def lookup(self, recipient: Address) -> Lookup:
        """KNOWN, UNKNOWN, or NOT_LISTED when its domain has no list (the upstream decides).

        `postmaster` is always known (RFC 5321 4.5.1). With sub-addressing the whole local part
        is tried first, then the part before the first delimiter, so a listed "a+b" still matches.
        Quoted local parts are compared as written (the relay rule refuses them before this).
        """
        if recipient.domain is None:
            return Lookup.KNOWN  # the bare <postmaster>
        parts = self.known.get(recipient.domain.lower())
        if parts is None:
            return Lookup.NOT_LISTED
        local = _fold(recipient.local)
        if local in parts or local == "postmaster":
            return Lookup.KNOWN
        base = self._base(local)
        if base and (base in parts or base == "postmaster"):
            return Lookup.KNOWN
        return Lookup.UNKNOWN

    def over_cap(self, unknown: int) -> bool:
        """True once a session's count of unknown recipients is past `max_unknown`."""
        return 0 < self.max_unknown < unknown

    def _base(self, local: str) -> str | None:
        """The local part before the first delimiter, or None if it has none."""
        cut = min((i for i in (local.find(c) for c in self.delimiter) if i >= 0), default=-1)
        return local[:cut] if cut >= 0 else None
