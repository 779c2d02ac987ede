"""The embedded Store: stdlib sqlite3 on one dedicated writer thread.

Rules this module keeps:
- Every operation, reads included, runs on the store's own thread; the event loop only puts a job
  on a queue and awaits a future that the thread settles through `loop.call_soon_threadsafe`.
  sqlite3 calls block (disk, fsync at checkpoints, another process's lock), and one thread that
  owns the connection needs no locking in Python and cannot deadlock against itself.
- Jobs that are queued together run in one `BEGIN IMMEDIATE` transaction, and their results are
  delivered only after COMMIT succeeded: nobody acts on a result that could still roll back. If
  one job raises, the batch is rolled back, that job's caller gets the error and the others run
  again in a new transaction; if the transaction cannot begin or commit (lock timeout, I/O
  error), every job of the batch fails at once. A job whose caller was cancelled before its
  batch began is skipped.
- `BEGIN IMMEDIATE` takes the write lock up front, so worker processes sharing the file serialise
  on SQLite's lock (waiting up to `timeout`, then StoreError) instead of failing on a lock
  upgrade halfway through an operation.
- WAL journal, `synchronous=NORMAL`: a commit is an append to the WAL without fsync, so a power
  cut may lose the last moments of state (a greylist entry, some counts), never corrupt it.
- Expiry is a column compared with the store's clock: an expired row is absent for every
  operation and is overwritten or deleted when touched; a sweep every `sweep_interval` seconds
  deletes the rest, using an index on `expires_at` in every table.
- The schema is created and upgraded by numbered migrations recorded in `schema_migrations`. A
  file migrated by a newer Spam Killer (a version above SCHEMA_VERSION) is refused, not guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from spamkiller.store.base import (
    SCHEMA_VERSION,
    GreylistResult,
    RateResult,
    Reputation,
    SlotLease,
    StoreError,
    TlsHistory,
    check_count,
    check_duration,
    check_greylist,
    check_key,
    check_outcome,
    tls_name,
    tls_rank,
)

_T = TypeVar("_T")

# Each migration: (version, what it does, statements). Append only; never edit a released one.
MIGRATIONS: Final[tuple[tuple[int, str, tuple[str, ...]], ...]] = (
    (
        1,
        "greylist, rate, slot, reputation, tls and pass_cache tables",
        (
            "CREATE TABLE greylist (key TEXT PRIMARY KEY, first_seen REAL NOT NULL,"
            " passed_at REAL, expires_at REAL NOT NULL) WITHOUT ROWID",
            "CREATE TABLE rate (key TEXT PRIMARY KEY, count INTEGER NOT NULL,"
            " expires_at REAL NOT NULL) WITHOUT ROWID",
            "CREATE TABLE slot (key TEXT NOT NULL, token TEXT NOT NULL, expires_at REAL NOT NULL,"
            " PRIMARY KEY (key, token)) WITHOUT ROWID",
            "CREATE TABLE reputation (key TEXT PRIMARY KEY, first_seen REAL NOT NULL,"
            " last_seen REAL NOT NULL, counts TEXT NOT NULL, expires_at REAL NOT NULL)"
            " WITHOUT ROWID",
            "CREATE TABLE tls (key TEXT PRIMARY KEY, first_seen REAL NOT NULL,"
            " last_seen REAL NOT NULL, with_tls INTEGER NOT NULL, without_tls INTEGER NOT NULL,"
            " best INTEGER NOT NULL, floor INTEGER NOT NULL, expires_at REAL NOT NULL)"
            " WITHOUT ROWID",
            "CREATE TABLE pass_cache (key TEXT PRIMARY KEY, expires_at REAL NOT NULL)"
            " WITHOUT ROWID",
            *(
                f"CREATE INDEX {table}_expires ON {table} (expires_at)"
                for table in ("greylist", "rate", "slot", "reputation", "tls", "pass_cache")
            ),
        ),
    ),
)

TABLES: Final = ("greylist", "rate", "slot", "reputation", "tls", "pass_cache")

# Most jobs one transaction takes. Large enough that a burst of concurrent sessions shares a
# commit; small enough that one transaction (and the lock other processes wait on) stays short.
DEFAULT_MAX_BATCH = 256

_Run = Callable[[sqlite3.Connection, float], _T]


@dataclass(slots=True)
class _Job(Generic[_T]):
    run: _Run[_T]
    future: asyncio.Future[_T]
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True, slots=True, kw_only=True)
class SqliteStats:
    """Counters of the writer thread, for tests and the benchmark."""

    operations: int  # jobs taken (cancelled ones skipped before their batch not included)
    transactions: int  # begun (committed, rolled back or failed to begin), sweeps excluded
    largest_batch: int
    swept: int  # expired rows deleted by sweeps


class _Stop:
    """Queued by close(): the writer finishes the jobs before it and exits."""


_STOP: Final = _Stop()


def _settle(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """On the event loop: hand results to their futures (a cancelled future takes nothing)."""
    for future, ok, value in items:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _store_error(exc: BaseException, path: str) -> BaseException:
    """sqlite3 failures become StoreError; anything else is a bug and stays what it is."""
    if isinstance(exc, sqlite3.Error):
        error = StoreError(f"sqlite {path}: {exc}")
        error.__cause__ = exc
        return error
    return exc


class SqliteStore:
    """The Store protocol over one SQLite file. Create with `await SqliteStore.open(path)`."""

    def __init__(
        self,
        path: str | Path,
        *,
        timeout: float = 1.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        sweep_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Prefer `open()`, which also waits until the file is open and migrated."""
        self._path = str(path)
        self._timeout = check_duration("timeout", timeout)
        self._max_batch = check_count("max_batch", max_batch)
        self._sweep_interval = check_duration("sweep_interval", sweep_interval)
        # Wall-clock time, not monotonic: records outlive the process and are shared with other
        # processes. A clock step moves every expiry with it, as it would in Redis.
        self._clock = clock
        self._queue: queue.SimpleQueue[_Job[Any] | _Stop] = queue.SimpleQueue()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._operations = 0
        self._transactions = 0
        self._largest_batch = 0
        self._swept = 0

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        timeout: float = 1.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        sweep_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> SqliteStore:
        """Open (creating or migrating) the database at `path` on a new writer thread.

        `timeout` is how long a transaction waits for another process's lock before StoreError.
        A file that cannot be opened, is not a database, or has a newer schema: StoreError.
        """
        store = cls(
            path, timeout=timeout, max_batch=max_batch, sweep_interval=sweep_interval, clock=clock
        )
        await store._start()
        return store

    @property
    def path(self) -> str:
        return self._path

    def stats(self) -> SqliteStats:
        return SqliteStats(
            operations=self._operations,
            transactions=self._transactions,
            largest_batch=self._largest_batch,
            swept=self._swept,
        )

    # --- the writer thread ------------------------------------------------------------------

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        thread = threading.Thread(
            target=self._writer,
            args=(loop, ready),
            name=f"spamkiller-sqlite:{self._path}",
            # A daemon, so a process that forgets close() can still exit; close() is the way
            # to be sure the last transaction committed.
            daemon=True,
        )
        self._thread = thread
        thread.start()
        try:
            await ready
        except BaseException:
            self._closed = True
            self._queue.put(_STOP)
            raise

    def _writer(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            db = self._connect()
        except BaseException as exc:
            self._closed = True
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                loop.call_soon_threadsafe(_settle, [(ready, False, _store_error(exc, self._path))])
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, [(ready, True, None)])
        try:
            self._serve(db)
        finally:
            db.close()
            self._fail_leftovers()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the module starts no transactions by itself; we BEGIN and
        # COMMIT explicitly so a batch is exactly one transaction.
        db = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and self._path != ":memory:":
                raise StoreError(f"sqlite {self._path}: cannot use WAL mode (got {mode!r})")
            db.execute("PRAGMA synchronous=NORMAL")
            self._migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        # One transaction with the write lock held, so two processes starting at once cannot
        # both apply the same migration.
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " description TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
            current = int(row[0] or 0)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"sqlite {self._path}: schema version {current} was written by a newer Spam"
                    f" Killer; this one knows up to {SCHEMA_VERSION} and will not touch it"
                )
            for version, description, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at)"
                    " VALUES (?, ?, ?)",
                    (version, description, self._clock()),
                )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _serve(self, db: sqlite3.Connection) -> None:
        next_sweep = time.monotonic() + self._sweep_interval
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_sweep - time.monotonic()))
            except queue.Empty:
                item = None
            batch: list[_Job[Any]] = []
            stop = isinstance(item, _Stop)
            if isinstance(item, _Job):
                batch.append(item)
                # Take whatever else is already queued: those callers are waiting anyway, and
                # one commit for all of them is the point of the single writer.
                while len(batch) < self._max_batch:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(more, _Stop):
                        stop = True
                        break
                    batch.append(more)
            if batch:
                self._run_batch(db, batch)
            if time.monotonic() >= next_sweep:
                self._sweep(db)
                next_sweep = time.monotonic() + self._sweep_interval
            if stop:
                return

    def _run_batch(self, db: sqlite3.Connection, batch: list[_Job[Any]]) -> None:
        # Reading another thread's future state without its loop is safe enough here: the worst
        # a stale read does is run a job whose caller just left.
        pending = [job for job in batch if not job.future.cancelled()]
        if not pending:
            return
        self._largest_batch = max(self._largest_batch, len(pending))
        self._operations += len(pending)
        while pending:
            self._transactions += 1
            try:
                # Waits up to `timeout` for another process's lock. If that fails, the whole
                # batch fails at once: retrying each job would make the last caller wait
                # `timeout` once per job ahead of it.
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._deliver([(job, False, _store_error(exc, self._path)) for job in pending])
                return
            # One clock reading per transaction: everything in it happens at the same instant.
            now = self._clock()
            results: list[Any] = []
            try:
                for job in pending:
                    results.append(job.run(db, now))
            except Exception as exc:
                # One job failed (a corrupt record, a full disk): undo the batch, fail that job
                # alone, and run the others again in a new transaction.
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                failed = pending[len(results)]
                self._deliver([(failed, False, _store_error(exc, self._path))])
                pending = [job for job in pending if job is not failed]
                continue
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                self._deliver([(job, False, _store_error(exc, self._path)) for job in pending])
                return
            self._deliver([(job, True, value) for job, value in zip(pending, results, strict=True)])
            return

    def _deliver(self, outcomes: list[tuple[_Job[Any], bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for job, ok, value in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, ok, value))
        for loop, items in by_loop.items():
            # One wake-up of the loop per batch, not one per job.
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, items)

    def _sweep(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("BEGIN IMMEDIATE")
            now = self._clock()
            deleted = 0
            for table in TABLES:
                deleted += db.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,)).rowcount
            db.execute("COMMIT")
        except sqlite3.Error:
            # A busy or failing database: the rows stay expired (invisible) until the next sweep
            # or until they are touched. Operations report their own errors to their callers.
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            return
        self._swept += deleted

    def _fail_leftovers(self) -> None:
        self._closed = True
        leftovers: list[tuple[_Job[Any], bool, Any]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                leftovers.append((item, False, StoreError(f"sqlite {self._path}: store closed")))
        self._deliver(leftovers)

    async def _submit(self, run: _Run[_T]) -> _T:
        if self._closed:
            raise StoreError(f"sqlite {self._path}: store closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_Job(run, future, loop))
        return await future

    # --- the operations (each `run` executes on the writer thread, inside a transaction) -----

    async def greylist(
        self,
        key: str,
        *,
        delay: float,
        expire: float,
        retry_window: float | None = None,
        now: float | None = None,
    ) -> GreylistResult:
        check_key(key)
        delay, window, expire = check_greylist(delay, expire, retry_window, now)
        fixed_now = now

        def run(db: sqlite3.Connection, clock_now: float) -> GreylistResult:
            now = clock_now if fixed_now is None else float(fixed_now)
            row = db.execute(
                "SELECT first_seen, passed_at, expires_at FROM greylist WHERE key = ?", (key,)
            ).fetchone()
            if row is None or row[2] <= now:
                db.execute(
                    "INSERT OR REPLACE INTO greylist (key, first_seen, passed_at, expires_at)"
                    " VALUES (?, ?, NULL, ?)",
                    (key, now, now + window),
                )
                return GreylistResult(first_seen=now, passed=False, retry_after=delay)
            first_seen, passed_at = float(row[0]), row[1]
            if passed_at is not None or now - first_seen >= delay:
                db.execute(
                    "UPDATE greylist SET passed_at = ?, expires_at = ? WHERE key = ?",
                    (now, now + expire, key),
                )
                return GreylistResult(first_seen=first_seen, passed=True, retry_after=0.0)
            return GreylistResult(
                first_seen=first_seen, passed=False, retry_after=first_seen + delay - now
            )

        return await self._submit(run)

    async def hit_rate(self, key: str, *, window: float, limit: int, cost: int = 1) -> RateResult:
        check_key(key)
        window = check_duration("window", window)
        check_count("limit", limit)
        check_count("cost", cost)

        def run(db: sqlite3.Connection, now: float) -> RateResult:
            row = db.execute("SELECT count, expires_at FROM rate WHERE key = ?", (key,)).fetchone()
            if row is None or row[1] <= now:
                count, expires_at = 0, now + window
            else:
                count, expires_at = int(row[0]), float(row[1])
            allowed = count + cost <= limit
            if allowed:
                count += cost
                db.execute(
                    "INSERT OR REPLACE INTO rate (key, count, expires_at) VALUES (?, ?, ?)",
                    (key, count, expires_at),
                )
            return RateResult(count=count, allowed=allowed, reset_after=expires_at - now)

        return await self._submit(run)

    async def acquire_slot(self, key: str, *, limit: int, ttl: float) -> SlotLease | None:
        check_key(key)
        check_count("limit", limit)
        ttl = check_duration("ttl", ttl)
        token = secrets.token_hex(8)

        def run(db: sqlite3.Connection, now: float) -> SlotLease | None:
            db.execute("DELETE FROM slot WHERE key = ? AND expires_at <= ?", (key, now))
            row = db.execute("SELECT count(*) FROM slot WHERE key = ?", (key,)).fetchone()
            in_use = int(row[0])
            if in_use >= limit:
                return None
            db.execute(
                "INSERT INTO slot (key, token, expires_at) VALUES (?, ?, ?)",
                (key, token, now + ttl),
            )
            return SlotLease(key=key, token=token, in_use=in_use + 1)

        return await self._submit(run)

    async def release_slot(self, lease: SlotLease) -> None:
        key, token = check_key(lease.key), lease.token

        def run(db: sqlite3.Connection, now: float) -> None:
            db.execute("DELETE FROM slot WHERE key = ? AND token = ?", (key, token))

        await self._submit(run)

    async def record_outcome(self, key: str, outcome: str, *, expire: float) -> Reputation:
        check_key(key)
        check_outcome(outcome)
        expire = check_duration("expire", expire)

        def run(db: sqlite3.Connection, now: float) -> Reputation:
            row = db.execute(
                "SELECT first_seen, counts, expires_at FROM reputation WHERE key = ?", (key,)
            ).fetchone()
            if row is None or row[2] <= now:
                first_seen, counts, expires_at = now, {}, now + expire
            else:
                first_seen, counts = float(row[0]), _counts(row[1], self._path)
                expires_at = max(float(row[2]), now + expire)
            counts[outcome] = counts.get(outcome, 0) + 1
            db.execute(
                "INSERT OR REPLACE INTO reputation (key, first_seen, last_seen, counts, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, first_seen, now, json.dumps(counts, sort_keys=True), expires_at),
            )
            return Reputation(first_seen=first_seen, last_seen=now, counts=counts)

        return await self._submit(run)

    async def reputation(self, key: str) -> Reputation | None:
        check_key(key)

        def run(db: sqlite3.Connection, now: float) -> Reputation | None:
            row = db.execute(
                "SELECT first_seen, last_seen, counts FROM reputation"
                " WHERE key = ? AND expires_at > ?",
                (key, now),
            ).fetchone()
            if row is None:
                return None
            return Reputation(
                first_seen=float(row[0]),
                last_seen=float(row[1]),
                counts=_counts(row[2], self._path),
            )

        return await self._submit(run)

    async def record_tls(self, key: str, *, version: str | None, expire: float) -> TlsHistory:
        check_key(key)
        rank = tls_rank(version)
        expire = check_duration("expire", expire)

        def run(db: sqlite3.Connection, now: float) -> TlsHistory:
            row = _tls_row(db, key, now, expire)
            if rank:
                row.with_tls += 1
                row.best = max(row.best, rank)
            else:
                row.without_tls += 1
            return _tls_write(db, key, now, row)

        return await self._submit(run)

    async def raise_tls_floor(self, key: str, version: str, *, expire: float) -> TlsHistory:
        check_key(key)
        rank = tls_rank(version)
        if rank == 0:
            raise ValueError("the TLS floor is a TLS version, not None")
        expire = check_duration("expire", expire)

        def run(db: sqlite3.Connection, now: float) -> TlsHistory:
            row = _tls_row(db, key, now, expire)
            row.floor = max(row.floor, rank)
            return _tls_write(db, key, now, row)

        return await self._submit(run)

    async def tls_history(self, key: str) -> TlsHistory | None:
        check_key(key)

        def run(db: sqlite3.Connection, now: float) -> TlsHistory | None:
            row = db.execute(
                "SELECT first_seen, last_seen, with_tls, without_tls, best, floor FROM tls"
                " WHERE key = ? AND expires_at > ?",
                (key, now),
            ).fetchone()
            if row is None:
                return None
            return TlsHistory(
                first_seen=float(row[0]),
                last_seen=float(row[1]),
                with_tls=int(row[2]),
                without_tls=int(row[3]),
                best_version=tls_name(int(row[4])),
                floor=tls_name(int(row[5])),
            )

        return await self._submit(run)

    async def pass_cache_get(self, key: str) -> bool:
        check_key(key)

        def run(db: sqlite3.Connection, now: float) -> bool:
            row = db.execute(
                "SELECT 1 FROM pass_cache WHERE key = ? AND expires_at > ?", (key, now)
            ).fetchone()
            return row is not None

        return await self._submit(run)

    async def pass_cache_put(self, key: str, *, ttl: float) -> None:
        check_key(key)
        ttl = check_duration("ttl", ttl)

        def run(db: sqlite3.Connection, now: float) -> None:
            db.execute(
                "INSERT OR REPLACE INTO pass_cache (key, expires_at) VALUES (?, ?)",
                (key, now + ttl),
            )

        await self._submit(run)

    async def ping(self) -> None:
        def run(db: sqlite3.Connection, now: float) -> None:
            db.execute("SELECT 1").fetchone()

        await self._submit(run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        thread = self._thread
        if thread is not None:
            # Joined off the loop: the writer may still be committing the last batch.
            await asyncio.to_thread(thread.join)


def _counts(text: str, path: str) -> dict[str, int]:
    try:
        counts = json.loads(text)
    except ValueError as exc:
        raise StoreError(f"sqlite {path}: corrupt reputation counts {text!r}") from exc
    if not isinstance(counts, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in counts.items()
    ):
        raise StoreError(f"sqlite {path}: corrupt reputation counts {text!r}")
    return counts


@dataclass(slots=True, kw_only=True)
class _TlsRow:
    """A tls row being updated inside a transaction."""

    first_seen: float
    with_tls: int
    without_tls: int
    best: int
    floor: int
    expires_at: float


def _tls_row(db: sqlite3.Connection, key: str, now: float, expire: float) -> _TlsRow:
    """The live record of `key` (a new one if none lives), its life extended to `expire`."""
    row = db.execute(
        "SELECT first_seen, with_tls, without_tls, best, floor, expires_at FROM tls WHERE key = ?",
        (key,),
    ).fetchone()
    if row is None or row[5] <= now:
        return _TlsRow(
            first_seen=now, with_tls=0, without_tls=0, best=0, floor=0, expires_at=now + expire
        )
    return _TlsRow(
        first_seen=float(row[0]),
        with_tls=int(row[1]),
        without_tls=int(row[2]),
        best=int(row[3]),
        floor=int(row[4]),
        expires_at=max(float(row[5]), now + expire),
    )


def _tls_write(db: sqlite3.Connection, key: str, now: float, row: _TlsRow) -> TlsHistory:
    db.execute(
        "INSERT OR REPLACE INTO tls (key, first_seen, last_seen, with_tls, without_tls, best,"
        " floor, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key,
            row.first_seen,
            now,
            row.with_tls,
            row.without_tls,
            row.best,
            row.floor,
            row.expires_at,
        ),
    )
    return TlsHistory(
        first_seen=row.first_seen,
        last_seen=now,
        with_tls=row.with_tls,
        without_tls=row.without_tls,
        best_version=tls_name(row.best),
        floor=tls_name(row.floor),
    )
