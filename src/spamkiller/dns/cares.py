"""``CaresResolver``: the default ``Resolver``, on c-ares (through pycares' cffi binding).

The only module of the project that imports pycares. Why c-ares: an uncached lookup costs
about a fifth of dnspython's CPU (bench/resolve.py, docs/dns.md "Figures"), and a new client's
connection checks are several lookups. Cache, single flight and settings are
``cache.CachingResolver``'s, the same code as ``DnspythonResolver``'s. What differs:

- **The binding.** pycares' ``Channel`` cannot turn off c-ares' own query cache (which would
  outlive ``max_negative_ttl`` and ``clear_cache()``) and drops the reply of a negative answer
  (so no SOA, so no RFC 2308 negative TTL). So this module drives c-ares through pycares' cffi
  module (``pycares._cares``: ``ares_init_options``, ``ares_query_dnsrec``, the record
  getters) with its own answer callback. pycares is pinned ``<6`` for that reason; the
  integration tests cover every call made here.
- **On the event loop, no thread.** c-ares runs in socket-state-callback mode: it tells us
  which sockets to watch (``loop.add_reader``/``add_writer``), we call ``ares_process_fd``
  when they are ready and when ``ares_timeout`` says a retry is due. Every call is
  non-blocking; only construction reads ``/etc/resolv.conf`` (when no nameservers are given).
- **Timeouts.** ``timeout`` bounds each lookup (``asyncio.timeout``). c-ares adapts its
  per-try timeout to the server's latency (5x the average, at least 250 ms) and then resends,
  so it is given enough tries to keep asking until our deadline; a single try would give up
  on a slow recursion after 250 ms where dnspython waits the whole ``timeout``.
- **Sockets.** c-ares keeps a connected UDP socket per server for up to ``UDP_MAX_QUERIES``
  queries (dnspython opens one per query). Connected, it sees ICMP "port unreachable": a
  stopped nameserver is an immediate ``DnsTempError``, not a timeout.
- **TLSA** needs the AD bit, which c-ares does not report: ``tlsa`` is delegated to a
  ``DnspythonResolver`` with the same settings, created on first use.
- **Queries**: RD, EDNS0 with a 1232-byte payload, TCP retry on truncation (c-ares'), no
  search list, no default server when ``/etc/resolv.conf`` names none.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import socket
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from spamkiller.dns.cache import CachingResolver, Entry
from spamkiller.dns.resolver import (
    DnsError,
    DnsInvalidName,
    DnsNoData,
    DnsNxDomain,
    DnsTempError,
    Tlsa,
    reverse_name,
)
from spamkiller.errors import ConfigError

if TYPE_CHECKING:
    from spamkiller.dns.dnspython import DnspythonResolver

__all__ = ["CaresResolver"]

# pycares' cffi module (importing it runs ares_library_init). Untyped: this module is the
# narrow typed wrapper around it.
_cares: Any = importlib.import_module("pycares._cares")
_ffi: Any = _cares.ffi
_lib: Any = _cares.lib

EDNS_PAYLOAD = 1232  # DNS flag day 2020, as for dnspython
MAX_ATTEMPT = 2.0  # per-server attempt timeout when several servers share the budget
UDP_MAX_QUERIES = 100  # then a new source port: not one port for the life of the process
MIN_TRY = 0.25  # c-ares' floor for its adaptive per-try timeout (ares_metrics.c)
TRY_MARGIN_MS = 100
# ares.h option bits that pycares' cdef does not name (stable ABI since c-ares 1.22/1.23).
_OPT_UDP_MAX_QUERIES = 1 << 19
_OPT_MAXTIMEOUTMS = 1 << 20
_OPT_QUERY_CACHE = 1 << 21

_A, _AAAA, _MX, _TXT, _PTR, _SOA = (
    _lib.ARES_REC_TYPE_A,
    _lib.ARES_REC_TYPE_AAAA,
    _lib.ARES_REC_TYPE_MX,
    _lib.ARES_REC_TYPE_TXT,
    _lib.ARES_REC_TYPE_PTR,
    _lib.ARES_REC_TYPE_SOA,
)
_BAD_SOCKET = _lib.ARES_SOCKET_BAD

# c-ares status -> (error class, reason). NXDOMAIN and NODATA are handled with their reply.
_FAILURES: dict[int, tuple[type[DnsError], str]] = {
    _lib.ARES_ESERVFAIL: (DnsTempError, "SERVFAIL"),
    _lib.ARES_EREFUSED: (DnsTempError, "REFUSED"),
    _lib.ARES_EFORMERR: (DnsTempError, "FORMERR"),
    _lib.ARES_ENOTIMP: (DnsTempError, "NOTIMP"),
    _lib.ARES_ECONNREFUSED: (DnsTempError, "connection refused"),
    _lib.ARES_EBADRESP: (DnsTempError, "malformed reply"),
    _lib.ARES_EBADNAME: (DnsInvalidName, "name refused by c-ares"),
    _lib.ARES_EDESTRUCTION: (DnsTempError, "resolver closed"),
    _lib.ARES_ECANCELLED: (DnsTempError, "resolver closed"),
}

# Queries in flight: key (c-ares passes it back as the callback's void *) -> (resolver,
# future, type asked). An integer, not a cffi handle: nothing to keep alive for C.
_WAITERS: dict[int, tuple[CaresResolver, asyncio.Future[tuple[Entry, float]], int]] = {}
_KEYS = itertools.count(1)


def _on_reply(arg: Any, status: int, _timeouts: int, reply: Any) -> None:
    """c-ares' answer callback, on the loop's thread (inside ``ares_process_fd`` or
    ``ares_query_dnsrec``). ``reply`` is only valid now, so it is converted here. An exception
    must not escape into C, so everything is caught."""
    waiter = _WAITERS.pop(int(_ffi.cast("uintptr_t", arg)), None)
    if waiter is None:
        return
    resolver, future, rdtype = waiter
    if future.done():  # our deadline passed first; nobody waits
        return
    try:
        result = resolver._convert(status, reply, rdtype)
    except Exception as exc:  # a reply c-ares parsed but we cannot use
        result = Entry(error=DnsTempError, reason=f"unusable answer: {exc!r}"[:200]), 0.0
    with contextlib.suppress(RuntimeError):  # its loop is closed (a test's asyncio.run ended)
        future.set_result(result)


# One C function pointer for every query (a cffi callback per query would cost a closure).
_ON_REPLY = _ffi.callback(
    "void(void *, ares_status_t, size_t, struct ares_dns_record *)", _on_reply
)


class CaresResolver(CachingResolver):
    """The ``Resolver`` protocol over c-ares, with the shared bounded TTL cache.

    Arguments as ``CachingResolver``'s; without ``nameservers`` c-ares reads
    ``/etc/resolv.conf``. ``close()`` releases the channel (also done when collected).
    """

    def _start(self) -> None:
        self._dnssec: DnspythonResolver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: set[int] = set()
        self._writers: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tv = _ffi.new("struct timeval *")
        self._channel: Any = None

        # The socket-state callback reaches us through a weak reference: no cycle, so a
        # dropped resolver is collected (and its channel destroyed) at once.
        ref = weakref.ref(self)

        def sock_state(fd: int, readable: bool, writable: bool) -> None:
            resolver = ref()
            if resolver is not None:
                resolver._sock_state(fd, readable, writable)

        self._sock_state_handle = _ffi.new_handle(sock_state)
        self._open(len(self._servers))
        self.nameservers: list[str] = self._server_list()
        if not self.nameservers:
            self.close()
            raise ConfigError("dns.nameservers: not given, and /etc/resolv.conf names none")

    def _open(self, count: int) -> None:
        # One server may use the whole budget per try; several share it (as dnspython does).
        # TRY_MARGIN: a try never ends exactly at our deadline, which must fire first.
        attempt = self.timeout if count <= 1 else min(MAX_ATTEMPT, self.timeout / count)
        per_try_ms = int(attempt * 1000) + TRY_MARGIN_MS
        # Enough tries to outlast the budget at c-ares' shortest: it adapts a try down to
        # MIN_TRY, and a resend waits at least as long, then 2x, 4x... (with jitter). It
        # resends to the same server meanwhile; see the module docstring.
        tries, total, step = 1, MIN_TRY, MIN_TRY
        while total <= self.timeout and tries < 16:
            total += min(step, attempt)
            step *= 2
            tries += 1
        self._tries = tries
        opts = _ffi.new("struct ares_options *")
        # NOCHECKRESP: SERVFAIL, REFUSED and NOTIMP are final, as with dnspython's
        # retry_servfail=False; otherwise c-ares resends them for every try.
        opts.flags = (
            _lib.ARES_FLAG_EDNS
            | _lib.ARES_FLAG_NOSEARCH
            | _lib.ARES_FLAG_NO_DFLT_SVR
            | _lib.ARES_FLAG_NOCHECKRESP
        )
        opts.timeout = per_try_ms
        opts.maxtimeout = per_try_ms
        opts.tries = tries
        opts.ednspsz = EDNS_PAYLOAD
        opts.qcache_max_ttl = 0  # c-ares' own cache off: ours is in front
        opts.udp_max_queries = UDP_MAX_QUERIES
        opts.sock_state_cb = _lib._sock_state_cb  # pycares' trampoline: calls the handle
        opts.sock_state_cb_data = self._sock_state_handle
        mask = (
            _lib.ARES_OPT_FLAGS
            | _lib.ARES_OPT_TIMEOUTMS
            | _OPT_MAXTIMEOUTMS
            | _lib.ARES_OPT_TRIES
            | _lib.ARES_OPT_EDNSPSZ
            | _OPT_QUERY_CACHE
            | _OPT_UDP_MAX_QUERIES
            | _lib.ARES_OPT_SOCK_STATE_CB
        )
        channel = _ffi.new("ares_channel *")
        status = _lib.ares_init_options(channel, opts, mask)
        if status != _lib.ARES_SUCCESS:
            if status == _lib.ARES_ENOSERVER and not self._servers:
                raise ConfigError("dns.nameservers: not given, and /etc/resolv.conf names none")
            raise ConfigError(f"dns: c-ares could not start: {_strerror(status)}")
        self._channel = channel
        if self._servers:
            csv = ",".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in self._servers)
            status = _lib.ares_set_servers_csv(channel[0], csv.encode("ascii"))
            if status != _lib.ARES_SUCCESS:
                self.close()
                raise ConfigError(f"dns.nameservers: c-ares refused them: {_strerror(status)}")

    def _server_list(self) -> list[str]:
        text = _lib.ares_get_servers_csv(self._channel[0])
        if text == _ffi.NULL:
            return []
        try:
            return [s for s in _ffi.string(text).decode("ascii").split(",") if s]
        finally:
            _lib.ares_free_string(text)

    def close(self) -> None:
        """Destroy the channel: queries in flight end as DnsTempError, sockets close."""
        channel, self._channel = self._channel, None
        if channel is not None:
            _lib.ares_destroy(channel[0])
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the library may be gone
            self.close()

    # --- the protocol ------------------------------------------------------------------------

    async def txt(self, name: str) -> list[str]:
        return cast(list[str], list(await self._lookup(name, _TXT, "TXT")))

    async def a(self, name: str) -> list[str]:
        return cast(list[str], list(await self._lookup(name, _A, "A")))

    async def aaaa(self, name: str) -> list[str]:
        return cast(list[str], list(await self._lookup(name, _AAAA, "AAAA")))

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return cast(list[tuple[int, str]], list(await self._lookup(name, _MX, "MX")))

    async def ptr(self, ip: str) -> list[str]:
        return cast(list[str], list(await self._lookup(reverse_name(ip), _PTR, "PTR")))

    async def tlsa(self, name: str) -> list[Tlsa]:
        """Delegated to dnspython: DANE needs the AD bit, which c-ares does not report."""
        return await self._dnspython().tlsa(name)

    # --- beyond the protocol -----------------------------------------------------------------

    def clear_cache(self) -> None:
        super().clear_cache()
        if self._dnssec is not None:
            self._dnssec.clear_cache()

    # --- the work ----------------------------------------------------------------------------

    def _dnspython(self) -> DnspythonResolver:
        """The dnspython resolver for what c-ares cannot do, built on first use."""
        if self._dnssec is None:
            from spamkiller.dns.dnspython import DnspythonResolver

            self._dnssec = DnspythonResolver(**self._arguments)
        return self._dnssec

    async def _query(self, qname: str, rdtype: int) -> tuple[Entry, float]:
        """One lookup, as (entry, seconds to cache it). Never raises a DNS failure."""
        if self._channel is None:
            return Entry(error=DnsTempError, reason="resolver closed"), 0.0
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._attach(loop)
        future: asyncio.Future[tuple[Entry, float]] = loop.create_future()
        key = next(_KEYS)
        _WAITERS[key] = (self, future, rdtype)
        # Names are absolute A-label text; c-ares reads backslash escapes, we never write them.
        wire_name = qname.replace("\\", "\\\\").encode("ascii")
        status = _lib.ares_query_dnsrec(
            self._channel[0],
            wire_name,
            _lib.ARES_CLASS_IN,
            rdtype,
            _ON_REPLY,
            _ffi.cast("void *", key),
            _ffi.NULL,
        )
        if status != _lib.ARES_SUCCESS:  # refused before sending; the callback may have run
            _WAITERS.pop(key, None)
            if status == _lib.ARES_EBADNAME:
                # c-ares refuses names that are not host names (``+``, ``@``, ``(``... in a
                # label: SPF macros can expand to them); normalise_name accepted it, so ask
                # as dnspython does, to keep one answer for one name.
                return await self._dnspython()._query(qname, rdtype)
            if not future.done():
                future.set_result(self._convert(status, _ffi.NULL, rdtype))
        self._schedule()
        try:
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            # c-ares may keep resending until its tries end; its reply then finds no waiter.
            return Entry(error=DnsTempError, reason=f"timed out after {self.timeout:g}s"), 0.0

    def _convert(self, status: int, reply: Any, rdtype: int) -> tuple[Entry, float]:
        if status == _lib.ARES_SUCCESS:
            values: list[object] = []
            ttl: float | None = None
            convert = _CONVERT[rdtype]
            for rr in _records(reply, _lib.ARES_SECTION_ANSWER):
                # The smallest TTL of the answer: the RRset and any CNAMEs on the way.
                rr_ttl = _lib.ares_dns_rr_get_ttl(rr)
                ttl = rr_ttl if ttl is None else min(ttl, rr_ttl)
                if _lib.ares_dns_rr_get_type(rr) == rdtype:
                    values.append(convert(rr))
            if values:
                if rdtype == _MX:
                    values.sort()
                return Entry(values=tuple(values)), self._positive(ttl or 0.0)
            status = _lib.ARES_ENODATA  # only CNAMEs (or other types): NODATA at the end
        if status == _lib.ARES_ENOTFOUND:
            return Entry(error=DnsNxDomain, reason="NXDOMAIN"), self._negative(_soa_ttl(reply))
        if status == _lib.ARES_ENODATA:
            reason = "no records of this type (NODATA)"
            return Entry(error=DnsNoData, reason=reason), self._negative(_soa_ttl(reply))
        if status == _lib.ARES_ETIMEOUT:
            reason = f"timed out ({self._tries} tries)"
            return Entry(error=DnsTempError, reason=f"{reason} from {self._where()}"), 0.0
        error, what = _FAILURES.get(status, (DnsTempError, _strerror(status)))
        if error is DnsTempError and status not in (_lib.ARES_EDESTRUCTION, _lib.ARES_ECANCELLED):
            what = f"{what} from {self._where()}"
        return Entry(error=error, reason=what), 0.0

    def _where(self) -> str:
        return ", ".join(self.nameservers) or "no nameserver"

    # --- c-ares on the event loop --------------------------------------------------------------

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Move the socket watches and the retry timer to ``loop`` (normally once: one loop
        per worker; tests run a loop per lookup)."""
        old, self._loop = self._loop, loop
        if old is not None and not old.is_closed():
            for fd in self._readers:
                old.remove_reader(fd)
            for fd in self._writers:
                old.remove_writer(fd)
        for fd in self._readers:
            loop.add_reader(fd, self._readable, fd)
        for fd in self._writers:
            loop.add_writer(fd, self._writable, fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._schedule()

    def _sock_state(self, fd: int, readable: bool, writable: bool) -> None:
        loop = self._loop
        live = loop is not None and not loop.is_closed()
        if readable and fd not in self._readers:
            self._readers.add(fd)
            if live:
                assert loop is not None
                loop.add_reader(fd, self._readable, fd)
        elif not readable and fd in self._readers:
            self._readers.discard(fd)
            if live:
                assert loop is not None
                loop.remove_reader(fd)
        if writable and fd not in self._writers:
            self._writers.add(fd)
            if live:
                assert loop is not None
                loop.add_writer(fd, self._writable, fd)
        elif not writable and fd in self._writers:
            self._writers.discard(fd)
            if live:
                assert loop is not None
                loop.remove_writer(fd)

    def _readable(self, fd: int) -> None:
        if self._channel is not None:
            _lib.ares_process_fd(self._channel[0], fd, _BAD_SOCKET)
            self._schedule()

    def _writable(self, fd: int) -> None:
        if self._channel is not None:
            _lib.ares_process_fd(self._channel[0], _BAD_SOCKET, fd)
            self._schedule()

    def _on_timer(self) -> None:
        self._timer = None
        if self._channel is not None:
            _lib.ares_process_fd(self._channel[0], _BAD_SOCKET, _BAD_SOCKET)  # due retries
            self._schedule()

    def _schedule(self) -> None:
        """Arm the timer for c-ares' next retry or timeout, unless an earlier one is armed."""
        loop = self._loop
        if self._channel is None or loop is None or loop.is_closed():
            return
        tv = _lib.ares_timeout(self._channel[0], _ffi.NULL, self._tv)
        if tv == _ffi.NULL:  # nothing in flight
            return
        when = loop.time() + tv.tv_sec + tv.tv_usec / 1e6
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)


