"""SMTP sequencing as data: the only place that says which command may follow which.

`TRANSITIONS[(state, verb)]` is the state after a positive reply to `verb` in `state`. A pair that
is missing is out of sequence and earns the reply from `sequence_error`. Both roles use this table:
the server to judge its client, the client (relay) to refuse to send a command out of turn.
"""

from __future__ import annotations

from enum import Enum

from spamkiller.smtp import replies
from spamkiller.smtp.replies import Reply


class State(Enum):
    # Members are singletons: identity hashing keeps the TRANSITIONS lookups off Enum's
    # Python-level __hash__, which runs several times per command.
    __hash__ = object.__hash__

    START = "start"  # connected, banner not yet sent
    GREETED = "greeted"  # banner sent (or TLS just started): EHLO/HELO needed
    READY = "ready"  # EHLO done, no transaction
    MAIL = "mail"  # sender accepted
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading message text after 354
    BDAT = "bdat"  # inside a CHUNKING transaction (RFC 3030)
    TLS = "tls"  # STARTTLS answered 220; the driver must start TLS now
    CLOSED = "closed"


class Verb(Enum):
    __hash__ = object.__hash__

    EHLO = "EHLO"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BDAT = "BDAT"
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"
    VRFY = "VRFY"
    EXPN = "EXPN"
    HELP = "HELP"
    STARTTLS = "STARTTLS"


VERBS: dict[str, Verb] = {v.value: v for v in Verb}
# Enum.value is a Python-level property; code that names a verb on every command reads this.
VERB_NAMES: dict[Verb, str] = {v: v.value for v in Verb}

_COMMAND_STATES = (State.GREETED, State.READY, State.MAIL, State.RCPT, State.BDAT)
_AFTER_EHLO = (State.READY, State.MAIL, State.RCPT)


def _build() -> dict[tuple[State, Verb], State]:
    table: dict[tuple[State, Verb], State] = {}
    for state in _COMMAND_STATES:
        # Harmless anywhere: they do not touch the transaction.
        for verb in (Verb.NOOP, Verb.HELP, Verb.VRFY, Verb.EXPN, Verb.QUIT):
            table[state, verb] = state
        table[state, Verb.RSET] = State.GREETED if state is State.GREETED else State.READY
    for state in (State.GREETED, *_AFTER_EHLO):
        # RFC 5321 4.1.4: EHLO in mid-transaction resets it.
        table[state, Verb.EHLO] = State.READY
        table[state, Verb.HELO] = State.READY
    table[State.READY, Verb.MAIL] = State.MAIL
    table[State.MAIL, Verb.RCPT] = State.RCPT
    table[State.RCPT, Verb.RCPT] = State.RCPT
    table[State.RCPT, Verb.DATA] = State.DATA
    table[State.RCPT, Verb.BDAT] = State.BDAT
    table[State.BDAT, Verb.BDAT] = State.BDAT
    # RFC 3207 4.2: STARTTLS only outside a transaction, after EHLO.
    table[State.READY, Verb.STARTTLS] = State.TLS
    return table


TRANSITIONS: dict[tuple[State, Verb], State] = _build()

# Commands that must wait for TLS on a listener with require_tls (RFC 3207 4: 530 5.7.0).
TLS_REQUIRED: frozenset[Verb] = frozenset(
    {Verb.MAIL, Verb.RCPT, Verb.DATA, Verb.BDAT, Verb.VRFY, Verb.EXPN}
)


def sequence_error(state: State, verb: Verb) -> Reply:
    """The reply for `verb` sent out of turn in `state`."""
    if state is State.GREETED:
        return replies.NEED_EHLO
    if verb is Verb.MAIL and state in (State.MAIL, State.RCPT, State.BDAT):
        return replies.NESTED_MAIL
    if verb is Verb.RCPT:
        return replies.NEED_MAIL
    if verb is Verb.DATA and state is State.BDAT:
        return replies.BDAT_THEN_DATA
    if verb in (Verb.DATA, Verb.BDAT):
        return replies.NEED_MAIL if state is State.READY else replies.NEED_RCPT
    return replies.BAD_SEQUENCE
