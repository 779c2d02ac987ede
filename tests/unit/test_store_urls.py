"""The Sentinel and Cluster `state` URLs: what the store and the config accept, refuse and show.

The store's parser (`parse_ha_url`) and the config's shape check (`_state_url`) are two pieces of
code, since the config may not import the store; every URL here goes through both, so they stay
in step. Building a store connects to nothing, which is what lets these tests run without a
server (tests/integration/test_store_redis_ha.py has the real Sentinel and Cluster).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from spamkiller import config as cfg
from spamkiller.errors import ConfigError
from spamkiller.store import open_store
from spamkiller.store.redis import HaUrl, RedisStore, display_url, parse_ha_url

SECRET = "s3cret-pw"


def config_problems(tmp_path: Path, url: str) -> list[str]:
    """The config's problem lines for `state: <url>` ([] when it loads)."""
    path = tmp_path / "spam-killer.yaml"
    path.write_text(f"state: {json.dumps(url)}\n", encoding="utf-8")  # JSON is YAML
    try:
        cfg.load(path)
    except ConfigError as error:
        return error.problems
    return []


GOOD: list[tuple[str, HaUrl]] = [
    (
        "redis-sentinel://s1.example:26379,s2.example:26380/mymaster",
        HaUrl(
            kind="sentinel",
            tls=False,
            nodes=(("s1.example", 26379), ("s2.example", 26380)),
            service="mymaster",
            db=0,
            username=None,
            password=None,
            sentinel_auth=False,
            tls_options={},
        ),
    ),
    (
        # Default port, a db, user and password (with an encoded "/" and "@" and a raw ":").
        f"redis-sentinel://spam:{SECRET}%2Fx%40y:z@10.0.0.1,[2001:db8::1]:26000/sk-state/3",
        HaUrl(
            kind="sentinel",
            tls=False,
            nodes=(("10.0.0.1", 26379), ("2001:db8::1", 26000)),
            service="sk-state",
            db=3,
            username="spam",
            password=f"{SECRET}/x@y:z",
            sentinel_auth=False,
            tls_options={},
        ),
    ),
    (
        f"rediss-sentinel://:{SECRET}@s1/mymaster/?sentinel_auth=yes"
        "&ssl_ca_certs=/etc/ssl/redis-ca.pem&ssl_check_hostname=no",
        HaUrl(
            kind="sentinel",
            tls=True,
            nodes=(("s1", 26379),),
            service="mymaster",
            db=0,
            username=None,
            password=SECRET,
            sentinel_auth=True,
            tls_options={"ssl_ca_certs": "/etc/ssl/redis-ca.pem", "ssl_check_hostname": False},
        ),
    ),
    (
        "redis-cluster://n1:7000,n2:7001,n3",
        HaUrl(
            kind="cluster",
            tls=False,
            nodes=(("n1", 7000), ("n2", 7001), ("n3", 6379)),
            service="",
            db=0,
            username=None,
            password=None,
            sentinel_auth=False,
            tls_options={},
        ),
    ),
    (
        f"rediss-cluster://app:{SECRET}@n1:6380/0?ssl_cert_reqs=required",
        HaUrl(
            kind="cluster",
            tls=True,
            nodes=(("n1", 6380),),
            service="",
            db=0,
            username="app",
            password=SECRET,
            sentinel_auth=False,
            tls_options={"ssl_cert_reqs": "required"},
        ),
    ),
]


@pytest.mark.parametrize(("url", "expected"), GOOD, ids=[url.split(":")[0] for url, _ in GOOD])
def test_good_urls_parse_and_pass_the_config(tmp_path: Path, url: str, expected: HaUrl) -> None:
    assert parse_ha_url(url) == expected
    assert config_problems(tmp_path, url) == []
    assert cfg.Config(state=url).state_url == url  # passed to open_store unchanged
    assert SECRET not in repr(parse_ha_url(url))  # the password is kept out of repr


