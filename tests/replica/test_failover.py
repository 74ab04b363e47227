"""A replica given several relays moves to the next when its relay goes away (design §3).

Two real relay subprocesses, each with its own data directory (SQLite has one writer, so two
relays cannot share one): relay B learns the document from the replica itself, which holds all
of it, and relay A, back on its port, catches up the same way. Every wait is on the replica's
status or a document's change events.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pycrdt import Array, Doc

from crdtchat.errors import ConfigError
from crdtchat.relays import RelayURLError, relay_urls, starting_at
from crdtchat.replica import Backoff, Replica, ReplicaStatus
from tests.support.relay import RelayProcess, message_map, metric, running_relay, token

pytestmark = pytest.mark.anyio

ROOM = "failover-1"
FAST = Backoff(initial=0.05, maximum=0.5)


@contextmanager
def refusing_url() -> Iterator[str]:
    """A loopback URL that refuses connections while the block runs: the port is bound (so
    nothing else takes it) but never listens, so a connect gets ECONNREFUSED at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}"


def say(doc: Doc, message_id: str, text: str) -> None:
    doc.get("canonical.messages", type=Array).append(message_map(message_id, "user", "alice", text))


def ids(doc: Doc) -> set[str]:
    return {str(m["id"]) for m in doc.get("canonical.messages", type=Array)}


async def ids_on(relay: RelayProcess) -> set[str]:
    """What `relay` alone holds of the room, as a fresh replica of it reads it."""
    async with Replica(relay.ws_base, ROOM, token(ROOM, "reader", "bob"), backoff=FAST) as r:
        await r.wait_until(lambda s: s.synced, timeout=20)
        return ids(r.doc)


def on(relay: RelayProcess) -> Callable[[ReplicaStatus], bool]:
    """A status predicate: synced with `relay`, and every local edit stored there."""

    def predicate(status: ReplicaStatus) -> bool:
        return status.relay == relay.ws_base and status.synced and status.durable

    return predicate


async def test_moves_to_the_next_relay_when_its_relay_dies_and_back(tmp_path: Path) -> None:
    a = RelayProcess(tmp_path / "a").start()
    b = RelayProcess(tmp_path / "b").start()
    try:
        doc: Doc = Doc()
        async with Replica(
            [a.ws_base, b.ws_base],
            ROOM,
            token(ROOM),
            doc=doc,
            store_path=tmp_path / "alice.sqlite",
            backoff=FAST,
        ) as replica:
            assert replica.urls == (a.ws_base, b.ws_base)
            await replica.wait_until(on(a), timeout=20)
            say(doc, "m1", "stored on A")
            await replica.wait_until(on(a), timeout=20)

            a.kill()
            say(doc, "m2", "written while A dies")
            await replica.wait_until(on(b), timeout=30)
            # B had nothing of the room: it has what A stored, from the replica's step 2.
            assert await ids_on(b) == {"m1", "m2"}
            say(doc, "m3", "stored on B")
            await replica.wait_until(on(b), timeout=20)

            a.start()  # the same port and data: A holds m1 only
            assert a.proc is not None and a.ws_base == replica.urls[0]
            b.kill()
            await replica.wait_until(on(a), timeout=30)
            say(doc, "m4", "stored on A again")
            await replica.wait_until(on(a), timeout=20)
            assert replica.url == a.ws_base
        assert await ids_on(a) == {"m1", "m2", "m3", "m4"}
    finally:
        a.stop()
        b.stop()


async def test_a_relay_refusing_connections_at_start_is_skipped(tmp_path: Path) -> None:
    with refusing_url() as dead, running_relay(tmp_path / "b") as b:
        doc: Doc = Doc()
        # The command line's form: one comma-separated string.
        async with Replica(f"{dead}, {b.ws_base}/", ROOM, token(ROOM), doc=doc, backoff=FAST) as r:
            assert r.status.relay == dead  # the first is tried first
            say(doc, "m1", "hello")
            status = await r.wait_until(on(b), timeout=20)
            assert status.connected and status.relay == b.ws_base
        assert await ids_on(b) == {"m1"}


async def test_a_refused_token_is_not_taken_to_the_next_relay(tmp_path: Path) -> None:
    """Both relays trust the same issuer: a token one refuses, the other would refuse too.
    The replica stops reconnecting on the relay that refused, as with one relay."""
    with running_relay(tmp_path / "a") as a, running_relay(tmp_path / "b") as b:
        async with Replica(
            [a.ws_base, b.ws_base], ROOM, token("another-room"), backoff=FAST
        ) as replica:
            status = await replica.wait_until(lambda s: s.rejected is not None, timeout=20)
            assert "wrong room" in (status.rejected or "")
            assert status.relay == a.ws_base and not status.connected
            replica.set_token(token(ROOM))
            status = await replica.wait_until(lambda s: s.synced, timeout=20)
            assert status.relay == a.ws_base
        assert metric(b, "crdtchat_room_loads_total") == 0


def test_relay_lists_are_checked_and_name_the_bad_url() -> None:
    assert relay_urls("ws://a:1") == ("ws://a:1",)
    assert relay_urls(" ws://a:1/ ,wss://b.example/relay") == ("ws://a:1", "wss://b.example/relay")
    assert relay_urls(["ws://a:1", "ws://b:2"]) == ("ws://a:1", "ws://b:2")
    for bad, named, why in [
        ("ws://a:1,http://b:2", "http://b:2", "ws:// or wss://"),
        ("ws://a:1,,ws://b:2", "", "empty entry"),
        ("ws://a:1,", "", "empty entry"),
        ("ws://a:99999", "ws://a:99999", "out of range"),
        ("ws://a:port", "ws://a:port", "port"),
        ("ws://:8765", "ws://:8765", "no host"),
        ("ws://a:1/?token=x", "ws://a:1/?token=x", "no query"),
        ("ws://a:1,ws://a:1", "ws://a:1", "listed twice"),
        ("", "", "no relay URL"),
    ]:
        with pytest.raises(RelayURLError) as excinfo:
            relay_urls(bad)
        assert excinfo.value.url == named, bad
        assert why in str(excinfo.value), (bad, str(excinfo.value))
        assert isinstance(excinfo.value, ConfigError)


def test_a_replica_refuses_a_bad_list_when_it_is_built() -> None:
    with pytest.raises(ConfigError, match="'wss//b'"):
        Replica("ws://127.0.0.1:1,wss//b", ROOM, token(ROOM))


def test_starting_at_keeps_the_round_robin_order() -> None:
    urls = ("ws://a:1", "ws://b:2", "ws://c:3")
    assert starting_at(urls, "ws://b:2") == ("ws://b:2", "ws://c:3", "ws://a:1")
    assert starting_at(urls, "ws://d:4") == urls
