"""Durable room storage: one SQLite database (WAL) in the relay's data directory.

Each room is a snapshot (a merged Yjs update) plus a log of the updates accepted since, in
order. All SQLite work runs on one dedicated thread that owns the connection, so the event loop
never blocks on disk. Writes queued while a commit is in progress are committed together in the
next transaction (group commit): a burst of N updates costs one fsync, not N, and each caller's
future resolves only after the COMMIT that contains its row returned (synchronous=FULL), which
is what "durable" means to the relay: an update is broadcast or acknowledged only after that.
Under load (the last commit held several writes) the thread waits `commit_delay` for more
before committing, as PostgreSQL's `commit_delay` does: at 200 replies streaming at once it
halves the commits, each an fsync, for ~2 ms more per write (issue 16); a lone write is
committed at once. Operations run in the order they were queued, so a load sees every write
queued before it.

When a commit fails (a full disk, a read-only file, an I/O error) SQLite rolls it back, every
caller's future fails, and nothing was acknowledged. The rooms whose updates were in it are
marked failed on the store thread: their later writes, already queued, fail too instead of
being stored behind a gap (an update whose predecessor is missing would corrupt the room on
the next load), until the room is loaded again. `health()` says what went wrong until a commit
succeeds; while it reports a problem, the idle store thread probes with a small write every
`probe_interval` seconds, so the relay notices by itself when space returns.

SQLite opens a file it cannot write read-only without a word, and such a connection refuses
every write (SQLITE_READONLY) even after the file becomes writable. So the store probes once
right after opening (a relay that cannot write says so from the start), and a probe after a
plain SQLITE_READONLY opens the file again first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdtchat.errors import StorageError
from crdtchat.merge import merge
from crdtchat.updates import UpdateFormatError, check_update

log = logging.getLogger("crdtchat.relay.store")

DB_NAME = "relay.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    room TEXT PRIMARY KEY,
    upto INTEGER NOT NULL,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS waiting (
    room TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checked (
    room TEXT PRIMARY KEY,
    upto INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS probe (
    slot INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
"""
# Records that a room's stored bytes up to a sequence number were checked (`_check_parts`).
_MARK_CHECKED = (
    "INSERT INTO checked (room, upto) VALUES (?, ?) "
    "ON CONFLICT(room) DO UPDATE SET upto = max(upto, excluded.upto)"
)
# The probe writes this much, so that it needs fresh pages as a real update does.
_PROBE_BYTES = 64 * 1024


_WRITES = frozenset({"append", "compact", "waiting"})  # what `_commit` writes


class StoreError(StorageError, RuntimeError):
    """The store could not do what was asked; the room must not pretend it did."""


@dataclass(frozen=True)
class StoredRoom:
    """What the store holds for a room: `state`, then the updates of `log` in order.

    The SQLite store hands over its snapshot as `state` and the updates logged since as `log`,
    unmerged: the room applies them to its document one after the other, which costs a
    fraction of merging (that encodes the whole room again, ~70 ms at 10,000 messages). A
    store that keeps one update per room hands it as `state` with `log` empty.
    """

    state: bytes  # b"" for a new room
    log_length: int  # updates in the store's log after its snapshot
    log_bytes: int
    next_seq: int
    log: tuple[bytes, ...] = ()

    @property
    def whole(self) -> bytes:
        """Everything as one update (merged here, when asked: loading a room does not)."""
        if not self.log:
            return self.state
        parts = [self.state, *self.log] if self.state else list(self.log)
        return parts[0] if len(parts) == 1 else merge(*parts)


@dataclass(frozen=True)
class RoomStats:
    snapshot_bytes: int
    log_length: int
    log_bytes: int


@dataclass
class _Op:
    kind: str  # "append" | "compact" | "waiting" | "load" | "stats" | "list_waiting"
    room: str
    future: asyncio.Future[Any]
    seq: int = 0
    data: bytes = b""
    queued_at: float = 0.0


_STOP = object()


