"""Relay benchmark, side by side with the node y-websocket server (issue 3), in one run.

1. Fan-out: one writer appends chat messages at a fixed rate to a room watched by 100 and by 500
   observers. Latency runs from the writer's send to each observer's receipt (CLOCK_MONOTONIC,
   shared by all processes); server CPU per delivered update is the server process's user+system
   time (all threads, /proc/<pid>/stat) over the phase divided by the updates observers got.
   Observers are light: sans-I/O websocket clients in a few processes, which find the writer's
   `fanout#<seq>#` marker in the frame bytes instead of applying updates.
2. Join: a new device connects to a 10,000-message conversation, sends sync step 1, receives
   step 2 and applies it to a pycrdt Doc.
3. Bytes per turn: 500 turns (a user message, then a worker's lease, streamed text and committed
   reply) through our relay, counted on the user's connection, against a stateless client that
   resends the whole history as an OpenAI-style JSON message list every turn.

Run: .venv/bin/python benchmarks/fanout.py [--quick] [--json results.json]
(`--observe` is the observer subprocess's entry point, started by the benchmark itself.)

Before/after a relay change: `--old-src DIR` (a checkout of the earlier relay, e.g. `git worktree
add /tmp/old REV`) runs only the fan-out, this tree's relay against that one, alternating which
goes first, `--runs` times each with `--observers` observers, each run on a fresh relay, and
prints every run and the medians of new/old.

A cluster (issue 13): `--nats` runs only the fan-out, with `--observers` observers spread over
`--nodes` relay nodes (default 2) on one NATS server, side by side with our single relay and
the node server, alternated over `--runs` passes (default 2; `--updates`, default 150):
latency, relay CPU per delivery summed over the nodes, NATS CPU per delivery,
publish-to-acknowledgement latency (benchmarks/_fanout_cluster.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import anyio.to_thread
import httpx
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from pycrdt import Array, Map, Text

from benchmarks._support import (
    REPO,
    SECRET,
    LightClient,
    Server,
    SessionClient,
    cpu_seconds,
    now_ns,
    open_light_client,
    parse_metrics,
    percentile,
    running_node_server,
    running_relay,
    session_client,
)
from crdtchat import schema
from crdtchat.document import Conversation, new_doc
from crdtchat.relay.store import Store
from crdtchat.schema import ModelRef, assistant_turn_id
from crdtchat.tokens import mint_token
from crdtchat.wire import (
    SyncStep1,
    SyncUpdate,
    encode_message,
)

MARKER = b"fanout#"
STEP1_EMPTY = encode_message(SyncStep1(b"\x00"))
MODEL = ModelRef(provider="local", api="local", model="bench")
_TEXT = (
    "the relay keeps every replica of a conversation in sync while the model streams its "
    "answer and people read edit and reply from several devices at once"
)
WORDS = _TEXT.split()
LINE_LIMIT = 256 * 1024 * 1024


def words(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def token(room: str, role: str, sub: str) -> str:
    return mint_token(SECRET, room, role, sub, 3600)


# -- the observer subprocess -------------------------------------------------------------


async def observe(url: str, clients: int, last: int) -> None:
    """Hold `clients` connections; print "ready" when all are synced, "done" when all saw
    update `last`, and the receipts as one JSON line once told "stop" on stdin.

    These observers are load, not clients: hundreds per process, and the measured side is the
    server. So no SyncSession here: each sends a constant step 1 of an empty document and
    stamps the frames that arrive; it neither answers the server's step 1 (an empty document
    has nothing to send; neither server waits for it) nor applies anything."""
    synced: set[LightClient] = set()
    finished: set[LightClient] = set()
    receipts: list[int] = []  # seq, arrival ns, seq, arrival ns, ...
    all_synced = anyio.Event()
    all_done = anyio.Event()

    def on_frame(client: LightClient, data: bytes, arrived: int) -> None:
        if len(data) < 2 or data[0] != 0 or data[1] == 0:
            return  # awareness, auth, the server's step 1 (we hold nothing to answer with)
        if data[1] == 1 and client not in synced:
            synced.add(client)
            if len(synced) == clients:
                all_synced.set()
        start = data.find(MARKER)
        if start < 0:
            return
        start += len(MARKER)
        seq = int(data[start : data.index(b"#", start)])
        receipts.append(seq)
        receipts.append(arrived)
        if seq == last:
            finished.add(client)
            if len(finished) == clients:
                all_done.set()

    opened: list[LightClient] = []
    limiter = anyio.CapacityLimiter(16)

    async def open_one() -> None:
        async with limiter:
            client = await open_light_client(url, on_frame)
            opened.append(client)
            client.send(STEP1_EMPTY)

    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for _ in range(clients):
                    tg.start_soon(open_one)
            await all_synced.wait()
        _say("ready")
        async with anyio.create_task_group() as tg:

            async def report_done() -> None:
                await all_done.wait()
                _say("done")

            tg.start_soon(report_done)
            with anyio.fail_after(900):
                line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            tg.cancel_scope.cancel()
        if line.strip() == "stop":
            result = {
                "clients": len(opened),
                "receipts": receipts,
                "bytes_in": sum(c.bytes_in for c in opened),
            }
            _say(json.dumps(result, separators=(",", ":")))
    finally:
        for client in opened:
            client.close()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- a full client: benchmarks._support.SessionClient over the real SyncSession -----------


@asynccontextmanager
async def peer(url: str, author: str) -> AsyncIterator[tuple[SessionClient, Conversation]]:
    """A synced client holding a Conversation of `author` (the relay's state applied)."""
    conversation = Conversation(author=author)
    async with session_client(url, conversation.doc) as client:
        yield client, conversation


# -- 1. fan-out ---------------------------------------------------------------------------


@dataclass
class FanoutResult:
    server: str
    observers: int
    updates: int
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    deliveries: int
    expected: int
    cpu_s: float
    store_ms: float | None = None  # our relay: mean time from queueing an update to its commit

    @property
    def cpu_us_per_delivery(self) -> float:
        return self.cpu_s / max(self.deliveries, 1) * 1e6


async def _read_line(stream: BufferedByteReceiveStream) -> str:
    return (await stream.receive_until(b"\n", LINE_LIMIT)).decode()


M = TypeVar("M")  # what `observe_writes` measures around the writes


@dataclass
class Observed:
    """What the observer processes saw of a writer's paced updates."""

    latencies_ms: list[float]  # sorted, from the writer's send to each arrival, after warm-up
    deliveries: int


async def observe_writes(
    observers: list[tuple[str, int]],
    writer_url: str,
    updates: int,
    rate: float,
    warmup: int,
    seed: int,
    measure: Callable[[], Awaitable[M]],
) -> tuple[Observed, M, M]:
    """Start one observer process per `(url, clients)`, write `updates` messages at `rate`
    from one writer, and collect every observer's receipts: the fan-out measurement that our
    relay, the node server and the cluster comparison (`_fanout_cluster.py`) share. `measure`
    runs just before the first write and once every observer is done; both readings return."""
    rng = random.Random(seed)
    processes: list[Process] = []
    lines: list[BufferedByteReceiveStream] = []
    try:
        for url, clients in observers:
            process = await anyio.open_process(
                [
                    *(sys.executable, __file__, "--observe", url),
                    *("--clients", str(clients), "--last", str(updates - 1)),
                ],
                stderr=None,
            )
            processes.append(process)
            assert process.stdout is not None
            lines.append(BufferedByteReceiveStream(process.stdout))
        with anyio.fail_after(180):
            for stream in lines:
                if (await _read_line(stream)).strip() != "ready":
                    raise RuntimeError("an observer process did not get ready")
        sent: dict[int, int] = {}
        async with peer(writer_url, "alice") as (writer, conversation):
            before = await measure()
            start = now_ns()
            for seq in range(updates):
                wait = (start + seq * 1e9 / rate - now_ns()) / 1e9
                if wait > 0:
                    await anyio.sleep(wait)
                text = f"fanout#{seq}# " + words(rng, rng.randint(80, 300))
                conversation.append("user", text)  # queued in the session, sent by flush
                sent[seq] = now_ns()
                await writer.flush()
            with anyio.move_on_after(60):
                for stream in lines:
                    while (await _read_line(stream)).strip() != "done":
                        pass
            after = await measure()
            if writer.denied:
                raise RuntimeError(f"writer refused: {writer.denied}")
        latencies: list[float] = []
        deliveries = 0
        for process, stream in zip(processes, lines, strict=True):
            assert process.stdin is not None
            await process.stdin.send(b"stop\n")
            with anyio.fail_after(60):
                line = await _read_line(stream)
                while not line.startswith("{"):
                    line = await _read_line(stream)
            receipts = json.loads(line)["receipts"]
            for index in range(0, len(receipts), 2):
                seq, arrived = receipts[index], receipts[index + 1]
                deliveries += 1
                if seq >= warmup:
                    latencies.append((arrived - sent[seq]) / 1e6)
        latencies.sort()
    finally:
        for process in processes:
            with anyio.move_on_after(30, shield=True):
                if process.returncode is None:
                    if process.stdin is not None:
                        await process.stdin.aclose()
                    await process.wait()
            if process.returncode is None:
                process.kill()
            await process.aclose()
    return Observed(latencies, deliveries), before, after


async def fanout(
    server: Server, observers: int, procs: int, updates: int, rate: float, warmup: int
) -> FanoutResult:
    room = f"fanout-{observers}"
    observer_url = f"{server.url}/{room}?token={token(room, 'reader', 'observer')}"
    writer_url = f"{server.url}/{room}?token={token(room, 'writer', 'alice')}"
    shares = [observers // procs + (i < observers % procs) for i in range(procs)]

    async def measure() -> tuple[dict[str, float], float]:
        return await relay_metrics(server), server.cpu()

    observed, before, after = await observe_writes(
        [(observer_url, share) for share in shares],
        writer_url,
        updates,
        rate,
        warmup,
        observers,
        measure,
    )
    (metrics_before, cpu_before), (metrics_after, cpu_after) = before, after
    latencies = observed.latencies_ms
    store_ms = None
    if metrics_before and metrics_after:
        count = (
            metrics_after["store_write_seconds_count"] - metrics_before["store_write_seconds_count"]
        )
        total = metrics_after["store_write_seconds_sum"] - metrics_before["store_write_seconds_sum"]
        store_ms = total / count * 1e3 if count else None
    return FanoutResult(
        server=server.name,
        observers=observers,
        updates=updates,
        rate=rate,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1] if latencies else float("nan"),
        deliveries=observed.deliveries,
        expected=observers * updates,
        cpu_s=cpu_after - cpu_before,
        store_ms=store_ms,
    )


async def relay_metrics(server: Server) -> dict[str, float]:
    """Our relay's /metrics as name -> value (empty for the node server, which has none)."""
    if not server.name.startswith("crdtchat"):
        return {}
    http_url = server.url.replace("ws://", "http://") + "/metrics"
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(http_url)
    return parse_metrics(response.text)


# -- 2. join ------------------------------------------------------------------------------


def conversation_state(messages: int, seed: int = 7) -> bytes:
    """A conversation of `messages` alternating user and assistant messages, as one update.

    Built by one client in transactions of 100 messages (seconds instead of minutes); its
    encoding is within 0.1% of the same messages written turn by turn by two clients.
    """
    rng = random.Random(seed)
    doc = new_doc()
    array = doc.get(schema.MESSAGES, type=Array)
    for name in schema.ALL_ROOTS:
        if name != schema.MESSAGES:
            doc.get(name, type=Map)
    parent: str | None = None
    batch: list[Map] = []
    for index in range(messages):
        user = index % 2 == 0
        fields: dict[str, Any] = {
            "id": f"m{index}",
            "role": "user" if user else "assistant",
            "author": "alice" if user else "worker",
            "parent": parent,
            "created_at": 1.7e9 + index,
            "content": Text(words(rng, rng.randint(50, 300) if user else rng.randint(200, 1200))),
        }
        if not user:
            fields["model"] = MODEL.model_dump()
            fields["status"] = "complete"
        batch.append(Map(fields))
        parent = f"m{index}"
        if len(batch) == 100 or index == messages - 1:
            with doc.transaction():
                array.extend(batch)
            batch = []
    return doc.get_update()


async def seed_relay_store(data: Path, room: str, state: bytes) -> None:
    """Write the room as one snapshot, as a relay that served it before would have it."""
    async with Store(data) as store:
        await store.compact(room, 0, state)


@dataclass
class JoinSample:
    connect_ms: float  # TCP + websocket handshake
    step2_ms: float  # from sending step 1 to having step 2's bytes
    apply_ms: float  # pycrdt applying step 2 to a fresh Doc
    receive_ms: float  # the client core (SyncSession.receive) applying it: what a device pays
    messages: int
    step2_bytes: int

    @property
    def total_ms(self) -> float:
        return self.connect_ms + self.step2_ms + self.apply_ms


async def join_once(url: str) -> JoinSample:
    """One new device's join through the client core (`SyncSession`), whose receive of the
    step 2 is timed; the same bytes are then applied to a fresh Doc by pycrdt alone (the
    `apply` figure, as measured before the benchmark used the client core)."""
    doc = new_doc()
    messages = doc.get(schema.MESSAGES, type=Array)
    t0 = now_ns()
    async with session_client(url, doc, timeout=120) as client:
        step2 = client.step2_update
        connect_ms = (client.opened_ns - t0) / 1e6
        step2_ms = (client.step2_arrived_ns - client.opened_ns) / 1e6
        receive_ms = client.step2_apply_ns / 1e6
    fresh = new_doc()
    t1 = now_ns()
    fresh.apply_update(step2)
    apply_ms = (now_ns() - t1) / 1e6
    return JoinSample(connect_ms, step2_ms, apply_ms, receive_ms, len(messages), len(step2))


async def _wait_unloaded(server: Server, before: float) -> None:
    """Our relay unloads an idle room after --idle-unload seconds; poll /metrics for it."""
    with anyio.fail_after(30):
        while (await relay_metrics(server)).get("room_unloads_total", 0) <= before:
            await anyio.sleep(0.2)


@dataclass
class JoinResult:
    server: str
    cold: list[JoinSample] = field(default_factory=list)  # the room loads from the store first
    warm: list[JoinSample] = field(default_factory=list)


async def join_ours(server: Server, room: str, messages: int, cold: int, warm: int) -> JoinResult:
    url = f"{server.url}/{room}?token={token(room, 'writer', 'bob')}"
    result = JoinResult(server.name)
    for _ in range(cold):
        unloads = (await relay_metrics(server)).get("room_unloads_total", 0)
        sample = await join_once(url)
        if sample.messages != messages:
            raise RuntimeError(f"joined with {sample.messages} messages, expected {messages}")
        result.cold.append(sample)
        await _wait_unloaded(server, unloads)
    keeper = await open_light_client(url, lambda client, data, arrived: None)
    try:
        result.warm = [await join_once(url) for _ in range(warm)]
    finally:
        keeper.close()
    return result


async def join_node(
    server: Server, room: str, state: bytes, messages: int, warm: int
) -> JoinResult:
    url = f"{server.url}/{room}?token={token(room, 'writer', 'bob')}"
    async with peer(url, "seed") as (seeder, _):
        await seeder.send(SyncUpdate(state))
    result = JoinResult(server.name)
    first = await join_once(url)  # also checks that the seed arrived
    if first.messages != messages:
        raise RuntimeError(f"node server holds {first.messages} messages, expected {messages}")
    result.warm = [first] + [await join_once(url) for _ in range(warm - 1)]
    return result


# -- 3. bytes per turn --------------------------------------------------------------------


@dataclass
class TurnBytes:
    turns: int
    up: int = 0  # user's device -> relay: its user messages
    down: int = 0  # relay -> user's device: everything it received during the turns
    down_stream: int = 0  # of which: the worker's lease, stream start and streamed text
    down_commit: int = 0  # of which: the committed assistant message (+ usage entry)
    stream_updates: int = 0
    baseline_up: int = 0  # stateless client: the whole history as JSON, every turn
    baseline_down: int = 0  # ... and the reply as JSON (no SSE framing counted)
    last_turn_up: int = 0
    last_turn_baseline_up: int = 0


async def worker_turn(
    worker: SessionClient, conv: Conversation, asked: str, reply: str, chunk: int
) -> tuple[list[int], int]:
    """Answer `asked` as the worker does (design §5): lease, stream, commit in one transaction.

    Returns the frame sizes of the lease and stream updates, and of the commit."""
    turn_id = assistant_turn_id(asked, 1)
    await worker.wait_for(lambda: conv.view.get(asked) is not None)
    sizes = [
        await worker.push(lambda: conv.claim_lease(asked, turn_id, holder="worker", ttl=60)),
        await worker.push(lambda: conv.start_stream(turn_id, parent=asked)),
    ]
    for start in range(0, len(reply), chunk):
        piece = reply[start : start + chunk]
        sizes.append(await worker.push(lambda piece=piece: conv.append_stream(turn_id, piece)))
    usage = {"input_tokens": 0, "output_tokens": len(reply) // 4}
    commit = await worker.push(
        lambda: conv.commit_turn(
            asked,
            turn_id,
            model=MODEL,
            status="complete",
            content=reply,
            derived=[("usage", usage, None)],
        )
    )
    return sizes, commit


async def bytes_per_turn(server: Server, turns: int, chunk: int) -> TurnBytes:
    room = f"turns-{turns}"
    user_url = f"{server.url}/{room}?token={token(room, 'writer', 'alice')}&ext=ack"
    worker_url = f"{server.url}/{room}?token={token(room, 'worker', 'worker')}"
    rng = random.Random(turns)
    result = TurnBytes(turns)
    history: list[dict[str, str]] = []
    async with (
        peer(user_url, "alice") as (user, user_conv),
        peer(worker_url, "worker") as (worker, worker_conv),
    ):
        user_in_before = user.bytes_in
        for _ in range(turns):
            text = words(rng, rng.randint(50, 300))
            reply = words(rng, rng.randint(200, 1200))
            appended: list[Any] = []
            up = await user.push(
                lambda text=text, out=appended: out.append(user_conv.append("user", text))
            )
            asked: str = appended[0].id
            history.append({"role": "user", "content": text})
            request = {"model": "gpt-4o-mini", "messages": history, "stream": True}
            baseline_up = len(json.dumps(request, separators=(",", ":")).encode())
            result.up += up
            result.baseline_up += baseline_up
            result.last_turn_up, result.last_turn_baseline_up = up, baseline_up

            sizes, commit = await worker_turn(worker, worker_conv, asked, reply, chunk)
            # The relay forwards the worker's frames byte for byte, unmasked (4 bytes less).
            result.down_stream += sum(size - 4 for size in sizes)
            result.down_commit += commit - 4
            result.stream_updates += len(sizes) - 2
            history.append({"role": "assistant", "content": reply})
            result.baseline_down += len(
                json.dumps({"role": "assistant", "content": reply}, separators=(",", ":")).encode()
            )
            turn_id = assistant_turn_id(asked, 1)
            await user.wait_for(
                lambda turn_id=turn_id: (
                    user_conv.view.get(turn_id) is not None and user.acked >= user.sent_updates
                )
            )
        result.down = user.bytes_in - user_in_before
        if user.denied or worker.denied:
            raise RuntimeError(f"refused: {user.denied} {worker.denied}")
    return result


# -- the run ------------------------------------------------------------------------------


@dataclass
class Settings:
    observers: list[int]
    procs: int
    updates: int
    rate: float
    warmup: int
    join_messages: int
    cold_joins: int
    warm_joins: int
    turns: int
    chunk: int


async def run_all(relay: Server, node: Server, settings: Settings, state: bytes) -> dict[str, Any]:
    fanouts: list[FanoutResult] = []
    for index, observers in enumerate(settings.observers):
        # Alternate which server goes first, so drift in the machine's load hits both.
        order = [relay, node] if index % 2 == 0 else [node, relay]
        for server in order:
            print(f"fan-out: {server.name}, {observers} observers ...", flush=True)
            fanouts.append(
                await fanout(
                    server,
                    observers,
                    settings.procs,
                    settings.updates,
                    settings.rate,
                    settings.warmup,
                )
            )
    print("join ...", flush=True)
    joins = [
        await join_ours(
            relay, "join-big", settings.join_messages, settings.cold_joins, settings.warm_joins
        ),
        await join_node(node, "join-big", state, settings.join_messages, settings.warm_joins),
    ]
    print("bytes per turn ...", flush=True)
    turns = await bytes_per_turn(relay, settings.turns, settings.chunk)
    return {"fanout": fanouts, "join": joins, "turns": turns}


def _ms(samples: list[JoinSample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples) if samples else float("nan")


def report(
    results: dict[str, Any], settings: Settings, load: tuple[float, ...], state: bytes
) -> str:
    out: list[str] = []
    fanouts: list[FanoutResult] = results["fanout"]
    out.append(
        f"Fan-out: 1 writer, {settings.updates} user messages at {settings.rate:g}/s "
        f"(first {settings.warmup} not in the latencies), observers in {settings.procs} processes"
    )
    out.append(
        "| server | observers | p50 ms | p99 ms | max ms | delivered | CPU s | CPU µs/delivery "
        "| store commit ms |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in fanouts:
        store = "-" if r.store_ms is None else f"{r.store_ms:.1f}"
        out.append(
            f"| {r.server} | {r.observers} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} "
            f"| {r.deliveries}/{r.expected} | {r.cpu_s:.2f} | {r.cpu_us_per_delivery:.1f} "
            f"| {store} |"
        )
    out.append("")
    out.append("| observers | p50 ours/node | p99 ours/node | CPU per delivery ours/node |")
    out.append("|---:|---:|---:|---:|")
    for observers in settings.observers:
        ours = next(r for r in fanouts if r.observers == observers and r.server.startswith("crd"))
        node = next(r for r in fanouts if r.observers == observers and r.server.startswith("node"))
        out.append(
            f"| {observers} | {ours.p50_ms / node.p50_ms:.2f} | {ours.p99_ms / node.p99_ms:.2f} "
            f"| {ours.cpu_us_per_delivery / node.cpu_us_per_delivery:.2f} |"
        )
    out.append("")
    joins: list[JoinResult] = results["join"]
    out.append(
        f"Join: {settings.join_messages} messages, {len(state)} bytes encoded; medians, ms "
        "(connect = TCP + websocket handshake; step 2 = send step 1 .. step 2 received; "
        "apply = pycrdt apply_update; total = connect + step 2 + apply; "
        "receive = SyncSession.receive of step 2, the client core's apply, not in total)"
    )
    out.append("| server | room | samples | connect | step 2 | apply | total | receive |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for j in joins:
        for label, samples in (("cold (loaded from the store)", j.cold), ("in memory", j.warm)):
            if samples:
                out.append(
                    f"| {j.server} | {label} | {len(samples)} | {_ms(samples, 'connect_ms'):.1f} "
                    f"| {_ms(samples, 'step2_ms'):.1f} | {_ms(samples, 'apply_ms'):.1f} "
                    f"| {_ms(samples, 'total_ms'):.1f} | {_ms(samples, 'receive_ms'):.1f} |"
                )
    ours_warm = _ms(joins[0].warm, "total_ms")
    node_warm = _ms(joins[1].warm, "total_ms")
    out.append(
        f"in-memory join ours/node: {ours_warm / node_warm:.2f}; "
        f"cold ours / in-memory node: {_ms(joins[0].cold, 'total_ms') / node_warm:.2f}"
    )
    out.append("")
    t: TurnBytes = results["turns"]
    out.append(
        f"Bytes per turn over {t.turns} turns (reply streamed in {settings.chunk}-character "
        f"flushes, {t.stream_updates} stream updates); websocket frames incl. headers"
    )
    out.append("| | crdtchat relay | resend history (JSON) | ratio |")
    out.append("|---|---:|---:|---:|")
    total = t.up + t.down
    baseline = t.baseline_up + t.baseline_down
    out.append(f"| up, total | {t.up} | {t.baseline_up} | {t.baseline_up / t.up:.0f}x |")
    out.append(
        f"| up, per turn (mean) | {t.up / t.turns:.0f} | {t.baseline_up / t.turns:.0f} "
        f"| {t.baseline_up / t.up:.0f}x |"
    )
    out.append(
        f"| up, last turn | {t.last_turn_up} | {t.last_turn_baseline_up} "
        f"| {t.last_turn_baseline_up / t.last_turn_up:.0f}x |"
    )
    out.append(f"| down, total | {t.down} | {t.baseline_down} | {t.baseline_down / t.down:.2f}x |")
    out.append(f"| up + down, total | {total} | {baseline} | {baseline / total:.1f}x |")
    out.append(
        f"down = stream {t.down_stream} + committed replies {t.down_commit} "
        f"+ acks and the rest {t.down - t.down_stream - t.down_commit}"
    )
    out.append("")
    out.append(f"load average (1, 5, 15 min) before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return "\n".join(out)


async def compare_relays(
    trees: dict[str, Path], observers: int, runs: int, settings: Settings
) -> list[FanoutResult]:
    """The fan-out on the relay of each tree in turn, alternating the order from run to run so
    that drift in the machine's load hits both; a fresh relay and data directory every run."""
    results: list[FanoutResult] = []
    names = list(trees)
    for index in range(runs):
        for name in names if index % 2 == 0 else names[::-1]:
            with tempfile.TemporaryDirectory(prefix="crdtchat-fanout-") as tmp:
                args = ["--idle-unload", "1", "--subject-connections", "10000"]
                with running_relay(Path(tmp) / "relay-data", args, src=trees[name]) as relay:
                    print(f"run {index + 1}: {name} relay, {observers} observers ...", flush=True)
                    result = await fanout(
                        relay,
                        observers,
                        settings.procs,
                        settings.updates,
                        settings.rate,
                        settings.warmup,
                    )
            results.append(dataclasses.replace(result, server=name))
    return results


def compare_report(results: list[FanoutResult]) -> str:
    out = [
        "| run | relay | p50 ms | p99 ms | delivered | CPU µs/delivery |",
        "|---|---|---:|---:|---:|---:|",
    ]
    new = [r for r in results if r.server == "new"]
    old = [r for r in results if r.server == "old"]
    for index, (n, o) in enumerate(zip(new, old, strict=True)):
        for r in (n, o):
            out.append(
                f"| {index + 1} | {r.server} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
                f"| {r.deliveries}/{r.expected} | {r.cpu_us_per_delivery:.1f} |"
            )
    p99 = [n.p99_ms / o.p99_ms for n, o in zip(new, old, strict=True)]
    cpu = [n.cpu_us_per_delivery / o.cpu_us_per_delivery for n, o in zip(new, old, strict=True)]
    out.append("")
    out.append("new/old per run, p99: " + " / ".join(f"{x:.2f}" for x in p99))
    out.append("new/old per run, CPU per delivery: " + " / ".join(f"{x:.2f}" for x in cpu))
    out.append(
        f"median of new/old: p99 {statistics.median(p99):.3f}, "
        f"CPU per delivery {statistics.median(cpu):.3f}"
    )
    out.append(
        "medians new vs old: p99 "
        f"{statistics.median(r.p99_ms for r in new):.1f} vs "
        f"{statistics.median(r.p99_ms for r in old):.1f} ms, CPU "
        f"{statistics.median(r.cpu_us_per_delivery for r in new):.1f} vs "
        f"{statistics.median(r.cpu_us_per_delivery for r in old):.1f} µs/delivery"
    )
    return "\n".join(out)


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--old-src", type=Path, help="compare with the relay of this checkout")
    parser.add_argument("--nats", action="store_true", help="two relay nodes on NATS, compared")
    parser.add_argument("--runs", type=int, help="with --old-src (5) or --nats (2): runs of each")
    parser.add_argument("--observers", type=int, default=500, help="with --old-src or --nats")
    parser.add_argument("--updates", type=int, default=150, help="with --nats")
    parser.add_argument("--nodes", type=int, default=2, help="with --nats: relay nodes (1-4)")
    parser.add_argument("--observe", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--last", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.observe:
        anyio.run(observe, args.observe, args.clients, args.last)
        return 0
    if args.nats:
        from benchmarks._fanout_cluster import run_cluster  # imports this module: not at the top

        return run_cluster(args.quick, args.observers, args.runs or 2, args.updates, args.nodes)
    settings = Settings(
        observers=[100, 500],
        procs=2,
        updates=150,
        rate=20.0,
        warmup=10,
        join_messages=10_000,
        cold_joins=3,
        warm_joins=5,
        turns=500,
        chunk=100,
    )
    if args.quick:
        settings.observers, settings.updates, settings.join_messages = [10, 40], 30, 1000
        settings.cold_joins, settings.warm_joins, settings.turns = 1, 2, 20
    load = os.getloadavg()
    print(f"load average {load}; {os.cpu_count()} cores", flush=True)
    if args.old_src is not None:
        trees = {"new": REPO, "old": args.old_src.resolve()}
        compared = anyio.run(compare_relays, trees, args.observers, args.runs or 5, settings)
        load_after = os.getloadavg()
        print()
        print(compare_report(compared))
        print(f"load average before {load[0]:.2f}, after {load_after[0]:.2f}")
        if args.json is not None:
            args.json.write_text(json.dumps(_plain(compared), indent=1, default=str))
        return 0
    print(f"building a {settings.join_messages}-message conversation ...", flush=True)
    state = conversation_state(settings.join_messages)
    with tempfile.TemporaryDirectory(prefix="crdtchat-fanout-") as tmp:
        data = Path(tmp) / "relay-data"
        anyio.run(seed_relay_store, data, "join-big", state)
        with (
            # All observers share one token subject; the relay allows 128 connections per
            # subject (design §7.4), so the benchmark raises that limit as a deployment would.
            running_relay(data, ["--idle-unload", "1", "--subject-connections", "10000"]) as relay,
            running_node_server(Path(tmp)) as node,
        ):
            print(f"relay pid {relay.pid} at {relay.url}; node pid {node.pid} at {node.url}")
            results = anyio.run(run_all, relay, node, settings, state)
            cpu = {relay.name: cpu_seconds(relay.pid), node.name: cpu_seconds(node.pid)}
    load_after = os.getloadavg()
    text = report(results, settings, load, state)
    text += f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    text += f"\nserver CPU over the whole run, s: {cpu}"
    print()
    print(text)
    if args.json is not None:
        payload = {"settings": _plain(settings), "load": [load, load_after], **_plain(results)}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
