"""`Replica`: a local-first copy of one conversation document, kept in sync through a relay.

The document lives in memory (`replica.doc`, a plain pycrdt Doc that a `Conversation` may wrap)
and in the replica's own SQLite file, so edits made offline survive a restart. While the relay
is reachable the replica stays connected, resyncing both ways from state vectors on every
(re)connect; when it is not, the replica retries with exponential backoff and full jitter.
Status (connected, synced, pending local updates, all durably stored) is observable and
awaitable; presence travels as y-protocols awareness.

All protocol logic is in `crdtchat.sync.SyncSession`; this module only moves bytes between it,
a websocket and the local store. Runs on the asyncio backend of anyio (the `websockets` library
is asyncio-only). The document must be edited from the event loop's thread.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pycrdt import Awareness, Doc, get_state
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from crdtchat.local_store import (
    DEFAULT_COMPACT_EVERY,
    AppendLocal,
    AppendRemote,
    AsyncLocalStore,
    MarkDurable,
    StoreOp,
)
from crdtchat.schema import ROOM_NAME
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
from crdtchat.wire import WireError, WireMessage, decode_frame, encode_frame

log = logging.getLogger(__name__)

# Close codes by which a relay says "do not come back with these credentials", as y-websocket's
# client treats them. (1008 is not one: the relay uses it for bad input and rate limits, after
# which a reconnect is right; an expired token is then refused at the HTTP upgrade.)
_REJECTING_CLOSE_CODES = range(4400, 4500)
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
class ReplicaStatus:
    """A snapshot of the replica's state; a new one is published on every change."""

    connected: bool = False
    synced: bool = False  # the relay's state has been received on the current connection
    pending: int = 0  # local updates the relay has not acknowledged as durably stored
    unsaved: int = 0  # updates not yet written to the local SQLite file
    denied: str | None = None  # the last reason the relay gave for refusing something
    rejected: str | None = None  # set while reconnecting is suspended (token refused)

    @property
    def durable(self) -> bool:
        """Every local edit is durably stored by the relay (survives a relay crash)."""
        return self.pending == 0


