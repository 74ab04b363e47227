"""The limits of design §7.3 and §7.4 on a real relay subprocess (issue 10, findings 4, 5, 7).

Each flood runs while a bystander in another room writes and waits for its acknowledgement:
the relay must keep serving other rooms throughout. The limits are set small on the command
line so that the floods stay small and the tests fast; nothing here waits on a clock.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from itertools import count
from pathlib import Path

import anyio
import pytest
from pycrdt import Doc
from websockets.exceptions import ConnectionClosed

from crdtchat import schema
from crdtchat.relay.ratelimit import Subject, SubjectQuotas, Subjects
from crdtchat.wire import (
    AwarenessEntry,
    AwarenessMessage,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    encode_awareness,
    encode_message,
)
from tests.support.relay import (
    RawClient,
    RelayProcess,
    declare_roots,
    message_map,
    raw_client,
    running_relay,
    token,
)

pytestmark = pytest.mark.anyio

AWARENESS_CLIENTS = 4
AWARENESS_BYTES = 2048
AWARENESS_DEPTH = 16
AWARENESS_BURST = 10
SUBJECT_CONNECTIONS = 5
REFUSAL_BURST = 10
QUOTA_ROOMS = 3
QUOTA_BYTES = 200_000
MAX_DOCUMENT = 300_000
CHUNK = 10_000  # characters of one message's text; six make one ~60 KB update

ARGS = [
    *("--awareness-clients", str(AWARENESS_CLIENTS)),
    *("--awareness-bytes", str(AWARENESS_BYTES)),
    *("--awareness-depth", str(AWARENESS_DEPTH)),
    *("--awareness-rate", "1", "--awareness-burst", str(AWARENESS_BURST)),
    *("--subject-connections", str(SUBJECT_CONNECTIONS)),
    *("--refusal-rate", "0.01", "--refusal-burst", str(REFUSAL_BURST)),
    *("--quota-rooms", str(QUOTA_ROOMS), "--quota-bytes", str(QUOTA_BYTES)),
    *("--quota-interval", "3600", "--max-document", str(MAX_DOCUMENT)),
]

_bystanders = count()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with running_relay(Path(tmp_path_factory.mktemp("limits")) / "data", ARGS) as process:
        yield process


def url(relay: RelayProcess, room: str, sub: str, role: str = "writer", ack: bool = True) -> str:
    return relay.url(room, token(room, role, sub), ack=ack)


async def append(client: RawClient, msg_id: str, author: str, text: str = "hi") -> None:
    await client.push(lambda doc: client.messages.append(message_map(msg_id, "user", author, text)))


async def bystander_is_served(relay: RelayProcess) -> None:
    """A writer in a room of its own joins, writes, and is acknowledged (a new subject each
    time, so that bystanders never meet the quotas themselves)."""
    n = next(_bystanders)
    room, sub = f"bystander-{n}", f"bystander-{n}"
    async with raw_client(url(relay, room, sub)) as client:
        await append(client, "b1", sub)
        await client.wait_acked(timeout=30)


async def acked_or_closed(client: RawClient) -> None:
    """Until everything `client` sent is acknowledged, or the relay closed it."""
    await client.wait_for(
        lambda: client.closed or (client.acks or [0])[-1] >= client.sent_updates, timeout=30
    )


async def during(relay: RelayProcess, flood: Callable[[], Awaitable[None]]) -> None:
    """Run `flood` and, once it has started, a bystander in another room, to the end of both."""
    started = anyio.Event()

    async def bystander() -> None:
        await started.wait()
        await bystander_is_served(relay)

    async with anyio.create_task_group() as tg:
        tg.start_soon(bystander)
        started.set()
        await flood()
    await bystander_is_served(relay)  # and after it


def awareness(*entries: tuple[int, object]) -> bytes:
    payload = encode_awareness(AwarenessEntry(cid, 1, json.dumps(state)) for cid, state in entries)
    return encode_message(AwarenessMessage(payload))


def awareness_messages(client: RawClient) -> int:
    return sum(isinstance(m, AwarenessMessage) for m in client.received)


def present(client: RawClient) -> set[int]:
    return {cid for cid, (_, state) in client.awareness.items() if state != "null"}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- design §7.3: awareness ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "frames", "code", "reason"),
    [
        (
            "too many client ids at once",
            [awareness(*((cid, {"n": cid}) for cid in range(100, 100 + 50)))],
            1008,
            f"more than {AWARENESS_CLIENTS} client ids",
        ),
        (
            "one client id after another",
            [awareness((cid, {"n": cid})) for cid in range(200, 200 + AWARENESS_CLIENTS + 1)],
            1008,
            f"more than {AWARENESS_CLIENTS} client ids",
        ),
        (
            "a state too big",
            [awareness((300, {"name": "x" * AWARENESS_BYTES}))],
            1009,
            f"limit {AWARENESS_BYTES}",
        ),
        (
            "nesting that the JSON parser cannot take",
            [
                encode_message(
                    AwarenessMessage(encode_awareness([AwarenessEntry(400, 1, nested(1000))]))
                )
            ],
            1008,
            "nests 1000 deep",
        ),
        (
            "nesting over the limit",
            [
                encode_message(
                    AwarenessMessage(
                        encode_awareness([AwarenessEntry(500, 1, nested(AWARENESS_DEPTH + 1))])
                    )
                )
            ],
            1008,
            f"more than {AWARENESS_DEPTH}",
        ),
        (
            "too fast",
            [awareness((600, {"n": n})) for n in range(AWARENESS_BURST * 3)],
            1008,
            "awareness messages/s",
        ),
        (
            "queries too fast",
            [encode_message(QueryAwareness())] * (AWARENESS_BURST * 3),
            1008,
            "awareness messages/s",
        ),
    ],
)
async def test_awareness_floods_close_only_the_flooder(
    relay: RelayProcess, case: str, frames: list[bytes], code: int, reason: str
) -> None:
    room = "aware-" + case.replace(" ", "-")
    async with (
        raw_client(url(relay, room, "alice")) as alice,
        raw_client(url(relay, room, "mallory", role="reader")) as mallory,
    ):
        await alice.set_presence(1, 1, {"user": {"name": "Alice", "tree": nested(3)}})
        await mallory.wait_for(lambda: 1 in mallory.awareness)

        async def flood() -> None:
            for frame in frames:
                if mallory.closed:
                    break
                with contextlib.suppress(ConnectionClosed):  # closed meanwhile
                    await mallory.send_raw(frame)
            got = await mallory.wait_closed(timeout=30)
            assert got[0] == code, got
            assert reason in (got[1] or ""), got

        await during(relay, flood)
        # Nobody was sent more than the limit of the flooder's entries ...
        assert len(set(alice.awareness) - {1}) <= AWARENESS_CLIENTS
        # ... and once the flooder is gone, a joiner and a query see alice alone.
        async with raw_client(url(relay, room, "carol")) as carol:
            await carol.wait_for(lambda: 1 in carol.awareness)
            await carol.send(QueryAwareness())
            replies = awareness_messages(carol)
            await carol.wait_for(lambda: awareness_messages(carol) > replies)
            await carol.wait_for(lambda: present(carol) == {1})
        assert not alice.closed
    log = relay.log()
    assert "Traceback" not in log and "RecursionError" not in log


async def test_awareness_within_the_limits_is_relayed(relay: RelayProcess) -> None:
    room = "aware-fine"
    async with (
        raw_client(url(relay, room, "alice")) as alice,
        raw_client(url(relay, room, "bob")) as bob,
    ):
        deep = json.loads(nested(AWARENESS_DEPTH - 1))  # the state's own object is one more
        states = [(cid, {"n": cid, "deep": deep}) for cid in range(10, 10 + AWARENESS_CLIENTS)]
        await alice.send_raw(awareness(*states))
        await bob.wait_for(lambda: all(cid in bob.awareness for cid, _ in states))
        # Removing one frees its place for another.
        await alice.send_raw(
            encode_message(
                AwarenessMessage(
                    encode_awareness(
                        [AwarenessEntry(10, 2, "null"), AwarenessEntry(99, 1, '{"n": 99}')]
                    )
                )
            )
        )
        await bob.wait_for(lambda: 99 in bob.awareness and bob.awareness[10][1] == "null")
        assert not alice.closed


# -- design §7.4: connections and refused writes per subject ---------------------------------


async def test_connections_per_subject(relay: RelayProcess) -> None:
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                raw_client(url(relay, f"conn-{n}", "octopus", role="reader"))
            )
            for n in range(SUBJECT_CONNECTIONS)
        ]
        async with raw_client(
            url(relay, "conn-extra", "octopus", role="reader"), hello=False
        ) as extra:
            code, reason = await extra.wait_closed(timeout=30)
        assert code == 1013 and "too many connections for subject 'octopus'" in (reason or "")
        await bystander_is_served(relay)  # another subject is not affected
        await clients[0].ws.close()
        await clients[0].wait_closed()

        async def replaced() -> None:
            # The relay counts the closed connection out when its handler ends, which may be
            # just after this side saw the close: until then the answer is 1013.
            while True:
                async with raw_client(
                    url(relay, "conn-again", "octopus", role="reader"), hello=False
                ) as again:
                    with contextlib.suppress(ConnectionClosed):  # closed already: 1013
                        await again.send(SyncStep1(again.doc.get_state()))
                    await again.wait_for(lambda: again.synced or again.closed, timeout=30)
                    if again.synced:
                        return
                    assert again.close_code == 1013, again.close_reason

        with anyio.fail_after(30):
            await replaced()
        assert not any(c.closed for c in clients[1:])


def refused_update() -> bytes:
    doc: Doc = Doc()
    declare_roots(doc)[schema.MESSAGES].append(message_map("x", "user", "reader", "nope"))
    return doc.get_update()


async def test_refused_writes_are_limited_per_subject(relay: RelayProcess) -> None:
    """Spread over connections (each under the old per-connection budget), refusals of one
    subject add up; the subject's connections are closed, the room and others carry on."""
    room = "refusals"
    frame = encode_message(SyncUpdate(refused_update()))
    async with raw_client(url(relay, room, "alice")) as alice, AsyncExitStack() as stack:
        readers = [
            await stack.enter_async_context(raw_client(url(relay, room, "swarm", role="reader")))
            for _ in range(4)
        ]

        async def flood() -> None:
            for _ in range(REFUSAL_BURST // 2):  # each connection stays under the old budget
                for reader in readers:
                    with contextlib.suppress(ConnectionClosed):
                        await reader.send_raw(frame)
            for reader in readers:  # then one more each, until each is denied or closed
                while not reader.closed:
                    denied = len(reader.denied)
                    with contextlib.suppress(ConnectionClosed):
                        await reader.send_raw(frame)
                    await reader.wait_for(
                        lambda r=reader, d=denied: r.closed or len(r.denied) > d, timeout=30
                    )

        await during(relay, flood)
        for reader in readers:
            assert reader.close_code == 1008, reader.close_reason
            assert "too many refused writes from subject 'swarm'" in (reader.close_reason or "")
        assert sum(len(reader.denied) for reader in readers) <= REFUSAL_BURST
        await append(alice, "a1", "alice")
        await alice.wait_acked()


# -- design §7.4: quotas ---------------------------------------------------------------------


async def test_rooms_created_per_subject(relay: RelayProcess) -> None:
    """A writer token for every room creates QUOTA_ROOMS rooms, then is told to wait; it can
    still write in the rooms it has, and others can still create rooms."""
    wildcard = token("*", "writer", "spawner")
    for n in range(QUOTA_ROOMS):
        async with raw_client(relay.url(f"spawn-{n}", wildcard, ack=True)) as client:
            await append(client, f"s{n}", "spawner")
            await client.wait_acked()

    async def flood() -> None:
        async with raw_client(relay.url("spawn-over", wildcard, ack=True)) as client:
            await append(client, "over", "spawner")
            code, reason = await client.wait_closed(timeout=30)
        assert code == 1013, (code, reason)
        assert f"quota: subject 'spawner' created {QUOTA_ROOMS} rooms" in (reason or "")

    await during(relay, flood)
    async with raw_client(relay.url("spawn-0", wildcard, ack=True)) as client:
        await append(client, "s0b", "spawner")
        await client.wait_acked()
    async with raw_client(relay.url("spawn-over", token("spawn-over", "reader", "r"))) as reader:
        assert len(reader.messages) == 0  # nothing of the refused write was stored


def big_messages(client: RawClient, prefix: str, author: str) -> Callable[[object], None]:
    def change(_doc: object) -> None:
        for n in range(6):
            client.messages.append(message_map(f"{prefix}-{n}", "user", author, "x" * CHUNK))

    return change


async def test_bytes_written_per_subject(relay: RelayProcess) -> None:
    room = "bulk"
    sent = 0
    async with raw_client(url(relay, room, "bulk")) as bulk:

        async def flood() -> None:
            nonlocal sent
            for n in range(QUOTA_BYTES // (6 * CHUNK) + 2):
                if bulk.closed:
                    break
                await bulk.push(big_messages(bulk, f"m{n}", "bulk"))
                sent += 1
                await acked_or_closed(bulk)
            code, reason = await bulk.wait_closed(timeout=30)
            assert code == 1013, (code, reason)
            assert f"quota: subject 'bulk' wrote {QUOTA_BYTES}" in (reason or "")

        await during(relay, flood)
    async with raw_client(url(relay, room, "reader", role="reader")) as reader:
        assert 0 < len(reader.messages) < 6 * sent  # the write over the quota is not there


async def test_document_size(relay: RelayProcess) -> None:
    """Two subjects fill a room to its limit; the next growth closes with 1009, while a
    resend of what the room already has (a reconnect's sync step 2) is still taken."""
    room = "full"
    async with (
        raw_client(url(relay, room, "fill-a")) as a,
        raw_client(url(relay, room, "fill-b")) as b,
    ):
        writers = [(a, "fill-a"), (b, "fill-b")]

        async def flood() -> None:
            for n in range(MAX_DOCUMENT // (6 * CHUNK) + 1):
                client, sub = writers[n % 2]
                await client.push(big_messages(client, f"f{n}", sub))
                await acked_or_closed(client)
                if client.closed:
                    break
            closed = a if a.closed else b
            assert closed.close_code == 1009, (closed.close_code, closed.close_reason)
            assert "room is full: its document holds" in (closed.close_reason or "")

        await during(relay, flood)
        survivor = b if a.closed else a
        await survivor.send(SyncStep2(survivor.doc.get_update()))
        await survivor.wait_acked()
        assert not survivor.closed
    async with raw_client(url(relay, room, "reader", role="reader")) as reader:
        assert len(reader.messages) % 6 == 0 and len(reader.messages) > 0


def test_the_subject_table_keeps_only_active_subjects() -> None:
    """A subject is counted while it has connections or something left to refill; then it is
    forgotten, so the table does not grow with every subject ever seen."""
    subjects = Subjects(SubjectQuotas(connections=2))
    first, second = subjects.connect("a"), subjects.connect("a")
    assert isinstance(first, Subject) and isinstance(second, Subject)
    assert subjects.connect("a") == "too many connections for subject 'a': limit 2; try again later"
    subjects.disconnect(first)
    subjects.disconnect(second)
    assert len(subjects) == 0
    owing = subjects.connect("b")
    assert isinstance(owing, Subject)
    assert owing.refusals.take(1)
    subjects.disconnect(owing)
    assert len(subjects) == 1  # its refusal has not refilled: forgetting it would reset it
    assert subjects.get("b") is owing
