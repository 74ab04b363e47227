"""`Replica`: a local-first copy of one conversation document, kept in sync through a relay.

The document lives in memory (`replica.doc`, a plain pycrdt Doc that a `Conversation` may wrap)
and in the replica's own SQLite file, so edits made offline survive a restart. While the relay
is reachable the replica stays connected, resyncing both ways from state vectors on every
(re)connect; when it is not, the replica retries with exponential backoff and full jitter,
moving round robin through its relays when it was given several (design §3).
Status (connected, synced, pending local updates, all durably stored) is observable and
awaitable; presence travels as y-protocols awareness.

All protocol logic is in `crdtchat.sync.SyncSession`; this module only moves bytes between it,
a websocket and the local store. Runs on the asyncio backend of anyio (the `websockets` library
is asyncio-only). The document must be edited from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pycrdt import Array, Awareness, Doc, Map, Text, get_state
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from crdtchat.local_store import (
    DEFAULT_COMPACT_EVERY,
    AppendLocal,
    AppendRemote,
    AsyncLocalStore,
    LocalStoreError,
    MarkDurable,
    ResetTo,
    SaveView,
    StoreOp,
)
from crdtchat.relays import relay_urls
from crdtchat.schema import DRAFTS, MESSAGES, ROOM_NAME
from crdtchat.shape import array_json
from crdtchat.signals import Changes
from crdtchat.sync import (
    Denied,
    Durable,
    LocalUpdate,
    PresenceChanged,
    RemoteUpdate,
    Synced,
    SyncProtocolError,
    SyncSession,
)
from crdtchat.tokens import TokenError, read_claims_unverified
from crdtchat.view import MessageView, SnapshotError, ViewSnapshot
from crdtchat.wire import (
    MESSAGE_TOKEN_REFRESH,
    Extension,
    RefreshAnswer,
    WireError,
    WireMessage,
    decode_frame,
    encode_frame,
    encode_message,
    encode_token_refresh,
)

log = logging.getLogger(__name__)

# Close codes by which a relay says "do not come back with these credentials", as y-websocket's
# client treats them. (1008 is not one: the relay uses it for bad input and rate limits, after
# which a reconnect is right; an expired token is then refused at the HTTP upgrade.)
_REJECTING_CLOSE_CODES = range(4400, 4500)
# A token is refreshed this long before it expires (at most a third of its lifetime before).
REFRESH_AHEAD = 60.0
TokenProvider = Callable[[], Awaitable[str] | str]
# Messages are packed into frames of about this size (one larger message goes alone).
_FRAME_TARGET = 256 * 1024


@dataclass(frozen=True)
class Backoff:
    """Reconnection delays: attempt n waits uniform(0, min(maximum, initial * factor**n))."""

    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1:
            raise ValueError("need 0 < initial <= maximum and factor >= 1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: spread reconnecting clients over the whole window."""
        exponent = min(attempt, 64)  # keeps factor**n finite
        return rng.uniform(0.0, min(self.maximum, self.initial * self.factor**exponent))


@dataclass(frozen=True)
class Recovery:
    """What `Replica.recover` dropped and kept. `doc` replaces the replica's old document."""

    doc: Doc
    dropped: int  # local updates thrown away (the refused ones and what built on them)
    draft_kept: bool  # our draft text was written again into the new document
    unsent: tuple[str, ...]  # texts of our messages the relay never stored, to offer again

    def describe(self) -> str:
        parts = [f"dropped {self.dropped} refused local change(s), reloaded from the relay"]
        if self.draft_kept:
            parts.append("kept your draft")
        if self.unsent:
            parts.append(f"{len(self.unsent)} unsent message(s) kept for you to send again")
        return "; ".join(parts)


@dataclass(frozen=True)
class ReplicaStatus:
    """A snapshot of the replica's state; a new one is published on every change."""

    connected: bool = False
    synced: bool = False  # the relay's state has been received on the current connection
    pending: int = 0  # local updates the relay has not acknowledged as durably stored
    unsaved: int = 0  # updates not yet written to the local SQLite file
    denied: str | None = None  # the last reason the relay gave for refusing something
    rejected: str | None = None  # set while reconnecting is suspended (token refused)
    refused: int = 0  # local updates the relay refused (they block later ones: recover())
    store_error: str | None = None  # the local file refuses writes; edits wait in memory
    notice: str | None = None  # something the person should be told (e.g. after recover())
    remote_error: str | None = None  # the relay sent what we refused (e.g. a too-deep value)
    relay: str | None = None  # the relay connected to, or the one tried next (design §3)

    @property
    def durable(self) -> bool:
        """Every local edit is durably stored by the relay (survives a relay crash)."""
        return self.pending == 0

    @property
    def blocked(self) -> bool:
        """A local write was refused: it and every later one (they build on it) can never be
        stored. `Replica.recover` is the way back."""
        return self.refused > 0


