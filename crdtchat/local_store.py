"""A replica's own SQLite file: its copy of one document, and what the relay has not stored yet.

The file is an append-only log of updates (local and remote) that is compacted, every so often,
into one snapshot row; a separate table holds the ids of local updates that the relay has not
acknowledged as durably stored, so that "pending" survives a restart. WAL mode, `synchronous=FULL`:
a batch that returned is on disk.

`LocalStore` is blocking and single-threaded; `AsyncLocalStore` runs it on one worker thread at a
time so that the event loop never waits on SQLite or on compaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import anyio
import anyio.to_thread
from pycrdt import Doc

from crdtchat.errors import StorageError
from crdtchat.lifetime import ClosesOnExit
from crdtchat.updates import UpdateFormatError, check_update

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_COMPACT_EVERY = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (local_id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS view (
    slot INTEGER PRIMARY KEY CHECK (slot = 1),
    data BLOB NOT NULL
);
"""


class LocalStoreError(StorageError, RuntimeError):
    """The file is not a crdtchat replica store, or is from a newer version."""


class UnsafeStoreError(LocalStoreError):
    """A row of the file holds an update that must not be applied (`check_update`): a JSON value
    nested deep enough to crash pycrdt, or bytes that are not an update. Nothing is applied and
    the file is left as it is (design §7.1)."""


@dataclass(frozen=True)
class AppendLocal:
    local_id: int
    update: bytes


@dataclass(frozen=True)
class AppendRemote:
    update: bytes


@dataclass(frozen=True)
class MarkDurable:
    local_ids: tuple[int, ...]


@dataclass(frozen=True)
class SaveView:
    """Replace the stored view snapshot (`crdtchat.view.ViewSnapshot.encode()`)."""

    data: bytes


@dataclass(frozen=True)
class ResetTo:
    """Replace everything stored (log, pending ids, view snapshot) by `update` (b"": nothing)
    with `pending` as the pending local ids.

    For a replica that throws its document away (`Replica.recover`); local ids keep growing.
    """

    update: bytes
    pending: tuple[int, ...] = ()


StoreOp = AppendLocal | AppendRemote | MarkDurable | SaveView | ResetTo


@dataclass(frozen=True)
class StoredState:
    """What a replica starts from."""

    update: bytes  # the whole stored document as one update (b"" when there is none)
    pending: tuple[int, ...]  # local ids not yet acknowledged by the relay
    next_local_id: int
    log_rows: int


