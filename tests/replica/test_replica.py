"""Replicas over real sockets, with the relay as a subprocess (tests/support/relay.py).

Messages are written as the relay's permission rules require of a writer: plain pycrdt Maps in
`canonical.messages` with role user, authored by the token's subject.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from pycrdt import Array, Doc, Map

from crdtchat.document import Conversation
from crdtchat.replica import Backoff, Replica, ReplicaStatus
from tests.support.relay import REPO, RelayProcess, message_map, raw_client, running_relay, token
from tests.support.replica import wait_doc

ROOM = "conv-1"
FAST = Backoff(initial=0.05, maximum=0.5)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    with running_relay(tmp_path / "relay-data") as process:
        yield process


def base_url(relay: RelayProcess) -> str:
    return f"ws://{relay.host}:{relay.port}"


def replica(relay: RelayProcess, sub: str, store: Path | None, **kwargs: object) -> Replica:
    kwargs.setdefault("backoff", FAST)
    return Replica(
        base_url(relay),
        ROOM,
        token(ROOM, "writer", sub),
        store_path=store,
        **kwargs,  # type: ignore[arg-type]
    )


def messages(doc: Doc) -> Array:
    return doc.get("canonical.messages", type=Array)


def say(doc: Doc, sub: str, message_id: str, text: str) -> None:
    messages(doc).append(message_map(message_id, "user", sub, text))


def ids(doc: Doc) -> set[str]:
    return {str(m["id"]) for m in messages(doc)}


def durable_ids(rep: Replica, local_to_message: dict[int, str]) -> set[str]:
    """Messages whose local update the replica reports as durably stored by the relay."""
    pending = set(rep.session.pending_ids)
    return {mid for lid, mid in local_to_message.items() if lid not in pending}


def test_backoff_is_full_jitter_and_bounded() -> None:
    backoff = Backoff(initial=0.1, maximum=2.0, factor=2.0)
    rng = random.Random(7)
    for attempt in range(0, 80):
        ceiling = min(2.0, 0.1 * 2.0**attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(50)]
        assert all(0.0 <= d <= ceiling for d in delays)
    late = [backoff.delay(30, rng) for _ in range(2000)]
    assert max(late) > 1.8 and min(late) < 0.2  # spread over the whole window
    with pytest.raises(ValueError):
        Backoff(initial=0.0)
    with pytest.raises(ValueError):
        Backoff(initial=3.0, maximum=1.0)


def test_bad_room_and_url_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="room"):
        Replica("ws://127.0.0.1:1", "no/slashes", "t")
    with pytest.raises(ValueError, match="ws://"):
        Replica("http://127.0.0.1:1", "room", "t")


@pytest.mark.anyio
async def test_replicas_converge_and_see_each_other(relay: RelayProcess, tmp_path: Path) -> None:
    def open_replica(i: int, sub: str, device: str) -> Replica:
        return replica(relay, sub, tmp_path / f"{i}.db", presence={"user": sub, "device": device})

    async with open_replica(0, "ada", "laptop") as laptop, open_replica(2, "bob", "pc") as pc:
        async with open_replica(1, "ada", "phone") as phone:
            reps = [laptop, phone, pc]
            subs = ["ada", "ada", "bob"]
            for rep in reps:
                await rep.wait_until(lambda s: s.connected and s.synced, timeout=20)
            for round_ in range(5):
                for i, (rep, sub) in enumerate(zip(reps, subs, strict=True)):
                    say(rep.doc, sub, f"m{i}-{round_}", f"hello {round_} from {sub} ✓")
            expected = {f"m{i}-{r}" for i in range(3) for r in range(5)}
            for rep in reps:
                await wait_doc(rep.doc, lambda rep=rep: ids(rep.doc) == expected)
                status = await rep.wait_until(lambda s: s.durable and s.unsaved == 0, timeout=20)
                assert status.pending == 0 and status.connected
            # The same order everywhere (a CRDT, not just the same set).
            orders = {tuple(str(m["id"]) for m in messages(rep.doc)) for rep in reps}
            assert len(orders) == 1
            # Presence: everyone sees the others; ada's devices see each other as hers.
            for rep in reps:
                await rep.wait_for_peers(lambda peers: len(peers) == 2, timeout=20)
            assert [s["device"] for s in laptop.other_devices().values()] == ["phone"]
            assert pc.other_devices() == {}
            phone.set_presence(typing=True)
            await laptop.wait_for_peers(
                lambda peers: peers.get(phone.client_id, {}).get("typing") is True, timeout=20
            )
        # The phone left: it is gone from the others' presence.
        await laptop.wait_for_peers(lambda peers: phone.client_id not in peers, timeout=20)
        assert list(pc.peers) == [laptop.client_id]


@pytest.mark.anyio
async def test_pending_and_durable_follow_the_relay(relay: RelayProcess, tmp_path: Path) -> None:
    seen: list[ReplicaStatus] = []
    async with replica(relay, "ada", tmp_path / "a.db") as rep:
        rep.on_status(seen.append)
        await rep.wait_until(lambda s: s.synced, timeout=20)
        say(rep.doc, "ada", "m1", "first")
        # Counted at once, in the same tick as the edit.
        assert rep.status.pending == 1 and not rep.status.durable
        await rep.wait_until(lambda s: s.durable, timeout=20)
        assert any(s.pending == 1 for s in seen)

        relay.kill()
        await rep.wait_until(lambda s: not s.connected, timeout=20)
        for i in range(3):
            say(rep.doc, "ada", f"offline{i}", "written while the relay is down")
        status = await rep.wait_until(lambda s: s.unsaved == 0, timeout=20)
        assert status.pending == 3 and not status.durable and not status.connected
        with pytest.raises(TimeoutError):
            await rep.wait_until(lambda s: s.durable, timeout=0.3)

        relay.start()
        await rep.wait_until(lambda s: s.connected and s.durable, timeout=30)
    async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as observer:
        assert {"m1", "offline0", "offline1", "offline2"} <= set(
            str(m["id"]) for m in observer.messages
        )


@pytest.mark.anyio
async def test_offline_edits_survive_a_killed_process_and_merge(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """A replica process edits with no relay reachable and is SIGKILLed; a new process opens
    the same SQLite file, still counts the edits as pending, reconnects and merges them."""
    store = tmp_path / "ada.db"
    dead_port = _free_port()
    script = textwrap.dedent(
        f"""
        import anyio
        from pycrdt import Array, Map, Text
        from crdtchat.replica import Replica

        async def main():
            url = "ws://127.0.0.1:{dead_port}"
            async with Replica(url, {ROOM!r}, {token(ROOM, "writer", "ada")!r},
                               store_path={str(store)!r}) as rep:
                msgs = rep.doc.get("canonical.messages", type=Array)
                for i in range(5):
                    msgs.append(Map({{"id": f"offline{{i}}", "role": "user", "author": "ada",
                                     "parent": None, "created_at": 0.0,
                                     "content": Text(f"note {{i}}")}}))
                await rep.wait_until(lambda s: s.unsaved == 0 and s.pending == 5, timeout=20)
                print("saved", flush=True)
                await anyio.sleep_forever()

        anyio.run(main)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(30):
            line = await anyio.to_thread.run_sync(process.stdout.readline)
        assert line == "saved\n"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()

    async with replica(relay, "bob", tmp_path / "bob.db") as bob:
        await bob.wait_until(lambda s: s.synced, timeout=20)
        say(bob.doc, "bob", "b1", "meanwhile, online")
        await bob.wait_until(lambda s: s.durable, timeout=20)

        async with replica(relay, "ada", store) as ada:
            assert ada.status.pending == 5 and not ada.status.connected
            assert ids(ada.doc) == {f"offline{i}" for i in range(5)}
            await ada.wait_until(lambda s: s.synced and s.durable, timeout=30)
            await wait_doc(ada.doc, lambda: "b1" in ids(ada.doc))
            await wait_doc(bob.doc, lambda: ids(bob.doc) == ids(ada.doc))
            assert len(ids(ada.doc)) == 6