class Store:
    """Use as `async with Store(directory) as store:`; closing commits everything queued."""

    def __init__(
        self,
        directory: Path,
        *,
        on_commit: Callable[[list[float]], None] | None = None,
        probe_interval: float = 1.0,
        commit_delay: float = 0.0,
    ) -> None:
        self.path = Path(directory) / DB_NAME
        self.probe_interval = probe_interval
        self.commit_delay = commit_delay
        self._write_error: str | None = None
        self._failed_rooms: set[str] = set()  # owned by the store thread
        self._db: sqlite3.Connection  # owned by the store thread, from _run on
        self._read_only_connection = False  # the last write failed with plain SQLITE_READONLY
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        # Called on the event loop after each commit that stored updates, with each one's
        # seconds from queueing to commit (the relay's /metrics).
        self._on_commit = on_commit
        self.closed = False

    async def __aenter__(self) -> Store:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._stopped = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="crdtchat-store", daemon=True
        )
        self._thread.start()
        await ready
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.put(_STOP)
        assert self._stopped is not None
        await asyncio.shield(self._stopped)

    def health(self) -> str | None:
        """None while writes succeed; otherwise why the last one failed."""
        return self._write_error

    # -- the event loop side -------------------------------------------------------------

    def _submit(self, op: _Op) -> asyncio.Future[Any]:
        if self.closed:
            raise StoreError("the store is closed")
        self._queue.put(op)
        return op.future

    def _new_future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    def append(self, room: str, seq: int, update: bytes) -> asyncio.Future[None]:
        """Queue one accepted update; the future resolves once it is committed."""
        return self._submit(
            _Op(
                "append",
                room,
                self._new_future(),
                seq=seq,
                data=update,
                queued_at=time.perf_counter(),
            )
        )

    def compact(self, room: str, upto_seq: int, snapshot: bytes) -> asyncio.Future[None]:
        """Replace the room's snapshot and every logged update up to `upto_seq` by `snapshot`,
        which must contain all of them (the room's document state right after `upto_seq`)."""
        return self._submit(_Op("compact", room, self._new_future(), seq=upto_seq, data=snapshot))

    def set_waiting(self, room: str, waiting: bool) -> asyncio.Future[None]:
        """Remember whether `room` has something waiting for a worker (for the room feed)."""
        return self._submit(_Op("waiting", room, self._new_future(), data=b"1" if waiting else b""))

    async def waiting_rooms(self) -> list[str]:
        return await self._submit(_Op("list_waiting", "", self._new_future()))

    async def load(self, room: str) -> StoredRoom:
        return await self._submit(_Op("load", room, self._new_future()))

    async def stats(self, room: str) -> RoomStats:
        return await self._submit(_Op("stats", room, self._new_future()))

    # -- the store thread ----------------------------------------------------------------

    def _deliver(
        self, results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
    ) -> None:
        for future, value, error in results:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    def _post(self, results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
        if not results:
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, results)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            log.warning("store results dropped: event loop closed")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=10000")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            self._db = self._connect()
        except sqlite3.Error as error:
            self._post([(ready, None, StoreError(f"cannot open {self.path}: {error}"))])
            self._post([(self._stopped, None, None)])  # type: ignore[list-item]
            return
        self._probe(self._db)
        if self._write_error is not None:
            log.error("%s cannot be written (%s); serving reads", self.path, self._write_error)
        self._post([(ready, None, None)])
        try:
            self._serve()
        finally:
            self._db.close()
            self._post([(self._stopped, None, None)])  # type: ignore[list-item]

    def _serve(self) -> None:
        stopping = False
        grouped = 0  # writes in the last batch
        while not stopping:
            batch: list[_Op] = []
            if self._write_error is None:
                item = self._queue.get()
            else:
                try:
                    item = self._queue.get(timeout=self.probe_interval)
                except queue.Empty:
                    if self._read_only_connection:
                        self._reopen()
                    self._probe(self._db)
                    continue
            if self._read_only_connection:  # busy rooms' retries may leave no idle probe
                self._reopen()
            # under load: the writes about to come share the commit
            may_wait = grouped > 1 and self.commit_delay > 0 and self._write_error is None
            while True:
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _Op)
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    if not may_wait:
                        break
                    may_wait = False
                    time.sleep(self.commit_delay)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
            grouped = sum(op.kind in _WRITES for op in batch)
            self._process(self._db, batch)

    def _reopen(self) -> None:
        """Open the file again: the connection SQLite opened read-only stays read-only."""
        try:
            fresh = self._connect()
        except sqlite3.Error as exc:
            log.warning("cannot open %s again: %s", self.path, exc)
            return
        self._db.close()
        self._db = fresh
        self._read_only_connection = False

    def _process(self, db: sqlite3.Connection, batch: list[_Op]) -> None:
        writes: list[_Op] = []
        for op in batch:
            if op.kind in _WRITES:
                writes.append(op)
                continue
            self._commit(db, writes)
            writes = []
            self._post([self._read(db, op)])
        self._commit(db, writes)

    def _probe(self, db: sqlite3.Connection) -> None:
        """A small real write, to find out whether writing works again."""
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO probe (slot, data) VALUES (1, zeroblob(?))",
                (_PROBE_BYTES,),
            )
            db.execute("DELETE FROM probe")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            self._write_error = f"store write failed: {exc}"
            self._read_only_connection = _read_only(exc)
            return
        if self._write_error is not None:
            log.info("store writes again")
        self._write_error = None

    def _commit(self, db: sqlite3.Connection, writes: list[_Op]) -> None:
        if not writes:
            return
        if self._failed_rooms:
            failed = self._failed_rooms
            refused = [op for op in writes if op.kind != "waiting" and op.room in failed]
            if refused:
                gap = StoreError("an earlier write of this room failed; reload the room")
                self._post([(op.future, None, gap) for op in refused])
                writes = [op for op in writes if op not in refused]
                if not writes:
                    return
        error: BaseException | None = None
        try:
            if len(writes) <= _INSERT_ROWS and all(op.kind == "append" for op in writes):
                # One statement is a transaction of its own (autocommit), committed and synced
                # before it returns: the common group commit, in one statement.
                db.execute(_insert_statement(len(writes)), _insert_values(writes))
            else:
                db.execute("BEGIN IMMEDIATE")
                appends: list[_Op] = []
                for op in writes:
                    if op.kind == "append":
                        appends.append(op)
                        continue
                    _insert_updates(db, appends)  # the appends queued before this op, first
                    appends = []
                    _write_other(db, op)
                _insert_updates(db, appends)
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("store commit of %d writes failed: %s", len(writes), exc)
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            error = StoreError(f"store write failed: {exc}")
            self._write_error = str(error)
            self._read_only_connection = _read_only(exc)
            self._failed_rooms.update(op.room for op in writes if op.kind == "append")
        else:
            self._write_error = None
        done = time.perf_counter()
        if error is None and self._on_commit is not None:
            latencies = [done - op.queued_at for op in writes if op.kind == "append"]
            if latencies and self._loop is not None:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._on_commit, latencies)
        self._post([(op.future, None, error) for op in writes])

    def _read(
        self, db: sqlite3.Connection, op: _Op
    ) -> tuple[asyncio.Future[Any], Any, BaseException | None]:
        try:
            if op.kind == "load":
                # Everything queued before this load has run: from here on the room's writes
                # follow what is stored, without a gap.
                self._failed_rooms.discard(op.room)
                return op.future, self._load(db, op.room), None
            if op.kind == "stats":
                return op.future, self._stats(db, op.room), None
            if op.kind == "list_waiting":
                rows = db.execute("SELECT room FROM waiting ORDER BY room").fetchall()
                return op.future, [str(row[0]) for row in rows], None
            raise AssertionError(op.kind)
        except (sqlite3.Error, ValueError) as exc:
            return op.future, None, StoreError(f"cannot read room {op.room!r}: {exc}")

    def _load(self, db: sqlite3.Connection, room: str) -> StoredRoom:
        row = db.execute("SELECT upto, data FROM snapshots WHERE room = ?", (room,)).fetchone()
        upto, snapshot = (0, None) if row is None else (int(row[0]), bytes(row[1]))
        rows = db.execute(
            "SELECT seq, data FROM updates WHERE room = ? AND seq > ? ORDER BY seq",
            (room, upto),
        ).fetchall()
        updates = tuple(bytes(data) for _, data in rows)
        last = max([upto, *(int(seq) for seq, _ in rows)])
        self._check_parts(db, room, upto, snapshot, rows, last)
        return StoredRoom(
            state=snapshot or b"",
            log_length=len(updates),
            log_bytes=sum(len(u) for u in updates),
            next_seq=last + 1,
            log=updates,
        )

    def _check_parts(
        self,
        db: sqlite3.Connection,
        room: str,
        upto: int,
        snapshot: bytes | None,
        rows: list[Any],
        last: int,
    ) -> None:
        """Refuse a room holding an update that must not be applied (merging applies them).

        A room stored before the decoder's cap may hold a JSON value nested deep enough to
        crash yrs (design §7.1): such a room is not loaded and stays in the store as it is.
        `checked` records how far a room's log was checked, so a room pays once: what this
        relay appends was decoded (and capped) on the way in, and a snapshot covering only
        checked seqs is made from checked parts. A compaction marks its snapshot checked: it
        is the live document, made of what a load checked and what the relay decoded on the
        way in, so a room this relay wrote is never checked again. What an older relay writes
        later lies past the mark and is checked on the next load.
        """
        row = db.execute("SELECT upto FROM checked WHERE room = ?", (room,)).fetchone()
        checked = -1 if row is None else int(row[0])  # -1: nothing of the room is checked
        parts: list[tuple[str, bytes]] = []
        if snapshot is not None and upto > checked:
            parts.append(("snapshot", snapshot))
        parts += [(f"update {seq}", bytes(data)) for seq, data in rows if int(seq) > checked]
        if not parts:
            return
        for label, part in parts:
            try:
                check_update(part)
            except UpdateFormatError as error:
                raise ValueError(f"stored {label} cannot be loaded safely: {error}") from None
        try:
            db.execute(_MARK_CHECKED, (room, last))
        except sqlite3.Error as error:  # a store that cannot write: check again next time
            log.warning("room %s: could not record that it was checked: %s", room, error)

    def _stats(self, db: sqlite3.Connection, room: str) -> RoomStats:
        row = db.execute("SELECT length(data) FROM snapshots WHERE room = ?", (room,)).fetchone()
        count, total = db.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM updates WHERE room = ?",
            (room,),
        ).fetchone()
        return RoomStats(
            snapshot_bytes=0 if row is None else int(row[0]),
            log_length=int(count),
            log_bytes=int(total),
        )


