"""Soak tests: what the relay and the clients build again and again must come back (issue 12).

yrs holds observer callbacks out of sight of Python's cycle collector, so an owner whose
callback refers back to it stays in memory for good unless its subscriptions are dropped
(`crdtchat.lifetime`). Each test builds, uses and drops thousands of documents the way their
owners do, then asserts that no pycrdt `Doc` of theirs is still alive (weak references: exact)
and that resident memory after a collection stayed within a small bound (noisy, so only a
bound several times below what one leaked document per iteration would cost).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
from pycrdt import Doc

from crdtchat.document import Conversation
from crdtchat.relay.livedoc import Accepted, LiveDoc, Refused
from crdtchat.replica import Replica
from crdtchat.schema import assistant_turn_id
from crdtchat.wire import AuthDenied
from tests.support.memory import rss_bytes
from tests.support.relay import (
    RawClient,
    declare_roots,
    message_map,
    raw_client,
    running_relay,
    token,
)

ROUNDS = 5_000
RELAY_ROOMS = 1_500
# Before the fix one iteration kept 12-90 KB (issue 12); 5,000 of them are 60-450 MB.
RSS_BOUND = 24 * 1024 * 1024


def room_state(messages: int = 20) -> bytes:
    conversation = Conversation.create(author="alice", title="soak")
    for index in range(messages):
        conversation.append("user", f"message {index}")
    state = conversation.encode_state()
    conversation.close()
    return state


def soak(iterations: int, step: Callable[[list[weakref.ref[Doc]]], None]) -> tuple[int, int]:
    """Run `step` `iterations` times after a warm-up; returns (docs alive, RSS growth)."""
    warm: list[weakref.ref[Doc]] = []
    for _ in range(200):  # allocator pools, pydantic and pycrdt caches fill up here
        step(warm)
    gc.collect()
    before = rss_bytes()
    refs: list[weakref.ref[Doc]] = []
    for _ in range(iterations):
        step(refs)
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    return alive, rss_bytes() - before


def test_room_documents_built_used_and_dropped_come_back() -> None:
    state = room_state()
    source = Conversation.from_update(state, author="alice")
    before = source.state_vector()
    source.append("user", "one more")
    accepted_update = source.update_since(before)
    source.close()
    writer = Doc()
    declare_roots(writer)
    writer.apply_update(state)
    before = writer.get_state()
    with writer.transaction():
        declare_roots(writer)["canonical.messages"].append(  # type: ignore[union-attr]
            message_map("forged", "assistant", "alice", "not yours")
        )
    refused_update = writer.get_update(before)

    def step(refs: list[weakref.ref[Doc]]) -> None:
        # What a room does: load, accept a write, refuse one (a rebuild), unload. (The room's
        # WaitingWatch is exercised by the relay test below.)
        with LiveDoc(state) as live:
            refs.append(weakref.ref(live.doc))
            assert isinstance(live.apply(accepted_update, "writer", "alice"), Accepted)
            assert isinstance(live.apply(refused_update, "writer", "alice"), Refused)
            refs.append(weakref.ref(live.doc))  # the rebuilt one

    alive, growth = soak(ROUNDS, step)
    assert alive == 0, f"{alive} of {2 * ROUNDS} room documents are still alive"
    assert growth < RSS_BOUND, f"resident memory grew by {growth / 2**20:.1f} MiB"


def test_conversations_opened_read_and_closed_come_back() -> None:
    state = room_state()

    def step(refs: list[weakref.ref[Doc]]) -> None:
        # What the worker and the chat client do on every room or conversation switch.
        with Conversation.from_update(state, author="alice") as conversation:
            refs.append(weakref.ref(conversation.doc))
            updates: list[bytes] = []
            conversation.on_update(updates.append)
            conversation.leases.observe(lambda event: updates.append(b""))
            assert len(conversation.current_thread()) == 20
            question = conversation.append("user", "and then?")
            assert updates
            [waiting] = conversation.waiting_for_reply()
            assert waiting.turn_id == assistant_turn_id(question.id, 1)

    alive, growth = soak(ROUNDS, step)
    assert alive == 0, f"{alive} of {ROUNDS} conversations' documents are still alive"
    assert growth < RSS_BOUND, f"resident memory grew by {growth / 2**20:.1f} MiB"


def test_a_dropped_owner_that_was_not_closed_is_freed_too() -> None:
    """The callbacks hold their owner weakly: forgetting close() must not leak the owner."""
    state = room_state(3)
    refs: list[weakref.ref[object]] = []
    for _ in range(50):
        live = LiveDoc(state)
        conversation = Conversation.from_update(state, author="alice")
        refs += [weakref.ref(live), weakref.ref(live.doc), weakref.ref(conversation.view)]
        refs.append(weakref.ref(conversation.doc))
        del live, conversation
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0


@pytest.mark.anyio
async def test_a_closed_replica_and_conversation_let_go_of_their_document(tmp_path: Path) -> None:
    """A replica built on a conversation's document drops its observers when it ends."""
    refs: list[weakref.ref[object]] = []
    for index in range(20):
        conversation = Conversation(author="alice")
        # Nothing listens on this port: the replica keeps retrying until it is closed.
        async with Replica(
            "ws://127.0.0.1:9", f"room-{index}", token("room"), doc=conversation.doc
        ) as replica:
            conversation.append("user", "offline")
            await replica.wait_until(lambda status: status.pending > 0)
        refs += [weakref.ref(replica), weakref.ref(conversation.doc)]
        conversation.close()
        del replica, conversation
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    response = await client.get("/metrics")
    for line in response.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def _until_unloaded(client: httpx.AsyncClient, unloads: int) -> None:
    """Wait until `unloads` rooms have been unloaded and none is loaded (generous timeout)."""
    with anyio.fail_after(120):
        while (
            await _metric(client, "crdtchat_room_unloads_total") < unloads
            or await _metric(client, "crdtchat_rooms") > 0
        ):
            await anyio.sleep(0.05)  # the relay publishes no unload event; /metrics is polled