@pytest.mark.anyio
async def test_an_existing_conversation_document_syncs(relay: RelayProcess) -> None:
    """The lead's Conversation wrapper over the replica's document, both ways."""
    ada = Conversation.create(author="ada", title="plans")
    first = ada.append("user", "what should we build?")
    async with replica(relay, "ada", None, doc=ada.doc) as ada_rep:
        assert ada_rep.status.pending == 1  # what the document held before counts as ours
        await ada_rep.wait_until(lambda s: s.durable, timeout=20)
        bob = Conversation(author="bob")
        async with replica(relay, "bob", None, doc=bob.doc) as bob_rep:
            await bob_rep.wait_until(lambda s: s.synced, timeout=20)
            assert [m.content for m in bob.all_messages()] == ["what should we build?"]
            assert bob.title == "plans"
            bob.append("user", "a relay", parent=first.id)
            await wait_doc(ada.doc, lambda: len(ada.all_messages()) == 2)
            assert ada.all_messages()[1].author == "bob"


@pytest.mark.anyio
async def test_wait_until_rechecks_a_document_predicate_on_each_update(
    relay: RelayProcess,
) -> None:
    # Without a local file an update leaves the status as it was (`unsaved` stays 0), so
    # wait_until must wake for the update itself, not only for a status change.
    async with (
        replica(relay, "ada", None) as ada,
        replica(relay, "bob", None) as bob,
    ):
        for rep in (ada, bob):
            await rep.wait_until(lambda s: s.synced, timeout=20)
        say(ada.doc, "ada", "m1", "hello")
        status = await bob.wait_until(lambda _: ids(bob.doc) == {"m1"}, timeout=20)
        assert status.unsaved == 0