def _read_only(error: sqlite3.Error) -> bool:
    """Whether SQLite refused the write because the connection is read-only (plain
    SQLITE_READONLY; not e.g. SQLITE_READONLY_DBMOVED, a file replaced under the relay, whose
    replacement must not be written as if it were the same)."""
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY


def _write_other(db: sqlite3.Connection, op: _Op) -> None:
    """A write other than an append: the waiting flag, or a compaction."""
    if op.kind == "waiting":
        if op.data:
            db.execute("INSERT OR IGNORE INTO waiting (room) VALUES (?)", (op.room,))
        else:
            db.execute("DELETE FROM waiting WHERE room = ?", (op.room,))
    else:
        db.execute("DELETE FROM updates WHERE room = ? AND seq <= ?", (op.room, op.seq))
        db.execute(
            "INSERT OR REPLACE INTO snapshots (room, upto, data) VALUES (?, ?, ?)",
            (op.room, op.seq, op.data),
        )
        # made from the room's live document: checked bytes (see Store._check_parts)
        db.execute(_MARK_CHECKED, (op.room, op.seq))


def _insert_updates(db: sqlite3.Connection, appends: list[_Op]) -> None:
    """Insert `appends`, in order, in as few statements as possible.

    sqlite3 gives up the GIL around each statement and must take it back from the event loop's
    thread, which, busy judging updates, keeps it until the switch interval makes it let go;
    on a loaded machine each hand-over also waits for the scheduler. One statement per row
    made a group commit of N updates pay N hand-overs, and each of its updates waited for all
    of them before it was acknowledged and broadcast.
    """
    for start in range(0, len(appends), _INSERT_ROWS):
        chunk = appends[start : start + _INSERT_ROWS]
        db.execute(_insert_statement(len(chunk)), _insert_values(chunk))


# Rows per INSERT: 3 parameters each, far below SQLite's limit of 32,766; the statements of
# every length up to this fit sqlite3's statement cache (128 by default).
_INSERT_ROWS = 100


@functools.cache
def _insert_statement(rows: int) -> str:
    return "INSERT INTO updates (room, seq, data) VALUES " + ", ".join(["(?, ?, ?)"] * rows)


def _insert_values(appends: list[_Op]) -> list[object]:
    values: list[object] = []
    for op in appends:
        values += (op.room, op.seq, op.data)
    return values
