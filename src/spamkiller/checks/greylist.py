"""Greylisting at RCPT that knows who the sender is.

The key is what stays the same when a legitimate sender retries:
- the sender domain that SPF authenticated (`CheckContext.authenticated_domain`), so a large
  sender retrying from another address of its pool is recognised;
- otherwise the client's network (/24, /64) with the sender and the recipient: the classic triplet,
  widened to the network because big senders retry from a neighbour address.
Senders are normalised so that per-message return paths do not defeat it: BATV tags and SRS hashes
are removed and digit runs (VERP ids) collapse.

A client skips greylisting when its network had `auto_pass_accepted` messages accepted (the
reputation record), when it is a TLS client whose last `auto_pass_tls_sessions` sessions all
used TLS, when it scores below `min_score` (an allow list), or when it is exempt (internal).
Store trouble follows `on_error`, never a silent pass.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from spamkiller.checks.base import CheckContext
from spamkiller.checks.ratelimit import STORE_TROUBLE, Network, guarded, in_any, network_of
from spamkiller.smtp.replies import Reply
from spamkiller.store.base import Store

ACCEPTED = "accepted"

# prvs=TAG=local (the BATV draft), msprvs1=TAG=local, btv1==TAG==local (Barracuda).
_BATV = re.compile(r"^(?:(?:prvs|msprvs\d?)=[^=]+=|btv1==[^=]+==)(.+)$")
_SRS = re.compile(r"^srs0[=+\-][^=]*=[^=]*=([^=]+)=(.+)$")
_DIGITS = re.compile(r"\d+")


def normalised_sender(sender: str) -> str:
    """The part of a return path that stays the same across a sender's messages."""
    if not sender:
        return "<>"
    local, _, domain = sender.lower().rpartition("@")
    batv = _BATV.match(local)
    if batv:
        local = batv.group(1)
    srs = _SRS.match(local)
    if srs:  # SRS0=hash=time=orig.domain=orig-local: keep the original, drop hash and time
        local = f"srs0={srs.group(1)}={srs.group(2)}"
    return f"{_DIGITS.sub('#', local)}@{domain}"


@dataclass(frozen=True, slots=True, kw_only=True)
class GreylistSettings:
    delay: float = 300.0
    retry_window: float = 2 * 86400.0
    expire: float = 35 * 86400.0
    min_score: float = 0.0
    auto_pass_accepted: int = 5
    auto_pass_tls_sessions: int = 0
    exempt: tuple[Network, ...] = ()
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    timeout: float = 1.0
    on_error: str = "accept"


@dataclass(frozen=True, slots=True, kw_only=True)
class GreyOutcome:
    """`reply` tempfails the recipient (None: go on); `status` says why, for the log."""

    status: str  # passed | new | early | skip:<why> | error
    reply: Reply | None = None
    error: str | None = None


def tls_key(ip: str) -> str:
    return f"tls:ip:{ip}"


class Greylister:
    """One per worker; `session()` gives the per-connection view that remembers auto-pass."""

    def __init__(self, store: Store, settings: GreylistSettings) -> None:
        self.store = store
        self.settings = settings

    def network(self, ip: str) -> str:
        s = self.settings
        return network_of(ip, ipv4_prefix=s.ipv4_prefix, ipv6_prefix=s.ipv6_prefix)

    def key(self, ctx: CheckContext, recipient: str) -> str:
        sender = normalised_sender(ctx.mail_from or "")
        rcpt = recipient.lower()
        if ctx.authenticated_domain:
            return f"grey:dom:{ctx.authenticated_domain.lower()}|{sender}|{rcpt}"
        return f"grey:net:{self.network(ctx.client_ip)}|{sender}|{rcpt}"

    def reputation_key(self, ctx: CheckContext) -> str:
        if ctx.authenticated_domain:
            return f"rep:dom:{ctx.authenticated_domain.lower()}"
        return f"rep:net:{self.network(ctx.client_ip)}"

    def session(self, ctx: CheckContext) -> GreylistSession:
        return GreylistSession(self, ctx)

    async def record_accepted(self, ctx: CheckContext) -> str | None:
        """Count one message the upstream accepted; the store error, if any. Not worth a write
        for an exempt client (the caller checks `GreylistSession.exempt`)."""
        _, error = await guarded(
            self.store.record_outcome(
                self.reputation_key(ctx), ACCEPTED, expire=self.settings.expire
            ),
            self.settings.timeout,
        )
        return error


class GreylistSession:
    def __init__(self, greylister: Greylister, ctx: CheckContext) -> None:
        self.greylister = greylister
        self.ctx = ctx
        # The client does not change during a session: exempt is decided once.
        self.exempt = in_any(ctx.client_ip, greylister.settings.exempt)
        self._skip: str | None = None  # why this transaction is not greylisted, once known
        self._skip_known = False

    def new_transaction(self) -> None:
        """Auto-pass is judged per transaction: the sender, and so its record, may differ."""
        self._skip, self._skip_known = None, False

    async def check(self, recipient: str, score: float) -> GreyOutcome:
        g = self.greylister
        s = g.settings
        ctx = self.ctx
        if self.exempt:
            return GreyOutcome(status="skip:exempt")
        if ctx.tls.peer_cert_sha256 is not None:  # a verified client certificate (mTLS)
            return GreyOutcome(status="skip:client-certificate")
        if score < s.min_score:
            return GreyOutcome(status="skip:score")
        skip, error = await self._auto_pass()
        if error is not None:
            return self._trouble(error)
        if skip is not None:
            return GreyOutcome(status=f"skip:{skip}")
        result, error = await guarded(
            g.store.greylist(
                g.key(ctx, recipient),
                delay=s.delay,
                expire=s.expire,
                retry_window=s.retry_window,
            ),
            s.timeout,
        )
        if error is not None or result is None:
            return self._trouble(error or "store gave no answer")
        if result.passed:
            return GreyOutcome(status="passed")
        wait = max(1, math.ceil(result.retry_after))
        early = result.retry_after < s.delay - 1e-6
        return GreyOutcome(
            status="early" if early else "new",
            reply=Reply(451, "4.7.1", f"Greylisted, please try again in {wait} seconds"),
        )

    async def _auto_pass(self) -> tuple[str | None, str | None]:
        """(why this transaction skips greylisting or None, store error); asked once."""
        if self._skip_known:
            return self._skip, None
        g = self.greylister
        s = g.settings
        ctx = self.ctx
        if s.auto_pass_accepted:
            record, error = await guarded(g.store.reputation(g.reputation_key(ctx)), s.timeout)
            if error is not None:
                return None, error
            if record is not None and record.count(ACCEPTED) >= s.auto_pass_accepted:
                self._skip = "history"
        history = ctx.tls_history  # recorded at MAIL, this session included
        if (
            self._skip is None
            and s.auto_pass_tls_sessions
            and ctx.tls.active
            and history is not None
            and history.without_tls == 0
            and history.with_tls >= s.auto_pass_tls_sessions
        ):
            self._skip = "tls-history"
        self._skip_known = True
        return self._skip, None

    def _trouble(self, error: str) -> GreyOutcome:
        if self.greylister.settings.on_error == "tempfail":
            return GreyOutcome(status="error", reply=STORE_TROUBLE, error=error)
        return GreyOutcome(status="error", error=error)
