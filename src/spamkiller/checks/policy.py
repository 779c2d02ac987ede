"""Findings, weights and thresholds in; an action and its SMTP reply out. Pure: no I/O, no state.

The score is the sum of weight x factor over the findings. Thresholds are inclusive: a score equal
to `reject` rejects. A check that failed with `on_error: tempfail` makes the verdict a tempfail
whatever the score, so a broken dependency never turns into a silent pass.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from spamkiller.checks.base import Finding
from spamkiller.checks.symbols import weight_of
from spamkiller.smtp.replies import Reply

REJECTED = Reply(550, "5.7.1", "Rejected by policy")
TRY_LATER = Reply(451, "4.7.1", "Temporary policy failure, try again later")


class Action(StrEnum):
    ACCEPT = "accept"
    TAG = "tag"
    TEMPFAIL = "tempfail"
    REJECT = "reject"


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    tag: float = 5.0
    reject: float = 15.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    action: Action
    score: float
    rules: str  # "HELO_IS_OURS(5.0),HELO_NOT_FQDN(1.0)" for logs and headers
    reply: Reply | None  # None: go on (accept or tag)


@functools.lru_cache(maxsize=16)
def clean_verdict(thresholds: Thresholds) -> Verdict:
    """The verdict on no findings at all (score 0), made once per set of thresholds."""
    return decide((), weights={}, thresholds=thresholds)


def decide(
    findings: Iterable[Finding],
    *,
    weights: Mapping[str, float],
    thresholds: Thresholds,
    tempfail: str | None = None,
) -> Verdict:
    score = 0.0
    parts: list[str] = []
    for finding in findings:
        points = weight_of(finding.symbol, weights) * finding.factor
        score += points
        parts.append(f"{finding.symbol}({points:g})")
    score = round(score, 3)
    rules = ",".join(parts)
    if tempfail is not None:
        return Verdict(action=Action.TEMPFAIL, score=score, rules=rules, reply=TRY_LATER)
    if score >= thresholds.reject:
        return Verdict(action=Action.REJECT, score=score, rules=rules, reply=REJECTED)
    if score >= thresholds.tag:
        return Verdict(action=Action.TAG, score=score, rules=rules, reply=None)
    return Verdict(action=Action.ACCEPT, score=score, rules=rules, reply=None)