class Replica:
    """One document's replica; use as `async with Replica(...) as replica:`.

    `url` is the relay's base URL (``ws://HOST:PORT``), or several: a sequence or a
    comma-separated string (`crdtchat.relays`). The replica connects to the first and, when a
    connection fails or drops, moves to the next, round robin with `backoff` between attempts;
    `status.relay` says which is current. A relay that refuses the token is not left for the
    next one: the replica stops reconnecting (`status.rejected`) as with one.

    `doc` may be an existing document (e.g. ``conversation.doc``): whatever it already holds is
    merged with the local file and counted as pending. `store_path` None keeps no local file
    (nothing survives a restart). `presence` is our initial awareness state, e.g.
    ``{"user": sub, "device": "laptop"}``. `durable_acks` asks the relay for durable-write
    acknowledgements; without them `pending` never goes down. `on_denied` is called with the
    relay's reason whenever it refuses something; it must not write to the document.

    `view` (the `Conversation.view` over `doc`) makes the replica keep a snapshot of the end
    of the current thread in its file, at most every `snapshot_interval` seconds while the
    document changes and on close, so that the next open can show it at once
    (`crdtchat.local_store.read_view`). On open, `opening_snapshot` is the stored one and
    `opening_snapshot_matched` whether it showed the document as loaded (a stale or corrupt
    one is never used beyond that first picture). When the file refuses writes (a full disk)
    edits stay in memory, `status.store_error` says why, and writes are retried with
    `store_retry`'s delays until they succeed.

    `token_provider` (a function, sync or async, returning a current token for this room) keeps
    a long-lived connection open past its token's expiry: the replica asks for the refresh
    extension (design §3) and sends a fresh token ahead of each expiry; when the relay still
    ends the connection for an expired token, or refuses one at connect, it asks the provider
    once more and reconnects, with its local edits kept and sent on.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        room: str,
        token: str,
        *,
        doc: Doc | None = None,
        store_path: str | Path | None = None,
        presence: dict[str, Any] | None = None,
        backoff: Backoff | None = None,
        durable_acks: bool = True,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_message_size: int = 64 * 1024 * 1024,
        on_denied: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        view: MessageView | None = None,
        snapshot_interval: float = 10.0,
        store_retry: Backoff | None = None,
        token_provider: TokenProvider | None = None,
    ) -> None:
        if not ROOM_NAME.fullmatch(room):
            raise ValueError(f"invalid room name {room!r}: 1-128 characters of A-Za-z0-9._-")
        self.urls = relay_urls(url)
        self._relay_index = 0
        self._attempt_rejected = False  # the current attempt's relay refused the token
        self.room = room
        self._token = token
        self._token_provider = token_provider
        self.doc: Doc = doc if doc is not None else Doc()
        self.awareness = Awareness(self.doc)
        self.awareness.set_local_state(dict(presence) if presence is not None else {})
        self._store_path = None if store_path is None else Path(store_path)
        self._backoff = backoff or Backoff()
        self._durable_acks = durable_acks
        self._compact_every = compact_every
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._max_message_size = max_message_size
        self._on_denied = on_denied
        self._rng = rng or random.Random()
        self._view = view
        self._snapshot_interval = snapshot_interval
        self._store_retry = store_retry or Backoff(initial=0.5, maximum=10.0)
        self._store_error: str | None = None
        self._store_retry_now = anyio.Event()
        self._snapshot_due = anyio.Event()
        self._notice: str | None = None
        self._recover_requested = False
        self._swapped = anyio.Event()
        self.opening_snapshot: ViewSnapshot | None = None
        self.opening_snapshot_matched: bool | None = None

        self._status = ReplicaStatus(relay=self.url)
        self._status_changes = Changes()
        self._presence_changes = Changes()
        self._status_callbacks: list[Callable[[ReplicaStatus], None]] = []
        self._session: SyncSession | None = None
        self._store: AsyncLocalStore | None = None
        self._ops_send: MemoryObjectSendStream[StoreOp] | None = None
        self._unsaved = 0
        self._denied: str | None = None
        self._rejected: str | None = None
        self._remote_error: str | None = None  # until a connection syncs again
        self._token_obtained = time.time()
        self._offered_token: str | None = None
        self._token_answered = anyio.Event()
        self._fresh_refused = False
        self._attempt = 0
        # Set and cleared again by the sender, once per edit: a plain asyncio event, since
        # building an anyio Event each time cost more than the wake-up.
        self._send_wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the replica opened in
        self._pump_scheduled = False
        self._retry_now = anyio.Event()
        self._stopping = anyio.Event()
        self._exit_stack: AsyncExitStack | None = None
        self._ws: ClientConnection | None = None
        self._connection_loop_done = anyio.Event()
        self._background_scope: anyio.CancelScope | None = None
        self._attempt_scope: anyio.CancelScope | None = None

    # -- public API ----------------------------------------------------------------------

    @property
    def status(self) -> ReplicaStatus:
        """The current status; reflects every edit made so far, even in this same tick."""
        # Local edits only mark the replica dirty (they run inside pycrdt commits); catch up
        # here so that `edit; await wait_until(lambda s: s.durable)` cannot pass too early.
        self._pump()
        return self._status

    @property
    def url(self) -> str:
        """The current relay's base URL: the one connected to, or the one tried next."""
        return self.urls[self._relay_index]

    @property
    def client_id(self) -> int:
        return self.doc.client_id

    @property
    def local_store(self) -> AsyncLocalStore | None:
        """The replica's file, while open (None without `store_path`)."""
        return self._store

    @property
    def session(self) -> SyncSession:
        if self._session is None:
            raise RuntimeError("the replica is not open")
        return self._session

    async def wait_until(
        self, predicate: Callable[[ReplicaStatus], bool], *, timeout: float | None = None
    ) -> ReplicaStatus:
        """Wait until `predicate(status)` holds, e.g. ``lambda s: s.durable``.

        Checked again on every status change and every update to the document that passes
        through the replica, so the predicate may read the document too."""
        with anyio.fail_after(timeout):
            while not predicate(self.status):
                await self._status_changes.wait()
        return self._status

    def on_status(self, callback: Callable[[ReplicaStatus], None]) -> Callable[[], None]:
        """Call `callback` with each new status; returns a function that unsubscribes."""
        self._status_callbacks.append(callback)
        return lambda: self._status_callbacks.remove(callback)

    @property
    def presence(self) -> dict[str, Any] | None:
        """Our own awareness state."""
        return self.awareness.get_local_state()

    def set_presence(self, **fields: Any) -> None:
        """Merge `fields` into our awareness state (sent at once when connected)."""
        self.awareness.set_local_state({**(self.awareness.get_local_state() or {}), **fields})

    @property
    def peers(self) -> dict[int, dict[str, Any]]:
        """Awareness states of everyone else connected to the room, by client id."""
        mine = self.awareness.client_id
        return {cid: dict(s) for cid, s in self.awareness.states.items() if cid != mine}

    def other_devices(self) -> dict[int, dict[str, Any]]:
        """Peers whose presence names the same user as ours: this person's other devices."""
        user = (self.awareness.get_local_state() or {}).get("user")
        if user is None:
            return {}
        return {cid: s for cid, s in self.peers.items() if s.get("user") == user}

    async def wait_for_peers(
        self,
        predicate: Callable[[dict[int, dict[str, Any]]], bool],
        *,
        timeout: float | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Wait until `predicate(self.peers)` holds."""
        with anyio.fail_after(timeout):
            while not predicate(self.peers):
                await self._presence_changes.wait()
        return self.peers

    def set_token(self, token: str) -> None:
        """Use `token` from the next connection on, and reconnect now if suspended."""
        self._token = token
        self._rejected = None
        self._publish()
        self.reconnect_now()

    def reconnect_now(self) -> None:
        """Skip the current backoff wait (for the relay, and for the local file)."""
        self._retry_now.set()
        self._store_retry_now.set()

    async def recover(self, *, timeout: float | None = 30.0) -> Recovery:
        """Give a blocked replica a way back: drop its refused local changes and reload.

        The relay refuses a write as a whole and never stores it, but the local document holds
        it, and every later local write builds on it, so the relay refuses those too. This
        throws the local document away, starts a new one (with a new client id, since the old
        one's clocks were spent on the refused items) from what the relay stores, replaces the
        local file's content by it once it has arrived (if `timeout` passes first, the file
        keeps the old document too, and a restart is blocked again), and writes our draft
        text again where the role allows
        drafts. Messages of ours that the relay never stored are not written again (one of them
        may be what was refused): their texts come back in `Recovery.unsent` to offer to the
        person. Every local change not yet stored by the relay is dropped, refused or not.
        `status.notice` tells the person what happened. The caller must rebuild anything that
        wraps the old document (`Conversation(recovery.doc, ...)`); `self.doc` is the new one.
        """
        if self._session is None:
            raise RuntimeError("the replica is not open")
        old_doc, subject = self.doc, self._subject()
        draft = _draft_of(old_doc, subject)
        ours = _own_messages(old_doc, subject)
        dropped = self.session.pending_count
        with anyio.fail_after(timeout):
            self._swapped = anyio.Event()
            self._recover_requested = True
            self._end_connection()
            await self._swapped.wait()
            await self.wait_until(lambda s: s.synced)
        if self._store is not None:
            # Only now, with the relay's state in hand, does the file let go of the old
            # document: a crash before this point reopens the old one (still blocked, but
            # with everything it had), never an empty one.
            self._queue_op(ResetTo(self.doc.get_update(), self.session.pending_ids))
        stored_ids = {m.get("id") for m in _message_dicts(self.doc)}
        unsent = tuple(str(m.get("content", "")) for m in ours if m.get("id") not in stored_ids)
        draft_kept = False
        role = self._role()
        if draft and role == "writer" and subject is not None:
            drafts = self.doc.get(DRAFTS, type=Map)
            current = drafts.get(subject)
            if not isinstance(current, Text):
                drafts[subject] = Text(draft)
                draft_kept = True
            elif str(current) != draft:
                with self.doc.transaction():  # edit the stored Text: other devices share it
                    del current[:]
                    current += draft
                draft_kept = True
        recovery = Recovery(self.doc, dropped, draft_kept, unsent)
        self._notice = recovery.describe()
        log.warning("room %s: recovered: %s", self.room, self._notice)
        self._publish()
        return recovery

    def set_view(self, view: MessageView | None) -> None:
        """The view whose snapshots to keep from now on (after `recover`, the new one's)."""
        self._view = view
        self._snapshot_due.set()

    def _subject(self) -> str | None:
        try:
            return read_claims_unverified(self._token).sub
        except TokenError:
            return None

    def _role(self) -> str | None:
        try:
            return read_claims_unverified(self._token).role
        except TokenError:
            return None

    def _end_connection(self) -> None:
        self._retry_now.set()
        scope = self._attempt_scope
        if scope is not None:
            scope.cancel()

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._open(stack)
        except BaseException as error:
            await stack.__aexit__(type(error), error, error.__traceback__)
            raise
        self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._exit_stack is not None
        self._stopping.set()
        self._retry_now.set()
        stack, self._exit_stack = self._exit_stack, None
        # The teardown does not see the body's exception (the body's exception propagates
        # untouched after it). Feeding a cancellation through the task group in the stack
        # built a __context__ cycle that made anyio's task_done loop forever.
        await stack.aclose()
        self.close()
        return None

    def close(self) -> None:
        """Drop the replica's observers of the document and awareness (idempotent).

        `async with` does this on exit; call it yourself for a replica that was built but
        never entered or whose exit failed. yrs holds the callbacks, out of reach of Python's
        cycle collector, so until then the replica and the document keep each other alive.
        """
        if self._session is not None:
            self._session.close()

    async def _open(self, stack: AsyncExitStack) -> None:
        pending: tuple[int, ...] = ()
        next_local_id = 1
        stored = b""
        if self._store_path is not None:
            self._store = await AsyncLocalStore.open(
                self._store_path, compact_every=self._compact_every
            )
            stack.push_async_callback(self._store.close)
            snapshot = await self._store.load_view()
            state = await self._store.load()
            stored, pending, next_local_id = state.update, state.pending, state.next_local_id
            if snapshot is not None:
                try:
                    self.opening_snapshot = ViewSnapshot.decode(snapshot)
                except SnapshotError as error:
                    log.warning("room %s: ignoring the stored view snapshot: %s", self.room, error)
        had_content = self.doc.get_state() != b"\x00"
        if stored:
            # Before the session observes the document: this is not a new local edit.
            self.doc.apply_update(stored)
        if self.opening_snapshot is not None:
            self.opening_snapshot_matched = self.opening_snapshot.matches(self.doc)
        self._loop = asyncio.get_running_loop()
        session = SyncSession(
            self.doc,
            self.awareness,
            pending=pending,
            next_local_id=next_local_id,
            on_change=self._mark_dirty,
        )
        self._session = session
        stack.callback(session.close)
        if had_content:
            # Content the caller's document brought along is ours until the relay has it.
            session.track_local(self.doc.get_update(get_state(stored) if stored else None))

        task_group = await stack.enter_async_context(anyio.create_task_group())
        # Exit order (reverse of registration): stop the connection and background tasks,
        # then let the store writer drain everything queued, then the task group ends.
        stack.push_async_callback(self._close_store_queue)
        if self._store is not None:
            # Without a file there is nothing to write: no queue, no writer task to wake
            # twice per edit (a worker streaming 200 replies paid ~9% of its CPU for it).
            ops_send, ops_receive = anyio.create_memory_object_stream[StoreOp](math.inf)
            self._ops_send = ops_send
            task_group.start_soon(self._store_writer, ops_receive)
        self._background_scope = anyio.CancelScope()
        stack.callback(self._background_scope.cancel)
        task_group.start_soon(self._background)
        stack.push_async_callback(self._wait_connection_loop_done)
        task_group.start_soon(self._connection_loop)
        self._pump()

    async def _wait_connection_loop_done(self) -> None:
        # Shielded: stopping ends the connection loop promptly, and raising a cancellation
        # from inside the exit stack made a CancelledError its own __context__, which sends
        # anyio's task_done into an endless loop.
        with anyio.CancelScope(shield=True):
            await self._connection_loop_done.wait()

    async def _close_store_queue(self) -> None:
        self._pump()  # whatever the last moments produced
        if self._view is not None and self._store is not None and self._ops_send is not None:
            self._queue_snapshot()
        if self._ops_send is not None:
            await self._ops_send.aclose()

    def _queue_snapshot(self) -> None:
        """Queue a snapshot of the view behind every update queued so far: if the process
        dies in between, the file holds an older document and the snapshot's key says so."""
        assert self._view is not None
        if self._view.doc is not self.doc or self._view.closed:
            # After recover() until set_view() gives the new view; or a closed view, which no
            # longer follows the document: its snapshot would carry the current key over old
            # content, and a re-open would take it as up to date.
            return
        try:
            data = self._view.snapshot().encode()
        except Exception:  # a snapshot is an optimisation: never fail the replica for it
            log.exception("room %s: could not take a view snapshot", self.room)
            return
        self._queue_op(SaveView(data))

    async def _snapshot_loop(self) -> None:
        """At most one snapshot per `snapshot_interval` while the document changes."""
        while True:
            await self._snapshot_due.wait()
            self._snapshot_due = anyio.Event()
            if self._view is not None:
                self._queue_snapshot()
            await anyio.sleep(self._snapshot_interval)  # a rate limit, not a wait for work

    # -- tasks ---------------------------------------------------------------------------

    async def _background(self) -> None:
        """Awareness renewal/expiry, and the view snapshots of a replica with a file."""
        assert self._background_scope is not None
        with self._background_scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.awareness.start)
                if self._store is not None:
                    tg.start_soon(self._snapshot_loop)

    def _mark_dirty(self) -> None:
        """Move the session's events out of the document commit that made them, soon after.

        Called inside pycrdt commits: only schedule, never do the work here. A loop callback
        (one per burst of edits), not a task woken by an event: a worker's flush of each of
        its streamed replies lands here, and a task's wake-up costs several times a call."""
        if self._pump_scheduled or self._loop is None:
            return
        self._pump_scheduled = True
        self._loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self._pump()

    async def _store_writer(self, ops: MemoryObjectReceiveStream[StoreOp]) -> None:
        # Shielded as a whole: even when the owner is cancelled, every edit queued before the
        # queue closes (on exit) reaches the file. It ends when the queue is closed and empty.
        with anyio.CancelScope(shield=True):
            await self._write_store_ops(ops)

    async def _write_store_ops(self, ops: MemoryObjectReceiveStream[StoreOp]) -> None:
        async with ops:
            while True:
                try:
                    batch = [await ops.receive()]
                except anyio.EndOfStream:
                    return
                while True:
                    try:
                        batch.append(ops.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                if self._store is not None:
                    await self._write_until_stored(batch)
                self._unsaved -= sum(isinstance(op, AppendLocal | AppendRemote) for op in batch)
                self._publish()

    async def _write_until_stored(self, batch: list[StoreOp]) -> None:
        """Write `batch`, retrying while the file refuses it (a full disk, an I/O error).

        The edits stay in the document and in the batch meanwhile, so nothing is lost while
        the process lives; `status.store_error` says why they are not on disk. The batch is
        one transaction, so a failed attempt leaves the file as it was.
        """
        assert self._store is not None
        attempt = 0
        while True:
            try:
                await self._store.write(batch)
            except (sqlite3.Error, LocalStoreError) as error:
                if self._store_error is None:
                    log.error("room %s: local store write failed: %s", self.room, error)
                self._store_error = str(error) or type(error).__name__
                self._publish()
                if self._stopping.is_set() and attempt > 0:
                    # Closing, and the file still refuses: say what is lost locally rather
                    # than hang the close. (The relay has whatever it acknowledged.)
                    log.error(
                        "room %s: closing with %d updates not saved locally: %s",
                        self.room,
                        sum(isinstance(op, AppendLocal | AppendRemote) for op in batch),
                        self._store_error,
                    )
                    return
                self._store_retry_now = anyio.Event()
                with anyio.move_on_after(self._store_retry.delay(attempt, self._rng)):
                    await self._store_retry_now.wait()
                attempt += 1
                continue
            if self._store_error is not None:
                log.info("room %s: local store writes again", self.room)
                self._store_error = None
            return

    async def _connection_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._retry_now = anyio.Event()
                if self._recover_requested:
                    self._swap_document()
                if self._rejected is None:
                    self._attempt_rejected = False
                    with anyio.CancelScope() as self._attempt_scope:
                        await self._connect_once()
                    self._attempt_scope = None
                if self._recover_requested:
                    continue
                if self._stopping.is_set():
                    return
                if self._rejected is not None:
                    # Once per rejection: a provider whose tokens are refused too must not spin.
                    token = None if self._fresh_refused else await self._fresh_token()
                    if token is not None and token != self._token:
                        log.info("room %s: reconnecting with a fresh token", self.room)
                        self._fresh_refused = True  # until a connection with it syncs
                        self._token_obtained = time.time()
                        self.set_token(token)
                        continue
                    await self._retry_now.wait()  # until set_token() or close
                    continue
                if not self._attempt_rejected:
                    # (A token set meanwhile is for the relay that refused the old one.)
                    self._next_relay()
                delay = self._backoff.delay(self._attempt, self._rng)
                self._attempt += 1
                log.debug("room %s: reconnecting to %s in %.2f s", self.room, self.url, delay)
                with anyio.move_on_after(delay):
                    await self._retry_now.wait()
        finally:
            self._connection_loop_done.set()

    def _next_relay(self) -> None:
        """After a failed or dropped connection: the next relay of the list, round robin."""
        if len(self.urls) > 1:
            self._relay_index = (self._relay_index + 1) % len(self.urls)
            log.info("room %s: moving to relay %s", self.room, self.url)
            self._publish()

    def _swap_document(self) -> None:
        """recover()'s part between two connections: a new, empty document and session."""
        self._recover_requested = False
        old = self.session
        self._pump()  # the old session's last events go to the file before it is emptied
        old.close()
        self.doc = Doc(client_id=random.getrandbits(32))
        self._session = SyncSession(
            self.doc,
            self.awareness,
            next_local_id=old.next_local_id,
            on_change=self._mark_dirty,
        )
        self._denied = None
        self._swapped.set()
        self._publish()

    def _connect_url(self) -> str:
        url = f"{self.url}/{self.room}?token={quote(self._token, safe='')}"
        extensions = [
            name
            for name, wanted in (
                ("ack", self._durable_acks),
                ("refresh", self._token_provider is not None),
            )
            if wanted
        ]
        return url + "&ext=" + ",".join(extensions) if extensions else url

    async def _fresh_token(self) -> str | None:
        """A token from the provider, or None when it has none or fails (logged)."""
        if self._token_provider is None:
            return None
        try:
            token = self._token_provider()
            if inspect.isawaitable(token):
                token = await token
        except Exception:
            log.exception("room %s: the token provider failed", self.room)
            return None
        return token if isinstance(token, str) and token else None

    async def _refresh_loop(self, ws: ClientConnection) -> None:
        """Send a fresh token ahead of each expiry, over the open connection (extension 102)."""
        while True:
            try:
                claims = read_claims_unverified(self._token)
            except TokenError:
                return
            lifetime = max(0.0, claims.exp - self._token_obtained)
            ahead = min(REFRESH_AHEAD, lifetime / 3)
            await anyio.sleep(max(0.0, claims.exp - ahead - time.time()))
            token = await self._fresh_token()
            if token is None or token == self._token:
                await anyio.sleep(max(1.0, ahead / 2))  # ask again, until the relay closes
                continue
            self._offered_token = token
            self._token_answered = anyio.Event()
            try:
                await ws.send(encode_message(encode_token_refresh(token)))
            except ConnectionClosed:
                return
            with anyio.move_on_after(30.0):  # a relay without the extension never answers
                await self._token_answered.wait()

    def _on_refresh_answer(self, payload: bytes) -> None:
        answer = RefreshAnswer.decode(payload)
        if answer.accepted and self._offered_token is not None:
            self._token = self._offered_token
            self._token_obtained = time.time()
            log.info("room %s: token refreshed, valid until %d", self.room, answer.exp)
        else:
            log.warning("room %s: relay refused the token refresh: %s", self.room, answer.reason)
        self._offered_token = None
        self._token_answered.set()

    async def _connect_once(self) -> None:
        """One connection attempt and, if it opens, the connection's whole life.

        Every expected failure is handled inside the task that meets it, so that only bugs
        cross task-group boundaries (and end the replica's task group, reaching the owner).
        """
        session = self.session
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._close_on_stop, tg.cancel_scope)
                ws = await self._open_socket()
                if ws is not None:
                    try:
                        await self._run_connection(ws)
                    finally:
                        with anyio.move_on_after(self._close_timeout, shield=True):
                            await ws.close()
                    self._note_close(ws.close_code, ws.close_reason)
                tg.cancel_scope.cancel()
        finally:
            self._ws = None
            session.disconnect()
            self._pump()

    async def _open_socket(self) -> ClientConnection | None:
        try:
            return await connect(
                self._connect_url(),
                open_timeout=self._open_timeout,
                close_timeout=self._close_timeout,
                max_size=self._max_message_size,
                proxy=None,
            )
        except InvalidStatus as error:
            code = error.response.status_code
            reason = error.response.body.decode("utf-8", "replace").strip() or f"HTTP {code}"
            if code in (400, 401, 403):
                self._reject(reason)
            else:
                log.info("room %s: %s answered HTTP %d: %s", self.room, self.url, code, reason)
        except (OSError, TimeoutError, WebSocketException) as error:
            reason = str(error) or type(error).__name__
            log.info("room %s: cannot connect to %s: %s", self.room, self.url, reason)
        return None

    def _note_close(self, code: int | None, reason: str) -> None:
        if code is not None and code in _REJECTING_CLOSE_CODES:
            self._reject(reason or f"closed with code {code}")
        elif not self._stopping.is_set():
            log.info("room %s: connection to %s closed (%s %s)", self.room, self.url, code, reason)

    def _reject(self, reason: str) -> None:
        log.warning("room %s: relay refused the connection: %s", self.room, reason)
        self._rejected = reason
        self._attempt_rejected = True
        self._report_denied(reason)

    async def _run_connection(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.session.connect()
        self._pump()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._send_loop, ws, tg.cancel_scope)
            tg.start_soon(self._receive_loop, ws, tg.cancel_scope)
            if self._token_provider is not None:
                tg.start_soon(self._refresh_loop, ws)

    async def _receive_loop(self, ws: ClientConnection, connection: anyio.CancelScope) -> None:
        session = self.session
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    raise WireError("the relay sent a text frame")
                for message in decode_frame(frame):
                    if isinstance(message, Extension) and message.type == MESSAGE_TOKEN_REFRESH:
                        self._on_refresh_answer(message.payload)
                        continue
                    session.receive(message)
                self._pump()
        except ConnectionClosed:
            pass
        except (WireError, SyncProtocolError) as error:
            # Nothing of what failed was applied (a sync step 2 is checked before, design
            # §7.1); the status says why, and reconnecting retries with backoff.
            log.warning("room %s: dropping the connection: %s", self.room, error)
            self._remote_error = str(error)
            with anyio.move_on_after(self._close_timeout, shield=True):
                await ws.close(1002, str(error).encode()[:120].decode("utf-8", "ignore"))
        finally:
            self._pump()  # whatever arrived before the error counts
        connection.cancel()

    async def _send_loop(self, ws: ClientConnection, connection: anyio.CancelScope) -> None:
        try:
            while True:
                self._send_wakeup.clear()
                messages = self.session.data_to_send()
                if messages:
                    for frame in _frames(messages):
                        await ws.send(frame)
                    continue
                await self._send_wakeup.wait()
        except ConnectionClosed:
            connection.cancel()

    async def _close_on_stop(self, attempt: anyio.CancelScope) -> None:
        """On close: say goodbye (presence removal) and close cleanly, within close_timeout."""
        await self._stopping.wait()
        ws = self._ws
        if ws is not None:
            with anyio.move_on_after(self._close_timeout, shield=True):
                try:
                    self.session.goodbye()
                    self._pump()
                    for frame in _frames(self.session.data_to_send()):
                        await ws.send(frame)
                    await ws.close()
                except ConnectionClosed:
                    pass
        attempt.cancel()

    # -- bookkeeping ---------------------------------------------------------------------

    def _pump(self) -> None:
        """Move session events to the store queue and the status; wake the sender."""
        session = self._session
        if session is None:
            return
        presence_changed = False
        doc_changed = False
        for event in session.events():
            if isinstance(event, LocalUpdate):
                self._queue_op(AppendLocal(event.local_id, event.update))
                self._snapshot_due.set()
                doc_changed = True
            elif isinstance(event, RemoteUpdate):
                self._queue_op(AppendRemote(event.update))
                self._snapshot_due.set()
                doc_changed = True
            elif isinstance(event, Durable):
                self._queue_op(MarkDurable(event.local_ids))
            elif isinstance(event, Synced):
                self._attempt = 0  # a connection that synced did useful work
                self._fresh_refused = False
                self._remote_error = None
            elif isinstance(event, Denied):
                log.warning("room %s: relay denied: %s", self.room, event.reason)
                self._report_denied(event.reason)
            elif isinstance(event, PresenceChanged):
                presence_changed = True
        if presence_changed or not session.connected:
            self._presence_changes.notify()
        if session.has_data_to_send:  # not for an ack: the sender would wake for nothing
            self._send_wakeup.set()
        self._publish()
        if doc_changed:
            # wait_until's predicate may read the document: re-check it even when the status
            # did not change (without a local file, an update leaves `unsaved` at 0).
            self._status_changes.notify()

    def _queue_op(self, op: StoreOp) -> None:
        if self._ops_send is None:
            return  # no local file (`store_path` None): nothing is ever unsaved
        if isinstance(op, AppendLocal | AppendRemote):
            self._unsaved += 1
        try:
            self._ops_send.send_nowait(op)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # Only after close: the final pump already ran, so this is an edit made after exit.
            log.error("room %s: edit after the replica closed; not saved locally", self.room)
            self._unsaved -= isinstance(op, AppendLocal | AppendRemote)

    def _report_denied(self, reason: str) -> None:
        self._denied = reason
        if self._on_denied is not None:
            try:
                self._on_denied(reason)
            except Exception:
                log.exception("room %s: on_denied callback failed", self.room)
        self._publish()

    def _publish(self) -> None:
        session = self._session
        status = ReplicaStatus(
            connected=session is not None and session.connected,
            synced=session is not None and session.synced,
            pending=0 if session is None else session.pending_count,
            unsaved=self._unsaved,
            denied=self._denied,
            rejected=self._rejected,
            refused=0 if session is None else len(session.refused_ids),
            store_error=self._store_error,
            notice=self._notice,
            remote_error=self._remote_error,
            relay=self.url,
        )
        if status == self._status:
            return
        self._status = status
        self._status_changes.notify()
        for callback in list(self._status_callbacks):
            try:
                callback(status)
            except Exception:
                log.exception("room %s: status callback failed", self.room)


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error


def _approx_size(message: WireMessage) -> int:
    body = getattr(message, "update", None) or getattr(message, "payload", None) or b""
    return len(body) + 8


def _frames(messages: list[WireMessage]) -> list[bytes]:
    """Pack messages into frames of about _FRAME_TARGET bytes, keeping their order."""
    frames: list[bytes] = []
    group: list[WireMessage] = []
    size = 0
    for message in messages:
        length = _approx_size(message)
        if group and size + length > _FRAME_TARGET:
            frames.append(encode_frame(group))
            group, size = [], 0
        group.append(message)
        size += length
    if group:
        frames.append(encode_frame(group))
    return frames


def _message_dicts(doc: Doc) -> list[dict[str, Any]]:
    try:
        # Checked first: a value nested too deeply would overflow the stack (design §7.1).
        raw = array_json(doc.get(MESSAGES, type=Array), MESSAGES)
    except ValueError:
        return []
    return [m for m in raw if isinstance(m, dict)]


def _own_messages(doc: Doc, subject: str | None) -> list[dict[str, Any]]:
    if subject is None:
        return []
    return [m for m in _message_dicts(doc) if m.get("author") == subject]


def _draft_of(doc: Doc, subject: str | None) -> str:
    if subject is None:
        return ""
    value = doc.get(DRAFTS, type=Map).get(subject)
    return str(value) if isinstance(value, Text) else ""
