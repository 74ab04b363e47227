"""Shared pieces of the relay benchmarks: servers as subprocesses, a light client, CPU time.

Benchmarks never import from tests/, so the few helpers they need live here. Everything talks to
127.0.0.1 only, every wait has a deadline, and every subprocess is stopped by the context
manager that started it.

`LightClient` is a websocket client made of the `websockets` sans-I/O protocol under a plain
asyncio.Protocol: no task per connection and no queue, so one Python process can hold hundreds
of observers and stamp each frame with the time its bytes arrived, which is what a fan-out
latency needs (a task-per-connection client measures its own scheduling delay as much as the
server's). It carries bytes only: no sync logic.

`SessionClient` is the one full client of the benchmarks: a websocket shell over the real client
core (`crdtchat.sync.SyncSession`), so no benchmark carries its own copy of the sync exchange.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from pycrdt import Doc
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from crdtchat.document import Conversation
from crdtchat.stack import RelaySubprocess, stop_process, wait_until_listening
from crdtchat.sync import Denied, SyncSession
from crdtchat.wire import WireMessage, decode_frame, encode_frame

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_SERVER = NODE_DIR / "node_modules" / "y-websocket" / "bin" / "server.cjs"
SECRET = "benchmark-secret-for-the-relay-32-bytes"
_NODE_LISTENING = re.compile(r"running at '([^']+)' on port (\d+)")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def long_chat(count: int) -> bytes:
    """A chain of `count` user messages of a chat line's length, as one update: the long
    conversation that the open benchmarks (browser_open.py, relay_cold_open.py) load."""
    conversation = Conversation.create(author="alice", title="long")
    with conversation.doc.transaction():
        for n in range(count):
            conversation.append("user", f"message {n}: " + "some words of a chat line " * 3)
    return conversation.encode_state()


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock for every process on the machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads included (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid` in KiB (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def parse_metrics(text: str) -> dict[str, float]:
    """The relay's unlabelled /metrics values by name, without the `crdtchat_` prefix."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name.removeprefix("crdtchat_")] = float(value)
    return values


@dataclass
class Server:
    """A server subprocess and the ws:// base URL it listens on."""

    name: str
    proc: subprocess.Popen[str]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextmanager
def _running(
    name: str,
    command: list[str],
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    pattern: re.Pattern[str],
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    try:
        try:
            port = wait_until_listening(proc, 60.0, pattern)
        except RuntimeError as error:
            raise RuntimeError(f"{name}: {error}; log:\n{log_path.read_text()}") from None
        yield proc, port
    finally:
        stop_process(proc, 30)


@contextmanager
def running_relay(
    data: Path, extra_args: list[str] | None = None, src: Path = REPO
) -> Iterator[Server]:
    """Our relay, `python -m crdtchat.relay.main --port 0 --data DIR`, on 127.0.0.1, through the
    one launcher (`crdtchat.stack.RelaySubprocess`).

    `src` is the source tree it runs from: another checkout runs an earlier relay side by side.
    """
    relay = RelaySubprocess(
        data,
        SECRET,
        extra_args or (),
        env={"PYTHONPATH": str(src)},
        cwd=src,
        log_path=data.parent / "relay.log",
    )
    relay.start(60.0)
    assert relay.proc is not None
    try:
        yield Server("crdtchat relay", relay.proc, relay.ws_base, relay.log_path)
    finally:
        relay.stop()


def ensure_node_server() -> None:
    """Install benchmarks/node from its lockfile (y-websocket 2.x) unless it is there."""
    if NODE_SERVER.exists():
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_DIR,
        check=True,
        timeout=300,
    )
    if not NODE_SERVER.exists():
        raise RuntimeError(f"npm ci did not install {NODE_SERVER}")


@contextmanager
def running_node_server(log_dir: Path) -> Iterator[Server]:
    """The node y-websocket server (`npx y-websocket` runs this same bin/server.cjs; running
    node on it directly makes the measured pid the server itself, not npx's wrapper).
    No persistence (YPERSISTENCE unset): it keeps every document in memory."""
    ensure_node_server()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("YPERSISTENCE", "GC")}
    env.update(HOST="127.0.0.1", PORT=str(port))
    log_path = log_dir / "node-server.log"
    command = ["node", str(NODE_SERVER)]
    with _running("node y-websocket", command, env, NODE_DIR, log_path, _NODE_LISTENING) as (
        proc,
        listening,
    ):
        yield Server("node y-websocket 2", proc, f"ws://127.0.0.1:{listening}", log_path)


