"""HELO/EHLO name checks: syntax, bare IPs, address literals, our own names, dynamic-looking names.

Cheap and local (no DNS): they run at the HELO stage and their findings count at RCPT time, when
the envelope is known and the rejection can be logged with it (Postfix's smtpd_delay_reject).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from spamkiller.checks.base import CheckContext, Finding, Stage, parse_ip
from spamkiller.smtp.address import is_address_literal, is_domain

# Labels that residential and dynamic pools put in their reverse names and their users' HELO.
_DYNAMIC = re.compile(
    r"(?:^|[.-])(?:dyn(?:amic)?|dhcp|pool|dsl|adsl|cable|ppp|dialup|dial-up)(?:[.-]|\d|$)"
    r"|(?:\d{1,3}[.-]){3}\d{1,3}",
    re.IGNORECASE,
)


class HeloCheck:
    name = "helo"
    stage = Stage.HELO
    cost = 1
    local = True

    async def run(self, ctx: CheckContext) -> Sequence[Finding]:
        helo = ctx.helo or ""
        if helo.startswith("["):
            if not is_address_literal(helo):
                return [Finding(symbol="HELO_BAD_SYNTAX", detail=helo[:80])]
            literal = helo[1:-1]
            literal = literal[5:] if literal[:5].lower() == "ipv6:" else literal
            if ipaddress.ip_address(literal) != parse_ip(ctx.client_ip):
                return [Finding(symbol="HELO_LITERAL_MISMATCH", detail=helo[:80])]
            return []
        if helo[:1].isdigit() or ":" in helo:  # a name cannot be an address: skip the raise
            try:
                ipaddress.ip_address(helo)
            except ValueError:
                pass
            else:
                return [Finding(symbol="HELO_BARE_IP", detail=helo)]
        name = helo.rstrip(".").lower()
        if not is_domain(name):
            return [Finding(symbol="HELO_BAD_SYNTAX", detail=helo[:80])]
        found: list[Finding] = []
        if name == ctx.our_hostname or name in ctx.our_domains:
            found.append(Finding(symbol="HELO_IS_OURS", detail=name))
        if "." not in name:
            found.append(Finding(symbol="HELO_NOT_FQDN", detail=name))
        elif _DYNAMIC.search(name):
            found.append(Finding(symbol="HELO_DYNAMIC", detail=name))
        return found