class Replica:
    """One document's replica; use as `async with Replica(...) as replica:`.

    `url` is the relay's base URL (``ws://HOST:PORT``). `doc` may be an existing document
    (e.g. ``conversation.doc``): whatever it already holds is merged with the local file and
    counted as pending. `store_path` None keeps no local file (nothing survives a restart).
    `presence` is our initial awareness state, e.g. ``{"user": sub, "device": "laptop"}``.
    `durable_acks` asks the relay for durable-write acknowledgements; without them `pending`
    never goes down. `on_denied` is called with the relay's reason whenever it refuses
    something; it must not write to the document.
    """

    def __init__(
        self,
        url: str,
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
    ) -> None:
        if not ROOM_NAME.match(room):
            raise ValueError(f"invalid room name {room!r}: 1-128 characters of A-Za-z0-9._-")
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"relay URL must start with ws:// or wss://, not {url!r}")
        self.url = url.rstrip("/")
        self.room = room
        self._token = token
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

        self._status = ReplicaStatus()
        self._status_changes = Changes()
        self._presence_changes = Changes()
        self._status_callbacks: list[Callable[[ReplicaStatus], None]] = []
        self._session: SyncSession | None = None
        self._store: AsyncLocalStore | None = None
        self._ops_send: MemoryObjectSendStream[StoreOp] | None = None
        self._unsaved = 0
        self._denied: str | None = None
        self._rejected: str | None = None
        self._attempt = 0
        self._dirty = anyio.Event()
        self._send_wakeup = anyio.Event()
        self._retry_now = anyio.Event()
        self._stopping = anyio.Event()
        self._exit_stack: AsyncExitStack | None = None
        self._ws: ClientConnection | None = None
        self._connection_loop_done = anyio.Event()
        self._background_scope: anyio.CancelScope | None = None

    # -- public API ----------------------------------------------------------------------

    @property
    def status(self) -> ReplicaStatus:
        """The current status; reflects every edit made so far, even in this same tick."""
        # Local edits only mark the replica dirty (they run inside pycrdt commits); catch up
        # here so that `edit; await wait_until(lambda s: s.durable)` cannot pass too early.
        self._pump()
        return self._status

    @property
    def client_id(self) -> int:
        return self.doc.client_id

    @property
    def session(self) -> SyncSession:
        if self._session is None:
            raise RuntimeError("the replica is not open")
        return self._session

    async def wait_until(
        self, predicate: Callable[[ReplicaStatus], bool], *, timeout: float | None = None
    ) -> ReplicaStatus:
        """Wait until `predicate(status)` holds, e.g. ``lambda s: s.durable``."""
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
        """Skip the current backoff wait."""
        self._retry_now.set()

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
            state = await self._store.load()
            stored, pending, next_local_id = state.update, state.pending, state.next_local_id
        had_content = self.doc.get_state() != b"\x00"
        if stored:
            # Before the session observes the document: this is not a new local edit.
            self.doc.apply_update(stored)
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

        ops_send, ops_receive = anyio.create_memory_object_stream[StoreOp](math.inf)
        self._ops_send = ops_send
        task_group = await stack.enter_async_context(anyio.create_task_group())
        # Exit order (reverse of registration): stop the connection and background tasks,
        # then let the store writer drain everything queued, then the task group ends.
        stack.push_async_callback(self._close_store_queue)
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
        if self._ops_send is not None:
            await self._ops_send.aclose()

    # -- tasks ---------------------------------------------------------------------------

    async def _background(self) -> None:
        """Awareness renewal/expiry, and moving session events out of document commits."""
        assert self._background_scope is not None
        with self._background_scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.awareness.start)
                while True:
                    await self._dirty.wait()
                    self._dirty = anyio.Event()
                    self._pump()

    def _mark_dirty(self) -> None:
        # Called inside pycrdt commits: only schedule, never do the work here.
        self._dirty.set()

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
                    await self._store.write(batch)
                self._unsaved -= sum(isinstance(op, AppendLocal | AppendRemote) for op in batch)
                self._publish()

    async def _connection_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._retry_now = anyio.Event()
                if self._rejected is None:
                    await self._connect_once()
                if self._stopping.is_set():
                    return
                if self._rejected is not None:
                    await self._retry_now.wait()  # until set_token() or close
                    continue
                delay = self._backoff.delay(self._attempt, self._rng)
                self._attempt += 1
                log.debug("room %s: reconnecting in %.2f s", self.room, delay)
                with anyio.move_on_after(delay):
                    await self._retry_now.wait()
        finally:
            self._connection_loop_done.set()

    def _connect_url(self) -> str:
        url = f"{self.url}/{self.room}?token={quote(self._token, safe='')}"
        return url + "&ext=ack" if self._durable_acks else url

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
                log.info("room %s: relay answered HTTP %d: %s", self.room, code, reason)
        except (OSError, TimeoutError, WebSocketException) as error:
            log.info("room %s: cannot connect: %s", self.room, error or type(error).__name__)
        return None

    def _note_close(self, code: int | None, reason: str) -> None:
        if code is not None and code in _REJECTING_CLOSE_CODES:
            self._reject(reason or f"closed with code {code}")
        elif not self._stopping.is_set():
            log.info("room %s: connection closed (%s %s)", self.room, code, reason)

    def _reject(self, reason: str) -> None:
        log.warning("room %s: relay refused the connection: %s", self.room, reason)
        self._rejected = reason
        self._report_denied(reason)

    async def _run_connection(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.session.connect()
        self._pump()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._send_loop, ws, tg.cancel_scope)
            tg.start_soon(self._receive_loop, ws, tg.cancel_scope)

    async def _receive_loop(self, ws: ClientConnection, connection: anyio.CancelScope) -> None:
        session = self.session
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    raise WireError("the relay sent a text frame")
                for message in decode_frame(frame):
                    session.receive(message)
                self._pump()
        except ConnectionClosed:
            pass
        except (WireError, SyncProtocolError) as error:
            log.warning("room %s: dropping the connection: %s", self.room, error)
            with anyio.move_on_after(self._close_timeout, shield=True):
                await ws.close(1002, str(error).encode()[:120].decode("utf-8", "ignore"))
        finally:
            self._pump()  # whatever arrived before the error counts
        connection.cancel()

    async def _send_loop(self, ws: ClientConnection, connection: anyio.CancelScope) -> None:
        try:
            while True:
                self._send_wakeup = anyio.Event()
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
        for event in session.events():
            if isinstance(event, LocalUpdate):
                self._queue_op(AppendLocal(event.local_id, event.update))
            elif isinstance(event, RemoteUpdate):
                self._queue_op(AppendRemote(event.update))
            elif isinstance(event, Durable):
                self._queue_op(MarkDurable(event.local_ids))
            elif isinstance(event, Synced):
                self._attempt = 0  # a connection that synced did useful work
            elif isinstance(event, Denied):
                log.warning("room %s: relay denied: %s", self.room, event.reason)
                self._report_denied(event.reason)
            elif isinstance(event, PresenceChanged):
                presence_changed = True
        if presence_changed or not session.connected:
            self._presence_changes.notify()
        self._send_wakeup.set()
        self._publish()

    def _queue_op(self, op: StoreOp) -> None:
        if isinstance(op, AppendLocal | AppendRemote):
            self._unsaved += 1
        assert self._ops_send is not None
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