class LightClient(asyncio.Protocol):
    """One websocket connection driven by websockets' sans-I/O ClientProtocol.

    `on_frame(client, payload, arrived_ns)` runs for every binary message, inside
    data_received, with the time the bytes that completed it were read.
    """

    def __init__(self, url: str, on_frame: Callable[[LightClient, bytes, int], None]) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.bytes_in = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        arrived = now_ns()
        self.bytes_in += len(data)
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if self.protocol.handshake_exc is not None:
                    if not self.opened.done():
                        self.opened.set_exception(self.protocol.handshake_exc)
                elif not self.opened.done():
                    self.opened.set_result(None)
            elif isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                if not event.fin:
                    raise RuntimeError("fragmented frames are not expected from these servers")
                self.on_frame(self, event.data, arrived)
        self._flush()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("connection lost during handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, payload: bytes) -> None:
        self.protocol.send_binary(payload)
        self._flush()

    def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.protocol.send_close(1000)
            self._flush()
        finally:
            self.transport.close()

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                self.transport.write_eof()


async def open_light_client(
    url: str, on_frame: Callable[[LightClient, bytes, int], None], timeout: float = 30.0
) -> LightClient:
    loop = asyncio.get_running_loop()
    parsed = parse_uri(url)
    async with asyncio.timeout(timeout):
        _, client = await loop.create_connection(
            lambda: LightClient(url, on_frame), parsed.host, parsed.port
        )
        await client.opened
    return client


def ws_frame_overhead(payload_len: int, masked: bool) -> int:
    """Bytes a websocket frame header adds (RFC 6455 §5.2); clients mask, servers do not."""
    size = 2 + (4 if masked else 0)
    if payload_len >= 65536:
        size += 8
    elif payload_len >= 126:
        size += 2
    return size


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


class SessionClient:
    """A y-websocket client over `SyncSession`: the session answers the relay's step 1, applies
    what arrives and counts what we send against the relay's Acks; this class only moves its
    bytes. It counts websocket bytes both ways (frame headers included; client frames are
    masked), collects refusals, and times the relay's step 2 (its arrival, and the
    `SyncSession.receive` that applies it), which a join benchmark reports."""

    def __init__(self, ws: ClientConnection, doc: Doc) -> None:
        self.ws = ws
        self.doc = doc
        self.session = SyncSession(doc)
        self.opened_ns = now_ns()  # the websocket handshake is done
        self.bytes_out = 0
        self.bytes_in = 0
        self.denied: list[str] = []
        self.closed = False
        self.step2_arrived_ns = 0  # when the frame with the relay's step 2 was read
        self.step2_apply_ns = 0  # time spent applying it (SyncSession.receive)
        self.step2_update = b""
        self.ack_arrived_ns = 0  # when the frame that last advanced `acked` was read
        self._changed = anyio.Event()

    @property
    def sent_updates(self) -> int:
        """SyncStep2/SyncUpdate messages sent on this connection (the Ack sequence)."""
        return self.session.sent

    @property
    def acked(self) -> int:
        return self.session.acked

    async def run(self) -> None:
        """Feed every frame to the session and send what it answers, until the socket closes."""
        try:
            async for frame in self.ws:
                arrived = now_ns()
                assert isinstance(frame, bytes), "the relay sends binary frames"
                self.bytes_in += len(frame) + ws_frame_overhead(len(frame), masked=False)
                for message in decode_frame(frame):
                    self._receive(message, arrived)
                await self.flush()
                self._changed.set()
                self._changed = anyio.Event()
        except ConnectionClosed:
            pass
        self.closed = True
        self._changed.set()

    def _receive(self, message: WireMessage, arrived: int) -> None:
        if self.session.synced:
            acked = self.session.acked
            self.session.receive(message)
            if self.session.acked != acked:
                self.ack_arrived_ns = arrived
            return
        start = now_ns()
        self.session.receive(message)
        if self.session.synced:  # this was the relay's step 2
            self.step2_apply_ns = now_ns() - start
            self.step2_arrived_ns = arrived
            self.step2_update = getattr(message, "update", b"")

    async def flush(self) -> int:
        """Send what the session has to send, in one frame; returns its bytes on the wire."""
        messages = self.session.data_to_send()
        self.denied += [e.reason for e in self.session.events() if isinstance(e, Denied)]
        if not messages or self.closed:
            return 0
        return await self._send_frame(encode_frame(messages))

    async def send(self, *messages: WireMessage) -> int:
        """Send `messages` as they are (e.g. a prepared update), counted against the Acks."""
        self.session.sent_as_is(messages)
        return await self._send_frame(encode_frame(list(messages)))

    async def push(self, change: Callable[[], object]) -> int:
        """Make a local change and send it now; returns the frame's bytes on the wire."""
        change()
        return await self.flush()

    async def _send_frame(self, frame: bytes) -> int:
        size = len(frame) + ws_frame_overhead(len(frame), masked=True)
        self.bytes_out += size
        await self.ws.send(frame)
        return size

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                if self.closed:
                    raise RuntimeError("the connection closed while waiting")
                await self._changed.wait()


@asynccontextmanager
async def session_client(
    url: str, doc: Doc, *, timeout: float = 30.0
) -> AsyncIterator[SessionClient]:
    """A connected `SessionClient` that has the relay's state (its step 2 applied)."""
    async with connect(url, max_size=None, compression=None, open_timeout=timeout) as ws:
        client = SessionClient(ws, doc)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            client.session.connect()
            await client.flush()
            try:
                await client.wait_for(lambda: client.session.synced, timeout)
                yield client
            finally:
                await ws.close()
                tg.cancel_scope.cancel()
                client.session.close()


async def write_acked(
    url: str, doc: Doc, change: Callable[[], object], timeout: float = 60.0
) -> None:
    """Connect with `doc` (the URL asks for ext=ack), make `change` and return once the relay
    has stored it; RuntimeError if the relay refuses it."""
    async with session_client(url, doc, timeout=timeout) as client:
        change()
        await client.flush()
        target = client.sent_updates
        await client.wait_for(lambda: client.acked >= target or bool(client.denied), timeout)
        if client.denied:
            raise RuntimeError(f"the relay refused the write: {client.denied}")
