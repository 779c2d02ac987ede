"""Crash safety: kill -9 of a real `spam-killer run` at any point of a transaction loses no mail.

The promise (docs/reliability.md): the client gets 250 only after the upstream's 250. So whatever
instant the MX dies, either the client saw 250 and the upstream holds the message, or the client
saw no 250 and retries. The one window where both hold it (the upstream said 250, ours had not
reached the client) turns a crash into a duplicate, never a loss. These tests count both.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Certs, mx_config
from support.load import BoundClient, KillingUpstream, MxProcess, smtp_transaction
from support.net import RawClient
from support.upstream import Received, RecordingUpstream

SEED = 20240611
STAGES = (
    "connect",  # before the greeting is read
    "ehlo",
    "mail",
    "rcpt",
    "data",  # after DATA, before its 354 is read
    "mid-data",  # part of the text sent
    "after-dot",  # the final dot sent, the reply not read: a race with the relay, either way ok
    "upstream-250",  # the upstream recorded it and has not answered yet: the duplicate window
)
PER_STAGE = 4
ROUNDS = PER_STAGE * len(STAGES)


def body(tag: str, size: int) -> bytes:
    """A message with a unique Message-ID; `size` octets of text in 78-octet lines."""
    head = f"Message-ID: <{tag}@crash.test>\r\nSubject: {tag}\r\n\r\n".encode()
    line = b"0123456789" * 7 + b"abcdef\r\n"
    return head + line * max(1, size // len(line))


def copies(up: RecordingUpstream, tag: str) -> int:
    needle = f"Message-ID: <{tag}@crash.test>".encode()
    return sum(needle in m.data for m in list(up.messages))


def reply_or_none(c: RawClient) -> bytes | None:
    """The next reply, or None if the connection died (reset or closed) before one came."""
    try:
        return c.reply()
    except (ConnectionError, OSError):
        return None


def arm_killer(up: KillingUpstream, mx: MxProcess) -> None:
    """Kill -9 the MX the next time the upstream records a message (once)."""

    def hook(_: Received) -> None:
        up.arm(None)
        mx.kill9()  # returns once the process is reaped: our 250 can no longer be sent

    up.arm(hook)


def retry_until_250(mx: MxProcess, message: bytes, attempts: int = 5) -> int:
    """What a sending MTA does after a failed attempt: the whole transaction again; attempts."""
    for attempt in range(1, attempts + 1):
        with BoundClient(mx.port, timeout=10) as c:
            assert c.reply().startswith(b"220 ")
            final = smtp_transaction(c, message)
            if final.startswith(b"250 "):
                return attempt
            assert final.startswith(b"4"), f"retry got {final!r}"  # never a 5xx here
        time.sleep(0.1)
    raise AssertionError(f"not delivered after {attempts} attempts")


@pytest.fixture()
def config(tmp_path: Path, certs: Certs) -> Callable[[int], dict[str, object]]:
    def make(upstream_port: int) -> dict[str, object]:
        return mx_config(tmp_path, certs, upstream_port=upstream_port)

    return make


def test_kill9_mid_data_then_the_retry_is_delivered_once(
    tmp_path: Path, config: Callable[[int], dict[str, object]]
) -> None:
    message = body("mid-data", 200_000)
    half = len(message) // 2
    with RecordingUpstream() as up, MxProcess(tmp_path, config(up.port)) as mx:
        with BoundClient(mx.port, timeout=10) as c:
            assert c.reply().startswith(b"220 ")
            c.send(b"EHLO crash.example\r\nMAIL FROM:<a@crash.example>\r\n")
            assert c.reply().startswith(b"250-")
            assert c.code() == 250
            c.send(b"RCPT TO:<bob@example.com>\r\nDATA\r\n")
            assert [c.code(), c.code()] == [250, 354]
            c.send(message[:half])
            time.sleep(0.2)  # the MX has read the first half
            mx.kill9()
            assert reply_or_none(c) is None, "a reply came from a killed MX"
        time.sleep(0.2)  # let the upstream see its side of the connection close
        assert up.messages == [], "the upstream holds a message nobody was told was accepted"
        assert up.connections >= 1 and b"DATA\r\n" in up.raw[0]  # it had begun, then lost it
        mx.start()
        assert retry_until_250(mx, message) == 1
    assert copies(up, "mid-data") == 1
    assert len(up.messages) == 1


def test_kill9_between_the_upstream_250_and_ours_gives_a_duplicate_not_a_loss(
    tmp_path: Path, config: Callable[[int], dict[str, object]]
) -> None:
    message = body("window", 4_000)
    with KillingUpstream() as up, MxProcess(tmp_path, config(up.port)) as mx:
        arm_killer(up, mx)
        with BoundClient(mx.port, timeout=10) as c:
            assert c.reply().startswith(b"220 ")
            try:
                final: bytes | None = smtp_transaction(c, message)
            except (ConnectionError, OSError):
                final = None
        assert mx.kills == 1, "the upstream hook did not run"
        assert final is None, f"the client got {final!r} from a killed MX"
        assert copies(up, "window") == 1  # the upstream holds it; the client does not know
        mx.start()
        assert retry_until_250(mx, message) == 1
        duplicates = copies(up, "window") - 1
        lost = 0 if copies(up, "window") else 1
        print(f"\nkill -9 between the upstream's 250 and ours: duplicates={duplicates} lost={lost}")
        assert (duplicates, lost) == (1, 0)


@dataclass
class Round:
    stage: str
    client_saw_250: bool = False
    held_after_kill: int = 0  # copies at the upstream before the retry
    retries: int = 0
    copies: int = 0


def one_round(mx: MxProcess, up: KillingUpstream, rng: random.Random, n: int, stage: str) -> Round:
    tag = f"round-{n}-{stage}"
    message = body(tag, rng.randrange(1_000, 300_000))
    result = Round(stage)
    steps = [
        ("ehlo", b"EHLO crash.example\r\n"),
        ("mail", b"MAIL FROM:<a@crash.example>\r\n"),
        ("rcpt", b"RCPT TO:<bob@example.com>\r\n"),
        ("data", b"DATA\r\n"),
    ]
    if stage == "upstream-250":
        arm_killer(up, mx)
    with BoundClient(mx.port, timeout=10) as c:
        try:
            if stage == "connect":
                mx.kill9()
            c.reply()
            for name, command in steps:
                c.send(command)
                if stage == name:
                    mx.kill9()
                c.reply()
            if stage == "mid-data":
                cut = rng.randrange(1, len(message))
                c.send(message[:cut])
                time.sleep(0.05)
                mx.kill9()
                c.send(message[cut:])
            else:
                c.send(message)
            c.send(b".\r\n")
            if stage == "after-dot":
                mx.kill9()
            final = reply_or_none(c)
        except (ConnectionError, OSError):
            final = None
    if final is not None and final.startswith(b"250 "):
        # Only possible when the relay finished before the kill: then the upstream must hold it.
        assert stage == "after-dot", f"{stage}: 250 from a killed MX: {final!r}"
        result.client_saw_250 = True
        assert copies(up, tag) >= 1, f"{tag}: the client was told 250 and the upstream lacks it"
    if mx.alive():
        mx.kill9()  # a kill point the transaction did not reach still ends the process
    up.arm(None)
    result.held_after_kill = copies(up, tag)
    mx.start()
    if not result.client_saw_250:
        result.retries = retry_until_250(mx, message)
    result.copies = copies(up, tag)
    return result


def test_random_kills_over_many_rounds_lose_nothing(
    tmp_path: Path, config: Callable[[int], dict[str, object]]
) -> None:
    rng = random.Random(SEED)
    plan = [stage for stage in STAGES for _ in range(PER_STAGE)]
    rng.shuffle(plan)  # every kill point, in a random order, with random sizes and cuts
    rounds: list[Round] = []
    started = time.monotonic()
    with KillingUpstream() as up, MxProcess(tmp_path, config(up.port)) as mx:
        for n, stage in enumerate(plan):
            rounds.append(one_round(mx, up, rng, n, stage))
        kills = mx.kills
    lost = sum(r.copies == 0 for r in rounds)
    duplicates = sum(max(0, r.copies - 1) for r in rounds)
    duplicated_at = {s: sum(r.copies - 1 for r in rounds if r.stage == s) for s in STAGES}
    print(
        f"\n{ROUNDS} rounds (seed {SEED}, {PER_STAGE} per kill point), {kills} kill -9 in"
        f" {time.monotonic() - started:.1f}s; client saw 250 before the kill in"
        f" {sum(r.client_saw_250 for r in rounds)}; duplicates={duplicates}"
        f" ({', '.join(f'{s}: {n}' for s, n in duplicated_at.items() if n)}) lost={lost}"
    )
    assert lost == 0
    assert kills == ROUNDS
    # Every duplicate comes from the window where both held the message, and only from it.
    for r in rounds:
        assert r.copies == (1 if r.client_saw_250 else r.held_after_kill + 1), r
        assert r.copies <= 2, r
    assert duplicates == sum(r.held_after_kill for r in rounds if not r.client_saw_250)
    assert all(r.held_after_kill == 1 for r in rounds if r.stage == "upstream-250")
