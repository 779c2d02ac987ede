"""Checks report, policy decides: the HELO check, the pipeline's failure handling, the policy."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from spamkiller.checks.base import CheckContext, Finding, Stage
from spamkiller.checks.helo import HeloCheck
from spamkiller.checks.pipeline import NOTHING, CheckSettings, Pipeline
from spamkiller.checks.policy import Action, Thresholds, clean_verdict, decide
from spamkiller.checks.symbols import SYMBOLS
from spamkiller.tls.facts import TlsFacts

DOCS = Path(__file__).resolve().parents[2] / "docs" / "symbols.md"


def ctx(helo: str, ip: str = "203.0.113.7") -> CheckContext:
    return CheckContext(
        client_ip=ip,
        listener="mx",
        our_hostname="mx.example.com",
        our_domains=frozenset({"example.com"}),
        tls=TlsFacts.plaintext(starttls_offered=True),
        helo=helo,
    )


@pytest.mark.parametrize(
    ("helo", "ip", "symbols"),
    [
        ("mail.sender.example", "203.0.113.7", []),
        ("[203.0.113.7]", "203.0.113.7", []),
        ("[IPv6:2001:db8::7]", "2001:db8::7", []),
        ("[203.0.113.8]", "203.0.113.7", ["HELO_LITERAL_MISMATCH"]),
        ("[999.1.1.1]", "203.0.113.7", ["HELO_BAD_SYNTAX"]),
        ("203.0.113.7", "203.0.113.7", ["HELO_BARE_IP"]),
        ("localhost", "203.0.113.7", ["HELO_NOT_FQDN"]),
        ("mx.example.com", "203.0.113.7", ["HELO_IS_OURS"]),
        ("EXAMPLE.COM.", "203.0.113.7", ["HELO_IS_OURS"]),
        ("under_score.example", "203.0.113.7", ["HELO_BAD_SYNTAX"]),
        ("dsl-203-0-113-7.isp.example", "203.0.113.7", ["HELO_DYNAMIC"]),
        ("203.0.113.7.dyn.isp.example", "203.0.113.7", ["HELO_DYNAMIC"]),
    ],
)
def test_helo_check(helo: str, ip: str, symbols: list[str]) -> None:
    found = asyncio.run(HeloCheck().run(ctx(helo, ip)))
    assert [f.symbol for f in found] == symbols


class _Slow:
    name = "slow"
    stage = Stage.HELO
    cost = 5
    local = False

    async def run(self, ctx: CheckContext) -> Sequence[Finding]:
        await asyncio.sleep(10)
        return []


class _Broken:
    name = "broken"
    stage = Stage.HELO
    cost = 2
    local = False

    async def run(self, ctx: CheckContext) -> Sequence[Finding]:
        raise RuntimeError("resolver exploded")


def test_pipeline_turns_timeouts_and_errors_into_findings() -> None:
    pipeline = Pipeline(
        [
            (_Slow(), CheckSettings(timeout=0.05, on_error="accept")),
            (_Broken(), CheckSettings(timeout=1, on_error="accept")),
            (HeloCheck(), CheckSettings()),
        ]
    )
    result = asyncio.run(pipeline.run(Stage.HELO, ctx("localhost")))
    symbols = {f.symbol: f.detail for f in result.findings}
    assert symbols["CHECK_TIMEOUT"] == "slow"
    assert symbols["CHECK_ERROR"].startswith("broken: RuntimeError('resolver exploded')")
    assert "HELO_NOT_FQDN" in symbols
    assert result.tempfail is None
    assert not pipeline.has(Stage.DATA)
    assert asyncio.run(pipeline.run(Stage.DATA, ctx("x"))).findings == ()


class _BrokenLocal(_Broken):
    name = "broken-local"
    local = True


def test_a_local_check_that_raises_is_a_finding_too() -> None:
    # Local checks run without a timer; their errors still become findings and tempfails.
    pipeline = Pipeline([(_BrokenLocal(), CheckSettings(on_error="tempfail"))])
    result = asyncio.run(pipeline.run(Stage.HELO, ctx("mail.sender.example")))
    assert [f.symbol for f in result.findings] == ["CHECK_ERROR"]
    assert result.findings[0].detail.startswith("broken-local: RuntimeError(")
    assert result.tempfail == "broken-local: error"


def test_on_error_tempfail_makes_the_verdict_a_tempfail() -> None:
    pipeline = Pipeline([(_Broken(), CheckSettings(on_error="tempfail"))])
    result = asyncio.run(pipeline.run(Stage.HELO, ctx("mail.sender.example")))
    assert result.tempfail == "broken: error"
    verdict = decide(result.findings, weights={}, thresholds=Thresholds(), tempfail=result.tempfail)
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and verdict.reply.code == 451


def test_policy_scores_with_overrides_and_thresholds() -> None:
    findings = [Finding(symbol="HELO_IS_OURS"), Finding(symbol="HELO_NOT_FQDN", factor=2.0)]
    assert decide(findings, weights={}, thresholds=Thresholds()).action is Action.TAG  # 5+2
    verdict = decide(findings, weights={"HELO_IS_OURS": 13.0}, thresholds=Thresholds())
    assert verdict.action is Action.REJECT and verdict.score == 15.0  # inclusive threshold
    assert verdict.rules == "HELO_IS_OURS(13),HELO_NOT_FQDN(2)"
    assert verdict.reply is not None and verdict.reply.code == 550
    assert decide([], weights={}, thresholds=Thresholds()).action is Action.ACCEPT


def test_docs_list_every_symbol_with_its_weight() -> None:
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| (-?[0-9.]+) \|", DOCS.read_text(), re.MULTILINE))
    assert rows == {name: f"{s.weight:.1f}" for name, s in SYMBOLS.items()}


def test_a_clean_stage_is_the_shared_nothing_result() -> None:
    """The driver recognises a stage with nothing to say by identity and skips the scoring."""
    pipeline = Pipeline([(HeloCheck(), CheckSettings())])
    assert asyncio.run(pipeline.run(Stage.HELO, ctx("mail.sender.example"))) is NOTHING
    found = asyncio.run(pipeline.run(Stage.HELO, ctx("localhost")))
    assert found is not NOTHING and [f.symbol for f in found.findings] == ["HELO_NOT_FQDN"]


@pytest.mark.parametrize(
    ("thresholds", "action"),
    [
        (Thresholds(), Action.ACCEPT),
        (Thresholds(tag=0.0, reject=15.0), Action.TAG),  # inclusive: a score of 0 is tagged
        (Thresholds(tag=-1.0, reject=0.0), Action.REJECT),
    ],
)
def test_the_verdict_on_no_findings_follows_the_thresholds(
    thresholds: Thresholds, action: Action
) -> None:
    verdict = clean_verdict(thresholds)
    assert verdict == decide((), weights={}, thresholds=thresholds)
    assert verdict.action is action and verdict.score == 0