# (URL, what the store's message contains, what the config's message contains)
BAD: list[tuple[str, str, str]] = [
    ("redis-sentinel:///mymaster", "needs at least one sentinel", "needs at least one host"),
    (f"redis-sentinel://u:{SECRET}@/mymaster", "needs at least one", "needs at least one host"),
    ("redis-sentinel://s1:26379", "needs the service name", "needs the Sentinel service name"),
    ("redis-sentinel://s1:26379/", "needs the service name", "needs the Sentinel service name"),
    ("redis-sentinel://s1:0/m", "port must be a number from 1 to 65535", "bad port"),
    ("redis-sentinel://s1:65536/m", "port must be a number from 1 to 65535", "bad port"),
    ("redis-sentinel://s1:26379x/m", "port must be a number from 1 to 65535", "bad port"),
    ("redis-sentinel://s1:/m", "port must be a number from 1 to 65535", "bad port"),
    ("redis-sentinel://s1,,s2/m", "empty host name", "bad host ''"),
    ("redis-sentinel://s1,/m", "empty host name", "bad host ''"),
    ("redis-sentinel://2001:db8::1/m", "IPv6 address goes in brackets", "goes in brackets"),
    ("redis-sentinel://[2001:db8::1/m", "not a bracketed IPv6", "not a bracketed IPv6"),
    ("redis-sentinel://[nope]:26379/m", "not a bracketed IPv6", "not a bracketed IPv6"),
    ("redis-sentinel://s 1/m", "not a host name", "bad host"),
    ("redis-sentinel://s1/m/x", "/<service name>/<db number>", "/<service name>[/<db number>]"),
    ("redis-sentinel://s1/m/1/2", "/<service name>/<db number>", "/<service name>[/<db number>]"),
    ("redis-sentinel://s1/m%20x", "printable, without spaces", "printable, without spaces"),
    ("redis-sentinel://s1/m#frag", "no #fragment", "no #fragment"),
    ("redis-sentinel://s1/m?sentinel_password=x", "unknown option", "unknown option"),
    ("redis-sentinel://s1/m?ssl_ca_certs=/ca.pem", "needs TLS", "needs TLS"),
    ("redis-cluster://n1?sentinel_auth=yes", "unknown option", "unknown option"),
    ("redis-cluster://", "needs at least one cluster node", "needs at least one host"),
    ("redis-cluster://n1:6379,n2:6379/1", "Redis Cluster has no databases", "no databases"),
    ("redis-cluster://n1:6379/0/1", "Redis Cluster has no databases", "no databases"),
    ("rediss-cluster://n1:99999", "port must be a number from 1 to 65535", "bad port"),
    # Raw reserved characters in a password: the server's log line would split there.
    (f"redis-sentinel://u:{SECRET}/x@s1/m", "percent-encode", "percent-encode"),
    (f"redis-cluster://u:{SECRET}@x@n1", "percent-encode", "percent-encode"),
    (f"rediss-cluster://:{SECRET}#x@n1", "percent-encode", "percent-encode"),
]


@pytest.mark.parametrize(("url", "store_says", "config_says"), BAD, ids=[u for u, _, _ in BAD])
def test_malformed_urls_are_refused_by_store_and_config(
    tmp_path: Path, url: str, store_says: str, config_says: str
) -> None:
    with pytest.raises(ValueError, match="bad redis") as caught:
        asyncio.run(open_store(url))
    assert store_says in str(caught.value)
    problems = config_problems(tmp_path, url)
    assert len(problems) == 1 and problems[0].startswith("state: "), problems
    assert config_says in problems[0]
    assert SECRET not in str(caught.value) and SECRET not in problems[0]


@pytest.mark.parametrize(
    ("url", "store_says"),
    [
        ("redis-sentinel://s1/m?sentinel_auth=maybe", "sentinel_auth must be yes or no"),
        ("redis-sentinel://s1/m?sentinel_auth=yes", "needs user:password@"),
        ("rediss-cluster://n1?ssl_cert_reqs=sometimes", "none, optional or required"),
        ("rediss-cluster://n1?ssl_check_hostname=perhaps", "must be yes or no"),
        ("rediss-cluster://n1?ssl_ca_certs=", "needs a value"),
        ("rediss-cluster://n1?ssl_ca_certs=/a&ssl_ca_certs=/b", "given twice"),
    ],
)
def test_option_values_are_checked_when_the_store_opens(url: str, store_says: str) -> None:
    # The config checks option names only; values are the store's (a ConfigError naming
    # `state` at start-up, through the server's open_state).
    with pytest.raises(ValueError, match=store_says):
        parse_ha_url(url)