async def _visit(relay_url: Callable[[str, str], str], index: int) -> None:
    """Join a room of its own, make a write that is stored and one that is refused, leave."""
    room = f"soak-{index}"
    async with raw_client(relay_url(room, token(room)), hello=True) as client:
        client: RawClient  # type: ignore[no-redef]
        roots = client.roots

        def mine(doc: Doc) -> None:
            roots["canonical.messages"].append(message_map(f"m{index}", "user", "alice", "hi"))  # type: ignore[union-attr]

        def forged(doc: Doc) -> None:
            roots["canonical.messages"].append(  # type: ignore[union-attr]
                message_map(f"a{index}", "assistant", "alice", "not yours")
            )

        await client.push(mine)
        await client.push(forged)
        await client.wait_for(lambda: any(isinstance(m, AuthDenied) for m in client.received))


@pytest.mark.anyio
async def test_relay_loading_and_unloading_rooms_comes_back(tmp_path: Path) -> None:
    rooms = RELAY_ROOMS
    # One subject creates every room and has a write refused in each: lift the per-subject
    # limits of design §7.4 that exist to stop exactly that.
    unlimited = ["--quota-rooms", str(10 * rooms), "--refusal-burst", str(10 * rooms)]
    with running_relay(tmp_path / "data", ["--idle-unload", "0.05", *unlimited]) as relay:
        assert relay.proc is not None
        pid = relay.proc.pid
        url = relay.url
        async with httpx.AsyncClient(base_url=relay.http_url) as http:

            async def visit_all(first: int, count: int) -> None:
                limiter = anyio.Semaphore(8)

                async def one(index: int) -> None:
                    async with limiter:
                        await _visit(url, index)

                async with anyio.create_task_group() as tg:
                    for index in range(first, first + count):
                        tg.start_soon(one, index)
                await _until_unloaded(http, first + count)

            warm_up = rooms // 5
            await visit_all(0, warm_up)
            before = rss_bytes(pid)
            await visit_all(warm_up, rooms - warm_up)
            growth = rss_bytes(pid) - before
            refused = await _metric(http, "crdtchat_refused_writes_total")
    assert refused == rooms
    # Before the fix each room loaded and unloaded kept about 50 KB: 1,200 rooms, 60 MB.
    assert growth < 16 * 1024 * 1024, f"the relay grew by {growth / 2**20:.1f} MiB"
