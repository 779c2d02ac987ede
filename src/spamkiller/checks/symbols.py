"""Every symbol a check may report, with its default weight and meaning: the one public table.

docs/symbols.md lists the same table; `tests/unit/test_checks_symbols.py` keeps them equal.
Positive weights push towards rejection, negative ones towards acceptance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Symbol:
    name: str
    weight: float
    meaning: str


SYMBOLS: dict[str, Symbol] = {
    s.name: s
    for s in (
        Symbol(
            name="HELO_BAD_SYNTAX",
            weight=3.0,
            meaning="HELO name is neither a hostname nor an address literal",
        ),
        Symbol(
            name="HELO_BARE_IP", weight=2.0, meaning="HELO name is an IP address without brackets"
        ),
        Symbol(name="HELO_NOT_FQDN", weight=1.0, meaning="HELO name has no dot"),
        Symbol(
            name="HELO_LITERAL_MISMATCH",
            weight=3.0,
            meaning="HELO address literal is not the client's address",
        ),
        Symbol(
            name="HELO_IS_OURS",
            weight=5.0,
            meaning="HELO claims our hostname or one of our domains",
        ),
        Symbol(
            name="HELO_DYNAMIC",
            weight=1.5,
            meaning="HELO name looks like a dynamic or residential address",
        ),
        Symbol(
            name="PREGREET",
            weight=5.0,
            meaning="the client talked before our banner (during the listener's greet_delay)",
        ),
        Symbol(
            name="RDNS_NONE",
            weight=2.0,
            meaning="the client's address has no reverse DNS name",
        ),
        Symbol(
            name="FCRDNS_MISMATCH",
            weight=1.5,
            meaning="no reverse name of the client resolves back to its address",
        ),
        Symbol(
            name="DNSBL_LISTED",
            weight=1.0,
            meaning="client address on a DNS block list (x the zone's weight)",
        ),
        Symbol(
            name="DNSWL_LISTED",
            weight=-1.0,
            meaning="client address on a DNS allow list (x the zone's weight)",
        ),
        Symbol(
            name="CHECK_TIMEOUT",
            weight=0.0,
            meaning="a check did not answer in time; its on_error applies",
        ),
        Symbol(name="CHECK_ERROR", weight=0.0, meaning="a check failed; its on_error applies"),
    )
}


def weight_of(symbol: str, overrides: Mapping[str, float]) -> float:
    if symbol in overrides:
        return overrides[symbol]
    known = SYMBOLS.get(symbol)
    return known.weight if known is not None else 0.0