@pytest.mark.anyio
async def test_refused_writes_are_surfaced_and_stay_pending(relay: RelayProcess) -> None:
    denials: list[str] = []
    async with replica(relay, "ada", None, on_denied=denials.append) as rep:
        await rep.wait_until(lambda s: s.synced, timeout=20)
        say(rep.doc, "ada", "ok", "allowed")
        await rep.wait_until(lambda s: s.durable, timeout=20)
        # A writer may not write in someone else's name (design §4).
        say(rep.doc, "bob", "forged", "pretending to be bob")
        status = await rep.wait_until(lambda s: s.denied is not None, timeout=20)
        assert denials and denials[0] == status.denied
        assert status.pending == 1 and not status.durable
    async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as observer:
        assert [str(m["id"]) for m in observer.messages] == ["ok"]


@pytest.mark.anyio
async def test_a_refused_token_suspends_reconnecting_until_a_new_one(
    relay: RelayProcess,
) -> None:
    denials: list[str] = []
    wrong = token("another-room", "writer", "ada")
    async with Replica(base_url(relay), ROOM, wrong, backoff=FAST, on_denied=denials.append) as rep:
        status = await rep.wait_until(lambda s: s.rejected is not None, timeout=20)
        assert not status.connected and denials
        say(rep.doc, "ada", "m1", "kept until we may send it")
        rep.set_token(token(ROOM, "writer", "ada"))
        await rep.wait_until(lambda s: s.connected and s.durable, timeout=20)
        assert rep.status.rejected is None


@pytest.mark.anyio
async def test_closing_while_reconnecting_is_prompt(tmp_path: Path) -> None:
    slow = Backoff(initial=30.0, maximum=60.0)
    with anyio.fail_after(10):
        async with Replica(
            f"ws://127.0.0.1:{_free_port()}", ROOM, "t", backoff=slow, store_path=tmp_path / "r.db"
        ) as rep:
            say(rep.doc, "ada", "m1", "offline")
            await rep.wait_until(lambda s: s.unsaved == 0, timeout=5)
    async with Replica("ws://127.0.0.1:1", ROOM, "t", store_path=tmp_path / "r.db") as again:
        assert ids(again.doc) == {"m1"} and again.status.pending == 1