# --------------------------------------------------------------------------------------------
# Reading c-ares records
# --------------------------------------------------------------------------------------------


def _records(reply: Any, section: int) -> list[Any]:
    if reply == _ffi.NULL:
        return []
    count = _lib.ares_dns_record_rr_cnt(reply, section)
    return [_lib.ares_dns_record_rr_get_const(reply, section, i) for i in range(count)]


def _soa_ttl(reply: Any) -> float:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section; 0 without a SOA."""
    for rr in _records(reply, _lib.ARES_SECTION_AUTHORITY):
        if _lib.ares_dns_rr_get_type(rr) == _SOA:
            minimum = _lib.ares_dns_rr_get_u32(rr, _lib.ARES_RR_SOA_MINIMUM)
            return float(min(_lib.ares_dns_rr_get_ttl(rr), minimum))
    return 0.0


def _name(rr: Any, key: int) -> str:
    """A name from a record: lowercase, no final dot, the root as ``"."``. c-ares escapes
    as dnspython does (``\\DDD`` for control and 8-bit bytes, ``\\.``, ``\\;``...) except the
    space, which it leaves bare: escaped here, so a name stays one token in a log line."""
    text = _ffi.string(_lib.ares_dns_rr_get_str(rr, key)).decode("ascii", "backslashreplace")
    return text.lower().replace(" ", "\\032") or "."  # c-ares: no final dot, root ""


def _a(rr: Any) -> str:
    return socket.inet_ntop(socket.AF_INET, _ffi.buffer(_lib.ares_dns_rr_get_addr(rr, _A_ADDR)))


def _aaaa(rr: Any) -> str:
    addr = _lib.ares_dns_rr_get_addr6(rr, _AAAA_ADDR)
    return socket.inet_ntop(socket.AF_INET6, _ffi.buffer(addr))


def _txt(rr: Any) -> str:
    length = _ffi.new("size_t *")
    parts: list[bytes] = []
    for i in range(_lib.ares_dns_rr_get_abin_cnt(rr, _TXT_DATA)):
        data = _lib.ares_dns_rr_get_abin(rr, _TXT_DATA, i, length)
        if data != _ffi.NULL:
            parts.append(_ffi.buffer(data, length[0])[:])
    return b"".join(parts).decode("utf-8", "replace")


def _mx(rr: Any) -> tuple[int, str]:
    return int(_lib.ares_dns_rr_get_u16(rr, _MX_PREF)), _name(rr, _MX_EXCHANGE)


def _ptr(rr: Any) -> str:
    return _name(rr, _PTR_DNAME)


_A_ADDR = _lib.ARES_RR_A_ADDR
_AAAA_ADDR = _lib.ARES_RR_AAAA_ADDR
_TXT_DATA = _lib.ARES_RR_TXT_DATA
_MX_PREF = _lib.ARES_RR_MX_PREFERENCE
_MX_EXCHANGE = _lib.ARES_RR_MX_EXCHANGE
_PTR_DNAME = _lib.ARES_RR_PTR_DNAME
_CONVERT: dict[int, Callable[[Any], object]] = {
    _A: _a,
    _AAAA: _aaaa,
    _TXT: _txt,
    _MX: _mx,
    _PTR: _ptr,
}


def _strerror(status: int) -> str:
    return str(_ffi.string(_lib.ares_strerror(status)).decode("ascii", "replace"))
