"""Running the checks of one stage: concurrently, cheapest first, each under its own timeout.

A check that raises or overruns its timeout is a finding (CHECK_ERROR / CHECK_TIMEOUT, naming the
check) and, with `on_error: tempfail`, makes the stage's verdict a tempfail. Never a silent 0,
never an exception out of here. A stage without checks costs one dict lookup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from spamkiller.checks.base import Check, CheckContext, Finding, Stage


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckSettings:
    timeout: float = 5.0
    on_error: str = "accept"  # accept | tempfail


@dataclass(frozen=True, slots=True, kw_only=True)
class StageResult:
    findings: tuple[Finding, ...] = ()
    tempfail: str | None = None  # why, when a failing check's on_error is tempfail


NOTHING = StageResult()


class Pipeline:
    def __init__(self, checks: Sequence[tuple[Check, CheckSettings]] = ()) -> None:
        self._by_stage: dict[Stage, list[tuple[Check, CheckSettings]]] = {}
        for check, settings in sorted(checks, key=lambda item: item[0].cost):
            self._by_stage.setdefault(check.stage, []).append((check, settings))

    def has(self, stage: Stage) -> bool:
        return stage in self._by_stage

    async def run(self, stage: Stage, ctx: CheckContext) -> StageResult:
        entries = self._by_stage.get(stage)
        if not entries:
            return NOTHING
        if len(entries) == 1:
            outcomes = [await _one(*entries[0], ctx)]
        else:
            outcomes = await asyncio.gather(*(_one(c, s, ctx) for c, s in entries))
        findings: list[Finding] = []
        tempfail: str | None = None
        for (check, settings), (found, failure) in zip(entries, outcomes, strict=True):
            findings.extend(found)
            if failure is not None and settings.on_error == "tempfail" and tempfail is None:
                tempfail = f"{check.name}: {failure}"
        if not findings and tempfail is None:
            return NOTHING  # one shared clean result, which callers can recognise by identity
        return StageResult(findings=tuple(findings), tempfail=tempfail)


async def _one(
    check: Check, settings: CheckSettings, ctx: CheckContext
) -> tuple[Sequence[Finding], str | None]:
    try:
        if check.local:  # a timer would cost more than the check, which cannot overrun
            return await check.run(ctx), None
        async with asyncio.timeout(settings.timeout):
            return await check.run(ctx), None
    except TimeoutError:
        return [Finding(symbol="CHECK_TIMEOUT", detail=check.name)], "timeout"
    except Exception as exc:  # a broken check is a finding, not a crashed session
        return [Finding(symbol="CHECK_ERROR", detail=f"{check.name}: {exc!r}"[:200])], "error"
