"""Test support for the relay: the relay as a real subprocess, and a small raw protocol client.

`RelayProcess` is the one relay launcher (`crdtchat.stack.RelaySubprocess`) with the tests'
secret: `python -m crdtchat.relay.main` (or the real `crdtchat serve`) on a free port in a
temporary data directory, SIGKILLed, SIGTERMed and restarted on the same port and data.
`RawClient` is a websocket shell over the real client core (`crdtchat.sync.SyncSession`) that can
also send any messages or bytes as they are, recording every AuthDenied, Ack and awareness
message, so tests can wait for conditions instead of sleeping.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from pycrdt import Array, Doc, Map, Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from crdtchat import schema
from crdtchat.stack import RelaySubprocess
from crdtchat.sync import Denied, SyncSession
from crdtchat.tokens import mint_token
from crdtchat.wire import (
    Ack,
    AwarenessEntry,
    AwarenessMessage,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    WireError,
    WireMessage,
    decode_awareness,
    decode_frame,
    encode_awareness,
    encode_frame,
    encode_message,
)
from tests.support import REPO

SECRET = "test-secret-for-the-relay-32-bytes-long"


def token(room: str, role: str = "writer", sub: str = "alice", ttl: float = 3600) -> str:
    return mint_token(SECRET, room, role, sub, ttl)


def identity_token(sub: str, ttl: float = 3600) -> str:
    """A person's token (no room, no role): membership gives the role (design §4)."""
    return mint_token(SECRET, None, None, sub, ttl)


