"""The recipient directory: known / unknown / not listed, sub-addresses, case, postmaster, the cap,
and which upstream refusals mean "no such user"."""

from __future__ import annotations

import pytest

from spamkiller.checks.recipients import (
    TOO_MANY_UNKNOWN,
    Lookup,
    RecipientDirectory,
    means_unknown_user,
    user_unknown,
)
from spamkiller.smtp.address import parse_path
from spamkiller.smtp.replies import Reply

DIRECTORY = RecipientDirectory({"example.com": frozenset({"alice", "bob", "sales+eu"})})


def lookup(directory: RecipientDirectory, address: str) -> Lookup:
    parsed = parse_path(f"<{address}>", utf8=True)
    assert parsed is not None
    return directory.lookup(parsed)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.com", Lookup.KNOWN),
        ("bob@example.com", Lookup.KNOWN),
        ("carol@example.com", Lookup.UNKNOWN),
        ("alic@example.com", Lookup.UNKNOWN),
        ("alice.smith@example.com", Lookup.UNKNOWN),
        # Case folds in the local part and the domain alike.
        ("ALICE@EXAMPLE.COM", Lookup.KNOWN),
        ("Bob@Example.Com", Lookup.KNOWN),
        # Sub-addresses: the part before the first delimiter is the mailbox.
        ("alice+news@example.com", Lookup.KNOWN),
        ("Alice+News+More@example.com", Lookup.KNOWN),
        ("carol+news@example.com", Lookup.UNKNOWN),
        ("+alice@example.com", Lookup.UNKNOWN),
        # A listed local part containing the delimiter matches whole, as Postfix does.
        ("sales+eu@example.com", Lookup.KNOWN),
        ("sales@example.com", Lookup.UNKNOWN),
        # postmaster exists everywhere (RFC 5321 4.5.1), also when not listed.
        ("postmaster@example.com", Lookup.KNOWN),
        ("PostMaster@example.com", Lookup.KNOWN),
        ("postmaster+x@example.com", Lookup.KNOWN),
        ("postmaster", Lookup.KNOWN),
        # A domain without a list is the upstream's to judge.
        ("anyone@example.org", Lookup.NOT_LISTED),
    ],
)
def test_lookup(address: str, expected: Lookup) -> None:
    assert lookup(DIRECTORY, address) is expected


def test_local_parts_are_folded_when_built() -> None:
    directory = RecipientDirectory({"Example.COM": frozenset({"Alice"})})
    assert lookup(directory, "alice@example.com") is Lookup.KNOWN


def test_sub_addressing_off() -> None:
    directory = RecipientDirectory({"example.com": frozenset({"alice"})}, delimiter="")
    assert lookup(directory, "alice@example.com") is Lookup.KNOWN
    assert lookup(directory, "alice+news@example.com") is Lookup.UNKNOWN


def test_several_delimiter_characters_cut_at_the_first() -> None:
    directory = RecipientDirectory({"example.com": frozenset({"alice"})}, delimiter="+-")
    assert lookup(directory, "alice-news@example.com") is Lookup.KNOWN
    assert lookup(directory, "alice+news-x@example.com") is Lookup.KNOWN
    assert lookup(directory, "alicex-news@example.com") is Lookup.UNKNOWN


def test_empty_list_leaves_only_postmaster() -> None:
    directory = RecipientDirectory({"example.com": frozenset()})
    assert lookup(directory, "alice@example.com") is Lookup.UNKNOWN
    assert lookup(directory, "postmaster@example.com") is Lookup.KNOWN


def test_no_lists_judges_nothing() -> None:
    assert lookup(RecipientDirectory(), "anyone@example.com") is Lookup.NOT_LISTED


@pytest.mark.parametrize(
    ("max_unknown", "count", "over"),
    [(5, 5, False), (5, 6, True), (1, 1, False), (1, 2, True), (0, 1000, False)],
)
def test_cap(max_unknown: int, count: int, over: bool) -> None:
    assert RecipientDirectory(max_unknown=max_unknown).over_cap(count) is over


@pytest.mark.parametrize(
    ("reply", "unknown"),
    [
        (Reply(550, "5.1.1", "No such user"), True),
        (Reply(550, "5.1.10", "Null MX"), True),
        (Reply(553, "5.1.3", "Bad address syntax"), True),
        (Reply(551, "", "User not local"), True),
        (Reply(550, "", "Mailbox unavailable"), True),
        (Reply(553, "", "Mailbox name not allowed"), True),
        # A policy refusal or a full mailbox is no evidence of guessing.
        (Reply(550, "5.7.1", "Relay access denied"), False),
        (Reply(552, "5.2.2", "Mailbox full"), False),
        (Reply(554, "", "Transaction failed"), False),
        (Reply(450, "4.1.1", "Try again"), False),
        (Reply(450, "", "Mailbox busy"), False),
    ],
)
def test_means_unknown_user(reply: Reply, unknown: bool) -> None:
    assert means_unknown_user(reply) is unknown


def test_replies() -> None:
    assert user_unknown("carol@example.com").wire == (
        b"550 5.1.1 <carol@example.com>: Recipient address rejected: user unknown\r\n"
    )
    assert TOO_MANY_UNKNOWN.code == 421 and TOO_MANY_UNKNOWN.enhanced == "4.7.0"