@pytest.mark.anyio
async def test_relay_sigkill_during_a_burst_loses_nothing_it_acknowledged(
    tmp_path: Path,
) -> None:
    """Many replicas write; the relay is SIGKILLed mid-burst and restarted. Everything any
    replica was told is durable is in the restarted relay before any replica reconnects, and
    afterwards all replicas converge on everything."""
    writers, per_writer = 6, 60
    relay = RelayProcess(tmp_path / "relay-data").start()
    try:
        stores = [tmp_path / f"w{i}.db" for i in range(writers)]
        local_to_message: list[dict[int, str]] = [{} for _ in range(writers)]
        told_durable: set[str] = set()
        killed = anyio.Event()

        async def burst(rep: Replica, i: int) -> None:
            for n in range(per_writer):
                message_id = f"w{i}-{n}"
                say(rep.doc, f"w{i}", message_id, f"burst {n}")
                local_to_message[i][rep.session.next_local_id - 1] = message_id
                await anyio.sleep(0.002 if n % 3 else 0)

        async with AsyncExitStack() as stack:
            reps = [
                await stack.enter_async_context(replica(relay, f"w{i}", stores[i]))
                for i in range(writers)
            ]
            for rep in reps:
                await rep.wait_until(lambda s: s.synced, timeout=20)

            def check_kill(_: ReplicaStatus) -> None:
                acked = sum(
                    len(durable_ids(rep, local_to_message[i])) for i, rep in enumerate(reps)
                )
                if acked >= writers * per_writer // 4 and not killed.is_set():
                    relay.kill()
                    killed.set()

            for rep in reps:
                rep.on_status(check_kill)
            async with anyio.create_task_group() as tg:
                for i, rep in enumerate(reps):
                    tg.start_soon(burst, rep, i)
            with anyio.fail_after(30):
                await killed.wait()
            for i, rep in enumerate(reps):
                await rep.wait_until(lambda s: not s.connected, timeout=20)
                told_durable |= durable_ids(rep, local_to_message[i])
        # Usually the kill lands mid-burst; on a loaded machine the relay may have acknowledged
        # everything first. Either way nothing acknowledged may be lost (asserted below).
        assert 0 < len(told_durable) <= writers * per_writer

        relay.start()
        async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as observer:
            stored = {str(m["id"]) for m in observer.messages}
        missing = told_durable - stored
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"

        everything = {f"w{i}-{n}" for i in range(writers) for n in range(per_writer)}
        async with AsyncExitStack() as stack:
            reps = [
                await stack.enter_async_context(replica(relay, f"w{i}", stores[i]))
                for i in range(writers)
            ]
            for rep in reps:
                await rep.wait_until(lambda s: s.durable and s.synced, timeout=60)
            for rep in reps:
                await wait_doc(rep.doc, lambda rep=rep: ids(rep.doc) == everything, timeout=60)
            orders = {tuple(str(m["id"]) for m in messages(rep.doc)) for rep in reps}
            assert len(orders) == 1
    finally:
        relay.stop()


@pytest.mark.anyio
async def test_presence_of_the_relay_sees_our_goodbye_on_close(relay: RelayProcess) -> None:
    async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as observer:
        async with replica(relay, "ada", None, presence={"user": "ada", "device": "tv"}) as rep:
            await observer.wait_for(
                lambda: (
                    rep.client_id in observer.awareness
                    and observer.awareness[rep.client_id][1] != "null"
                )
            )
            assert '"device":"tv"' in observer.awareness[rep.client_id][1]
        await observer.wait_for(lambda: observer.awareness[rep.client_id][1] == "null")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.anyio
async def test_an_error_in_the_body_reaches_the_caller_as_itself() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with Replica(f"ws://127.0.0.1:{_free_port()}", ROOM, "t"):
            raise KeyError("mine")


@pytest.mark.anyio
async def test_edits_reach_the_file_even_when_the_owner_is_cancelled(tmp_path: Path) -> None:
    store = tmp_path / "r.db"
    url = f"ws://127.0.0.1:{_free_port()}"
    with anyio.CancelScope() as scope:
        async with Replica(url, ROOM, "t", store_path=store) as rep:
            for i in range(50):
                say(rep.doc, "ada", f"m{i}", "typed just before the window closed")
            scope.cancel()
            await anyio.sleep_forever()
    async with Replica(url, ROOM, "t", store_path=store) as again:
        assert ids(again.doc) == {f"m{i}" for i in range(50)}
        assert again.status.pending == 50


@pytest.mark.anyio
async def test_a_resync_carrying_others_deletions_is_not_refused(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """Our SyncStep2 always holds the document's whole delete set, including what a worker
    deleted; after a reconnect the relay must take it (it changes nothing there)."""
    async with (
        Replica(base_url(relay), ROOM, token(ROOM, "worker", "bot"), backoff=FAST) as bot,
        replica(relay, "ada", tmp_path / "ada.db") as ada,
    ):
        await ada.wait_until(lambda s: s.synced, timeout=20)
        await bot.wait_until(lambda s: s.synced, timeout=20)
        leases = bot.doc.get("transport.leases", type=Map)
        leases["u1"] = {"holder": "bot", "turn_id": "u1~a1", "expires_at": 9e9}
        ada_leases = ada.doc.get("transport.leases", type=Map)
        await wait_doc(ada.doc, lambda: "u1" in ada_leases)
        del leases["u1"]
        await wait_doc(ada.doc, lambda: "u1" not in ada_leases)
        await bot.wait_until(lambda s: s.durable, timeout=20)

        relay.kill()
        await ada.wait_until(lambda s: not s.connected, timeout=20)
        say(ada.doc, "ada", "m1", "written while the relay was down")
        relay.start()
        status = await ada.wait_until(lambda s: s.synced and s.durable, timeout=30)
        assert status.denied is None
