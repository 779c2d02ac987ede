"""The store's values, argument rules and URL dispatch, without a backend."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
from pathlib import Path

import pytest

from spamkiller.errors import SpamKillerError
from spamkiller.store import open_store
from spamkiller.store.base import (
    KEY_PREFIX,
    SCHEMA_VERSION,
    TLS_VERSIONS,
    GreylistResult,
    RateResult,
    Reputation,
    SlotLease,
    StoreError,
    TlsHistory,
    check_key,
    tls_name,
    tls_rank,
)
from spamkiller.store.sqlite import MIGRATIONS

STORE_SRC = Path(__file__).resolve().parents[2] / "src" / "spamkiller" / "store"

VALUES = [
    GreylistResult(first_seen=1.0, passed=False, retry_after=2.0),
    RateResult(count=1, allowed=True, reset_after=3.0),
    SlotLease(key="k", token="t", in_use=1),
    Reputation(first_seen=1.0, last_seen=2.0, counts={"accept": 1}),
    TlsHistory(
        first_seen=1.0,
        last_seen=2.0,
        with_tls=1,
        without_tls=0,
        best_version="TLSv1.3",
        floor=None,
    ),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_values_are_frozen_slotted_keyword_only(value: object) -> None:
    cls = type(value)
    assert not hasattr(value, "__dict__")
    field = dataclasses.fields(value)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, None)
    with pytest.raises(TypeError):
        cls(*[getattr(value, f.name) for f in dataclasses.fields(value)])  # type: ignore[arg-type]


def test_store_error_is_a_spam_killer_error() -> None:
    assert issubclass(StoreError, SpamKillerError)


def test_version_and_prefix_agree_with_the_last_migration() -> None:
    assert KEY_PREFIX.startswith(f"sk:v{SCHEMA_VERSION}:")
    assert MIGRATIONS[-1][0] == SCHEMA_VERSION
    assert [m[0] for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def test_tls_ranks_follow_the_protocol_order() -> None:
    assert tls_rank(None) == 0
    ranks = [tls_rank(v) for v in ("SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")]
    assert ranks == sorted(ranks) == [1, 2, 3, 4, 5]
    for version in TLS_VERSIONS:
        assert tls_name(tls_rank(version)) == version
    assert tls_name(0) is None
    with pytest.raises(ValueError, match="unknown TLS version"):
        tls_rank("tlsv1.3")
    with pytest.raises(StoreError, match="unknown to this version"):
        tls_name(len(TLS_VERSIONS) + 1)  # written by a newer Spam Killer


def test_keys_take_any_printable_text_up_to_the_limit() -> None:
    assert (
        check_key("2001:db8::/64|a@b.example|é@d.example")
        == "2001:db8::/64|a@b.example|é@d.example"
    )
    assert check_key("x" * 1024)
    for bad in ("", "x" * 1025, "a\nb", "a\x00b", "a\x7fb"):
        with pytest.raises(ValueError):
            check_key(bad)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/state", "unsupported store URL scheme 'mysql'"),
        ("state.db", "unsupported store URL scheme 'state.db'"),
        ("sqlite://state.db", "unsupported store URL scheme 'sqlite'"),
        ("sqlite:///", "sqlite URL without a path"),
        ("redis://127.0.0.1:notaport/0", "bad Redis URL 'redis://127.0.0.1:notaport/0'"),
    ],
)
def test_open_store_refuses_other_urls_clearly(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        asyncio.run(open_store(url))


def test_store_imports_only_errors_from_spamkiller() -> None:
    # docs/architecture.md: store may import errors, config and its client libraries. (Also in
    # tests/unit/test_architecture.py once its table has a `store` row.)
    for path in STORE_SRC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "spamkiller":
                    assert parts[1] in {"errors", "config", "store"}, f"{path.name}: {name}"