def test_unknown_schemes_and_several_hosts_on_redis_are_config_errors(tmp_path: Path) -> None:
    assert config_problems(tmp_path, "sentinel://s1/m") == [
        "state: must start with sqlite:///, redis://, rediss://, redis-sentinel://,"
        " rediss-sentinel://, redis-cluster:// or rediss-cluster://"
    ]
    assert config_problems(tmp_path, "redis://h1:6379,h2:6379/0") == [
        "state: redis:// takes one host; for several use redis-sentinel:// (Sentinel)"
        " or redis-cluster:// (Cluster)"
    ]
    with pytest.raises(ValueError, match="redis-sentinel://host:26379,host:26379/service"):
        asyncio.run(open_store("sentinel://s1/m"))


def test_display_url_never_shows_the_password(tmp_path: Path) -> None:
    assert display_url(f"redis-sentinel://u:{SECRET}@s1:26379,s2/m/1?sentinel_auth=yes") == (
        "redis-sentinel://s1:26379,s2/m/1"
    )
    # Raw "#", "?" and "/" in a password would end the netloc for urlsplit: still hidden.
    assert display_url(f"redis://u:{SECRET}#?/x@h:6379/0") == "redis://h:6379/0"
    assert config_problems(tmp_path, f"redis://u:{SECRET}/x@h:6379/0") == [
        "state: redis URL: percent-encode @ / ? # in the user name and password (%40 %2F %3F %23)"
    ]
    assert display_url(f"rediss-cluster://:{SECRET}@[2001:db8::1]:7000") == (
        "rediss-cluster://[2001:db8::1]:7000"
    )


def test_a_sentinel_store_follows_the_primary_with_bounded_waits_and_no_retries() -> None:
    async def main() -> None:
        store = RedisStore.from_url(
            f"redis-sentinel://u:{SECRET}@127.0.0.1:1,127.0.0.1:2/mymaster/2",
            timeout=0.4,
            connect_timeout=0.3,
        )
        client = store.client
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "mymaster" and pool.max_connections == 16
        kwargs = pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.4, 0.3)
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (2, "u", SECRET)
        assert kwargs["protocol"] == 2 and kwargs["retry"].get_retries() == 0
        # The sentinels get the same bounded waits, and no password without sentinel_auth.
        sentinel = pool.sentinel_manager
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinel.sentinels] == [1, 2]
        assert sentinel.sentinel_kwargs["socket_timeout"] == 0.4
        assert "password" not in sentinel.sentinel_kwargs
        await store.close()

    asyncio.run(main())


def test_tls_sentinel_uses_tls_for_sentinels_and_data_nodes() -> None:
    async def main() -> None:
        store = RedisStore.from_url(
            f"rediss-sentinel://:{SECRET}@127.0.0.1:1/m?sentinel_auth=yes&ssl_cert_reqs=none"
        )
        client = store.client
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert pool.connection_class is SentinelManagedSSLConnection
        assert pool.connection_kwargs["ssl_cert_reqs"] == "none"
        sentinel_kwargs = pool.sentinel_manager.sentinel_kwargs
        assert sentinel_kwargs["ssl"] is True and sentinel_kwargs["password"] == SECRET
        await store.close()

    asyncio.run(main())


def test_a_cluster_store_starts_from_every_listed_node() -> None:
    async def main() -> None:
        store = RedisStore.from_url(
            f"rediss-cluster://u:{SECRET}@127.0.0.1:7000,127.0.0.1:7001", timeout=0.4
        )
        client = store.client
        assert isinstance(client, RedisCluster)
        names = [node.name for node in client.startup_nodes]
        assert names == ["127.0.0.1:7000", "127.0.0.1:7001"]
        kwargs = client.connection_kwargs
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.4
        assert kwargs["protocol"] == 2 and client.retry.get_retries() == 0
        assert (kwargs["username"], kwargs["password"]) == ("u", SECRET)
        assert kwargs["ssl_cert_reqs"] == "required"  # TLS, verified by default
        assert kwargs["connection_class"] is SSLConnection
        await store.close()

    asyncio.run(main())
