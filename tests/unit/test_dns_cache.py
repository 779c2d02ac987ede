"""DnspythonResolver's pieces that need no server: the answer cache (with a fake clock), the
nameserver syntax, and the constructor's ConfigError lines."""

from __future__ import annotations

import pytest

from spamkiller.dns.cache import AnswerCache, Entry, parse_nameserver
from spamkiller.dns.dnspython import DnspythonResolver
from spamkiller.dns.resolver import DnsNxDomain
from spamkiller.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(*values: str) -> Entry:
    return Entry(values=values)


def test_entries_live_for_their_ttl() -> None:
    clock = Clock()
    cache = AnswerCache(10, 1 << 20, clock)
    cache.put(("a.example.", 1), entry("192.0.2.1"), 30)
    clock.now += 29.9
    hit = cache.get(("a.example.", 1))
    assert hit is not None and hit.values == ("192.0.2.1",)
    clock.now += 0.1
    assert cache.get(("a.example.", 1)) is None
    assert len(cache) == 0 and cache.bytes == 0


def test_negative_entries_are_cached_like_positive_ones() -> None:
    clock = Clock()
    cache = AnswerCache(10, 1 << 20, clock)
    cache.put(("nx.example.", 1), Entry(error=DnsNxDomain, reason="NXDOMAIN"), 5)
    hit = cache.get(("nx.example.", 1))
    assert hit is not None and hit.error is DnsNxDomain


def test_a_zero_ttl_is_not_stored() -> None:
    cache = AnswerCache(10, 1 << 20, Clock())
    cache.put(("a.example.", 1), entry("192.0.2.1"), 0)
    assert len(cache) == 0


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = AnswerCache(3, 1 << 20, Clock())
    for name in ("a", "b", "c"):
        cache.put((name, 1), entry(name), 60)
    assert cache.get(("a", 1)) is not None  # a is now the most recent
    cache.put(("d", 1), entry("d"), 60)
    assert cache.get(("b", 1)) is None
    assert all(cache.get((n, 1)) is not None for n in ("a", "c", "d"))
    assert len(cache) == 3 and cache.evictions == 1


def test_the_byte_budget_bounds_large_answers() -> None:
    cache = AnswerCache(1000, 10_000, Clock())
    for i in range(10):
        cache.put((f"k{i}", 16), entry("x" * 3000), 60)
    assert cache.bytes <= 10_000
    assert 1 <= len(cache) <= 3 and cache.get(("k9", 16)) is not None
    cache.put(("huge", 16), entry("x" * 20_000), 60)  # larger than the whole budget
    assert cache.get(("huge", 16)) is None


def test_replacing_an_entry_keeps_the_byte_count_right() -> None:
    cache = AnswerCache(10, 1 << 20, Clock())
    cache.put(("a", 1), entry("x" * 100), 60)
    before = cache.bytes
    cache.put(("a", 1), entry("x" * 100), 60)
    assert cache.bytes == before and len(cache) == 1
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_a_zero_sized_cache_stores_nothing() -> None:
    cache = AnswerCache(0, 1 << 20, Clock())
    cache.put(("a", 1), entry("x"), 60)
    assert len(cache) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 192.0.2.1 ", ("192.0.2.1", 53)),
        ("::1", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:db8::53]", ("2001:db8::53", 53)),
        ("[2001:db8::53]:5353", ("2001:db8::53", 5353)),
    ],
)
def test_nameserver_syntax(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "dns.example",
        "dns.example:53",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:x",
        "[::1",
        "[::1]53",
        "",
    ],
)
def test_bad_nameservers(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_constructor_reports_every_problem_with_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        DnspythonResolver(
            ["127.0.0.1", "resolver.example"],
            timeout=0,
            cache_size=-1,
            min_ttl=10,
            max_ttl=5,
            max_negative_ttl=5,
        )
    assert [p.split(":")[0] for p in info.value.problems] == [
        "dns.nameservers.1",
        "dns.timeout",
        "dns.cache_size",
        "dns.max_ttl",
        "dns.max_negative_ttl",
    ]


def test_an_empty_nameserver_list_is_a_mistake() -> None:
    with pytest.raises(ConfigError, match=r"dns\.nameservers: empty list"):
        DnspythonResolver([])


def test_nameservers_as_given() -> None:
    r = DnspythonResolver(["127.0.0.1:5353", "[::1]:53"])
    assert r.nameservers == ["Do53:127.0.0.1@5353", "Do53:::1@53"]
    assert r.timeout == 5.0


def test_the_system_resolver_is_read_once(tmp_path: object) -> None:
    # /etc/resolv.conf names at least one nameserver on every machine this suite runs on.
    r = DnspythonResolver()
    assert r.nameservers
