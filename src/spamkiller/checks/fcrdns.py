"""Forward-confirmed reverse DNS: the client's PTR names, each looked up forward again.

Rules kept here:
- A name counts only if one of its A/AAAA records is the client's address (RFC 8601's
  `iprev`); the first such name becomes `ctx.client_name`, which the Received header then shows.
- No PTR at all (NXDOMAIN or NODATA) and PTRs that do not resolve back are different findings.
- At most `MAX_NAMES` PTR names are tried (a hostile zone can return hundreds), all at once.
- A temporary DNS failure is the check's error: its `on_error` applies; never a silent pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from spamkiller.checks.base import CheckContext, Finding, Stage, parse_ip, worth_looking_up
from spamkiller.dns.resolver import DnsPermError, Resolver

MAX_NAMES = 10


class FcrdnsCheck:
    name = "fcrdns"
    stage = Stage.CONNECT
    local = False
    cost = 10

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def run(self, ctx: CheckContext) -> Sequence[Finding]:
        if not worth_looking_up(ctx.client_ip):
            return []
        try:
            names = await self.resolver.ptr(ctx.client_ip)
        except DnsPermError:
            return [Finding(symbol="RDNS_NONE", detail=ctx.client_ip)]
        names = names[:MAX_NAMES]
        confirmed = await asyncio.gather(*(self._points_back(n, ctx.client_ip) for n in names))
        for name, ok in zip(names, confirmed, strict=True):
            if ok:
                ctx.client_name = name
                return []
        return [Finding(symbol="FCRDNS_MISMATCH", detail=",".join(names)[:200])]

    async def _points_back(self, name: str, ip: str) -> bool:
        address = parse_ip(ip)
        lookup = self.resolver.a if address.version == 4 else self.resolver.aaaa
        try:
            values = await lookup(name)
        except DnsPermError:
            return False
        return any(parse_ip(v) == address for v in values)