class LocalStore(ClosesOnExit):
    """Blocking access to one replica file; use it from one thread at a time."""

    def __init__(self, path: str | Path, *, compact_every: int = DEFAULT_COMPACT_EVERY) -> None:
        if compact_every < 2:
            raise ValueError("compact_every must be at least 2")
        self.path = Path(path)
        self.compact_every = compact_every
        self._max_pages: int | None = None  # set_size_limit's cap, kept across a reopen
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._set_up(self._db)
            with self._transaction():
                # Not executescript(): it would commit the surrounding transaction.
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                version = self._meta("schema")
                if version is None:
                    self._set_meta("schema", SCHEMA_VERSION)
                    self._set_meta("next_local_id", 1)
                    self._set_meta("checked_through", 0)  # empty: nothing to check
                elif version > SCHEMA_VERSION:
                    raise LocalStoreError(
                        f"{self.path} has store schema {version}; this crdtchat knows "
                        f"{SCHEMA_VERSION}"
                    )
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise LocalStoreError(f"{self.path} is not a usable replica store: {error}") from error
        except BaseException:
            self._db.close()
            raise
        self._log_rows = self._count_rows()

    # -- helpers ---------------------------------------------------------------------------

    def _set_up(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        if self._max_pages is not None:
            db.execute(f"PRAGMA max_page_count = {int(self._max_pages)}")

    def _reopen(self) -> None:
        """Open the file again. SQLite opens a file it cannot write read-only without a word,
        and that connection refuses every write (SQLITE_READONLY) even once the file is
        writable: only a new one finds out."""
        try:
            fresh = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                self._set_up(fresh)
            except BaseException:
                fresh.close()
                raise
        except sqlite3.Error as error:
            log.warning("%s: cannot open it again: %s", self.path, error)
            return
        self._db.close()
        self._db = fresh

    def _transaction(self) -> _Tx:
        return _Tx(self._db)

    def _meta(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _max_id(self) -> int:
        return int(self._db.execute("SELECT coalesce(max(id), 0) FROM updates").fetchone()[0])

    def _checked_through(self) -> int:
        """Rows up to this id are known safe to apply: checked, or written by this version
        from content that came through checked paths (a file from an older version, or rows
        an older version appended, have ids past it)."""
        return self._meta("checked_through") or 0

    def _check_rows(self, rows: Sequence[tuple[int, bytes]], *, record: bool = True) -> None:
        """`check_update` each row past `checked_through`; raise UnsafeStoreError on the first
        that fails, else record that they are checked (a re-open does not pay again)."""
        through = self._checked_through()
        unchecked = [(row_id, data) for row_id, data in rows if row_id > through]
        if not unchecked:
            return
        for row_id, data in unchecked:
            try:
                check_update(data)
            except UpdateFormatError as error:
                raise UnsafeStoreError(
                    f"{self.path}: stored update {row_id} cannot be applied safely ({error}); "
                    "nothing was loaded and the file is left as it is"
                ) from None
        if record:
            try:
                with self._transaction():
                    self._set_meta("checked_through", max(through, unchecked[-1][0]))
            except sqlite3.Error as error:  # a file that refuses writes: check again next time
                log.warning("%s: could not record that rows are checked: %s", self.path, error)

    def _count_rows(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM updates").fetchone()[0])

    # -- API -------------------------------------------------------------------------------

    @property
    def log_rows(self) -> int:
        """Rows in the update log (a compacted store has one)."""
        return self._log_rows

    def load(self) -> StoredState:
        """The stored document merged into one update, with the pending local ids."""
        rows_with_ids = [
            (int(r[0]), bytes(r[1]))
            for r in self._db.execute("SELECT id, data FROM updates ORDER BY id")
        ]
        self._check_rows(rows_with_ids)
        rows = [data for _, data in rows_with_ids]
        pending = tuple(r[0] for r in self._db.execute("SELECT local_id FROM pending ORDER BY 1"))
        next_local_id = self._meta("next_local_id") or 1
        # A compacted store is one row, already what the document holds: merging it through a
        # scratch document would only decode and re-encode it (the cost of a second open).
        update = rows[0] if len(rows) == 1 else _merge(rows)
        return StoredState(update, pending, next_local_id, len(rows))

    def write(self, ops: Sequence[StoreOp]) -> None:
        """Apply `ops` in order, in one transaction; compact afterwards if the log is long."""
        if not ops:
            return
        try:
            added = self._write(ops)
        except sqlite3.Error as error:
            if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY:  # _reopen
                self._reopen()
            raise
        self._log_rows += added
        if self._log_rows >= self.compact_every:
            try:
                self.compact()
            except (sqlite3.Error, UnsafeStoreError) as error:
                # The batch is committed; a compaction that does not fit (a full disk) is
                # retried after a later write, and the log it would have replaced stays.
                log.warning("%s: compaction failed, the log is kept: %s", self.path, error)

    def _write(self, ops: Sequence[StoreOp]) -> int:
        """`write`'s transaction; returns the rows it added to the log."""
        added = 0
        with self._transaction():
            # What this version appends came through checked paths; it stays known-checked
            # only if everything before it was (else the next load checks from the gap on).
            trusted = self._checked_through() >= self._max_id()
            next_local_id = self._meta("next_local_id") or 1
            for op in ops:
                if isinstance(op, AppendLocal):
                    self._db.execute("INSERT INTO updates (data) VALUES (?)", (op.update,))
                    self._db.execute(
                        "INSERT OR IGNORE INTO pending (local_id) VALUES (?)", (op.local_id,)
                    )
                    next_local_id = max(next_local_id, op.local_id + 1)
                    added += 1
                elif isinstance(op, AppendRemote):
                    self._db.execute("INSERT INTO updates (data) VALUES (?)", (op.update,))
                    added += 1
                elif isinstance(op, MarkDurable):
                    self._db.executemany(
                        "DELETE FROM pending WHERE local_id = ?", [(i,) for i in op.local_ids]
                    )
                elif isinstance(op, ResetTo):
                    for table in ("updates", "pending", "view"):
                        self._db.execute(f"DELETE FROM {table}")  # fixed names
                    self._log_rows = added = 0
                    trusted = True  # the replica's own document, which was checked
                    if op.update:
                        self._db.execute("INSERT INTO updates (data) VALUES (?)", (op.update,))
                        added = 1
                    self._db.executemany(
                        "INSERT INTO pending (local_id) VALUES (?)", [(i,) for i in op.pending]
                    )
                elif isinstance(op, SaveView):
                    self._db.execute(
                        "INSERT OR REPLACE INTO view (slot, data) VALUES (1, ?)", (op.data,)
                    )
                else:
                    raise TypeError(f"not a store operation: {op!r}")
            self._set_meta("next_local_id", next_local_id)
            if trusted:
                self._set_meta("checked_through", self._max_id())
        return added

    def load_view(self) -> bytes | None:
        """The stored view snapshot's bytes, unchecked (decode them with ViewSnapshot)."""
        row = self._db.execute("SELECT data FROM view WHERE slot = 1").fetchone()
        return None if row is None else bytes(row[0])

    def set_size_limit(self, max_bytes: int | None) -> None:
        """Cap the database file (SQLite's max_page_count): writes past it fail with "database
        or disk is full", exactly as on a full disk. None removes the cap."""
        page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        pages = 0xFFFFFFFE if max_bytes is None else max(1, max_bytes // page_size)
        self._db.execute(f"PRAGMA max_page_count = {int(pages)}")
        self._max_pages = None if max_bytes is None else pages

    def compact(self) -> None:
        """Replace the log by one snapshot of the document (deleted content garbage-collected).

        Runs in one transaction: a crash leaves either the old log or the snapshot.
        """
        with self._transaction():
            rows = self._db.execute("SELECT id, data FROM updates ORDER BY id").fetchall()
            if len(rows) <= 1:
                self._log_rows = len(rows)
                return
            if self._checked_through() < rows[-1][0]:  # never merge unchecked rows
                self._check_rows([(int(i), bytes(data)) for i, data in rows], record=False)
            snapshot = _merge([bytes(data) for _, data in rows])
            last_id = rows[-1][0]
            self._db.execute("DELETE FROM updates WHERE id <= ?", (last_id,))
            self._db.execute("INSERT INTO updates (data) VALUES (?)", (snapshot,))
            self._set_meta("checked_through", self._max_id())
        self._log_rows = 1

    def close(self) -> None:
        self._db.close()


def read_view(path: str | Path) -> bytes | None:
    """The view snapshot of the replica file at `path`, read without opening it for writing.

    What a client calls first on a re-open, to show the conversation before the document is
    loaded. None when there is no file, no snapshot, or the file cannot be read.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT data FROM view WHERE slot = 1").fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None if row is None else bytes(row[0])


class _Tx:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:  # SQLite has already rolled back after e.g. SQLITE_FULL
            self._db.execute("ROLLBACK")


def _merge(updates: list[bytes]) -> bytes:
    """One update equivalent to all of `updates`, with deleted content garbage-collected.

    Goes through a scratch document (not pycrdt.merge_updates) so that a compacted store holds
    what the document holds, not its whole history.
    """
    if not updates:
        return b""
    doc: Doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc.get_update()


class AsyncLocalStore:
    """`LocalStore` for async code: every call runs on a worker thread, one at a time."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    async def open(
        cls, path: str | Path, *, compact_every: int = DEFAULT_COMPACT_EVERY
    ) -> AsyncLocalStore:
        store = await anyio.to_thread.run_sync(
            lambda: LocalStore(path, compact_every=compact_every)
        )
        return cls(store)

    async def load(self) -> StoredState:
        return await anyio.to_thread.run_sync(self.store.load, limiter=self._limiter)

    async def set_size_limit(self, max_bytes: int | None) -> None:
        await anyio.to_thread.run_sync(self.store.set_size_limit, max_bytes, limiter=self._limiter)

    async def load_view(self) -> bytes | None:
        return await anyio.to_thread.run_sync(self.store.load_view, limiter=self._limiter)

    async def write(self, ops: Sequence[StoreOp]) -> None:
        # Shielded: a write that started finishes, so the file never lags what we reported.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.store.write, list(ops), limiter=self._limiter)

    async def compact(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.store.compact, limiter=self._limiter)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.store.close, limiter=self._limiter)