class RelayProcess(RelaySubprocess):
    """`crdtchat.stack.RelaySubprocess` with the tests' secret, run from the checkout, plus
    `url()` for a room's websocket with a token."""

    def __init__(
        self,
        data: Path,
        extra_args: Sequence[str] = (),
        *,
        use_cli: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(data, SECRET, extra_args, use_cli=use_cli, env=env, cwd=REPO)

    def url(self, room: str, tok: str, *, ack: bool = False) -> str:
        suffix = "&ext=ack" if ack else ""
        return f"{self.ws_base}/{room}?token={tok}{suffix}"


@contextmanager
def running_relay(
    data: Path, extra_args: Sequence[str] = (), **kwargs: Any
) -> Iterator[RelayProcess]:
    relay = RelayProcess(data, extra_args, **kwargs).start()
    try:
        yield relay
    finally:
        relay.stop()


async def upgrade_status(relay: RelayProcess, room: str, tok: str) -> tuple[int, str]:
    """The HTTP status and body a websocket upgrade with `tok` gets (101: accepted)."""
    try:
        async with connect(relay.url(room, tok), open_timeout=30) as ws:
            await ws.close()
            return 101, ""
    except InvalidStatus as error:
        return error.response.status_code, error.response.body.decode().strip()


def metric(relay: RelayProcess, name: str) -> float:
    """One unlabelled value of the relay's /metrics; AssertionError if it is not there."""
    text = httpx.get(f"{relay.http_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


def declare_roots(doc: Doc) -> dict[str, Array | Map]:
    return {
        name: doc.get(name, type=Array if name == schema.MESSAGES else Map)
        for name in schema.ALL_ROOTS
    }


def message_map(msg_id: str, role: str, author: str, text: str, parent: str | None = None) -> Map:
    return Map(
        {
            "id": msg_id,
            "role": role,
            "author": author,
            "parent": parent,
            "created_at": 0.0,
            "content": Text(text),
        }
    )


def freezing_message_update(msg_id: str, author: str) -> bytes:
    """A message append whose `content` is an Array holding an astral string.

    Yjs never writes that shape (strings live in a Text); pycrdt 0.14 integrates it and then
    loops forever when the message is read. Made by writing a Text and flipping its type
    reference (Text = 2) to Array (0) in the encoded update.
    """
    doc: Doc = Doc()
    declare_roots(doc)[schema.MESSAGES].append(message_map(msg_id, "user", author, "😀"))
    update = doc.get_update()
    marker = b"\x07content\x02"
    at = update.index(marker) + len(marker) - 1
    return update[:at] + b"\x00" + update[at + 1 :]


class RawClient:
    """A y-websocket client for protocol tests: a websocket shell over the real client core.

    Everything protocol-like is `crdtchat.sync.SyncSession`'s: answering the relay's step 1,
    applying its updates (early ones held), counting what we send against its Acks. Changes
    made to `doc` (`push`, or directly) go out as a real client sends them. For hostile tests,
    `send` and `send_raw` put any messages or bytes on the wire as they are; the session
    counts the updates among them (`SyncSession.sent_as_is`), so Acks stay in step. Records
    every message received, Ack, refusal and awareness state, so tests wait for conditions.
    """

    def __init__(self, ws: ClientConnection, doc: Doc | None = None) -> None:
        self.ws = ws
        self.doc: Doc = Doc() if doc is None else doc
        self.roots = declare_roots(self.doc)
        self.session = SyncSession(self.doc)
        self.multi_message_frames = 0  # frames from the relay holding more than one message
        self.sent_log: list[bytes] = []  # payloads of our SyncStep2/SyncUpdate, in order
        self.received: list[WireMessage] = []
        self.denied: list[str] = []
        self.acks: list[int] = []
        self.awareness: dict[int, tuple[int, str]] = {}  # client id -> (clock, state JSON)
        self.closed = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._changed = anyio.Event()

    @property
    def messages(self) -> Array:
        return self.roots[schema.MESSAGES]  # type: ignore[return-value]

    @property
    def synced(self) -> bool:
        """Got the relay's sync step 2."""
        return self.session.synced

    @property
    def sent_updates(self) -> int:
        """SyncStep2/SyncUpdate messages sent, ours and as-is ones."""
        return self.session.sent

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                if self.closed:
                    raise AssertionError(
                        f"connection closed while waiting: {self.close_code} {self.close_reason}"
                    )
                await self._changed.wait()

    def _start(self, *, hello: bool) -> None:
        """The connection is open: the session starts. Without `hello` its step 1 is not
        sent (a client that has said nothing yet; `hello` or `send` says it later)."""
        self.session.connect()
        if not hello:
            self.session.data_to_send()

    async def _receive(self) -> None:
        try:
            async for frame in self.ws:
                assert isinstance(frame, bytes), "the relay sends binary frames"
                decoded = decode_frame(frame)
                self.multi_message_frames += len(decoded) > 1
                for message in decoded:
                    self.received.append(message)
                    self._record(message)
                    self.session.receive(message)
                self.denied += [e.reason for e in self.session.events() if isinstance(e, Denied)]
                await self.flush()
                self._notify()
        except ConnectionClosed:
            pass
        self.closed = True
        self.close_code = self.ws.close_code
        self.close_reason = self.ws.close_reason
        self._notify()

    def _record(self, message: WireMessage) -> None:
        if isinstance(message, Ack):
            self.acks.append(message.seq)
        elif isinstance(message, AwarenessMessage):
            for entry in decode_awareness(message.payload):
                self.awareness[entry.client_id] = (entry.clock, entry.state)

    def _log_sent(self, messages: Sequence[WireMessage]) -> None:
        self.sent_log += [m.update for m in messages if isinstance(m, SyncStep2 | SyncUpdate)]

    async def flush(self) -> None:
        """Send what the session has to send (our step 2, local changes)."""
        if self.closed:
            return
        messages = self.session.data_to_send()
        if messages:
            self._log_sent(messages)
            await self.ws.send(encode_frame(messages))

    async def send(self, *messages: WireMessage) -> None:
        """Send `messages` as they are, in one frame."""
        self.session.sent_as_is(messages)
        self._log_sent(messages)
        await self.ws.send(encode_frame(messages))

    async def send_raw(self, frame: bytes | str) -> None:
        """Send `frame` as it is; the updates in it, if it decodes, are counted."""
        if isinstance(frame, bytes):
            try:
                messages = decode_frame(frame)
            except WireError:
                messages = []
            self.session.sent_as_is(messages)
            self._log_sent(messages)
        await self.ws.send(frame)

    async def hello(self) -> None:
        """Sync step 1 as a y-websocket client sends it on connect; waits for step 2."""
        await self.send(SyncStep1(self.doc.get_state()))
        await self.wait_for(lambda: self.synced)

    async def push(self, change: Callable[[Doc], None]) -> bytes:
        """Make a local change and send it (one update, once synced); returns the update."""
        before = self.doc.get_state()
        with self.doc.transaction():
            change(self.doc)
        await self.flush()
        return self.doc.get_update(before)

    async def set_presence(self, client_id: int, clock: int, state: Any) -> None:
        entry = AwarenessEntry(client_id, clock, json.dumps(state))
        await self.send(AwarenessMessage(encode_awareness([entry])))

    async def wait_closed(self, timeout: float = 10.0) -> tuple[int | None, str | None]:
        with anyio.fail_after(timeout):
            while not self.closed:
                await self._changed.wait()
        return self.close_code, self.close_reason

    async def wait_acked(self, count: int | None = None, timeout: float = 10.0) -> None:
        target = self.sent_updates if count is None else count
        await self.wait_for(lambda: bool(self.acks) and self.acks[-1] >= target, timeout)

    def texts(self) -> list[str]:
        return [str(m["content"]) for m in self.messages]


@asynccontextmanager
async def raw_client(
    url: str, *, hello: bool = True, doc: Doc | None = None
) -> AsyncIterator[RawClient]:
    async with connect(url, max_size=None, compression=None) as ws:
        client = RawClient(ws, doc)
        client._start(hello=hello)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client._receive)
                if hello:
                    await client.flush()
                    await client.wait_for(lambda: client.synced)
                try:
                    yield client
                finally:
                    await ws.close()
                    tg.cancel_scope.cancel()
        finally:
            client.session.close()


def sync_step1_frame(doc: Doc) -> bytes:
    return encode_message(SyncStep1(doc.get_state()))
