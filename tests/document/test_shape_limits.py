"""The shape of stored values (design §7.1, issue 10 findings 1, 2 and 10).

A writer's value nested 20,000 shared types deep used to kill the relay (yrs renders it as JSON
by native recursion: SIGSEGV); the relay now refuses it before anything reads it, and keeps
serving every other room. The limits (depth, entries, value size) are checked by the structure
index as it resolves parents, so a write into a deleted type is judged by its root too.
Readers survive a document that holds such a value anyway: those cases run in a subprocess,
since a crash would take the test process with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pycrdt import Array, Doc, Map, Text

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.relay.livedoc import Accepted, LiveDoc, OverLimits, Refused, build_structure
from crdtchat.relay.store import Store
from crdtchat.schema import assistant_turn_id
from crdtchat.shape import MAX_READ_DEPTH, MAX_READ_ENTRIES, read_map
from crdtchat.structure import ShapeError, ShapeLimits
from crdtchat.updates import decode_update
from crdtchat.wire import SyncUpdate
from tests.support.relay import (
    REPO,
    RelayProcess,
    declare_roots,
    message_map,
    raw_client,
    running_relay,
    token,
)
from tests.support.replica import person, wait_for, watch_all
from tests.support.worker import WorkerProcess

DEEP = 20_000  # deep enough to overflow the native stack when rendered


def nest(top: Map, levels: int) -> None:
    """Hang a chain of `levels` Maps under key "k" of the integrated Map `top`."""
    current = top
    for _ in range(levels):
        inner: Map = Map()
        current["k"] = inner
        current = inner


def deep_message_update(msg_id: str, author: str, levels: int) -> bytes:
    """A user message whose Map has an extra key holding Maps nested `levels` deep."""
    doc: Doc = Doc()
    messages = declare_roots(doc)[schema.MESSAGES]
    with doc.transaction():
        messages.append(message_map(msg_id, "user", author, "look"))
        extra: Map = Map()
        messages[0]["extra"] = extra
        nest(extra, levels)
    return doc.get_update()


def deep_settings_update(levels: int) -> bytes:
    doc: Doc = Doc()
    settings = declare_roots(doc)[schema.SETTINGS]
    with doc.transaction():
        top: Map = Map()
        settings["x"] = top
        nest(top, levels)
    return doc.get_update()


# -- the limits, on the relay's document (in process: fast, exact boundaries) ---------------


def test_depth_limit_is_exact_and_judged_before_applying() -> None:
    live = LiveDoc(limits=ShapeLimits(depth=6))
    # message Map (1) > extra Map (2) > 4 more levels: 6 deep, at the limit
    assert isinstance(
        live.apply(deep_message_update("m1", "alice", 4), "writer", "alice"), Accepted
    )
    with pytest.raises(OverLimits, match=r"nested 7 deep in canonical\.messages"):
        live.apply(deep_message_update("m2", "alice", 5), "writer", "alice")
    with pytest.raises(OverLimits, match=r"nested 7 deep in canonical\.settings"):
        live.apply(deep_settings_update(6), "writer", "alice")
    assert [m["id"] for m in live.messages] == ["m1"]  # nothing of the refused ones


def test_depth_counts_through_types_written_in_earlier_updates() -> None:
    """A chain built one level per update is as deep as one built at once."""
    live = LiveDoc(limits=ShapeLimits(depth=3))
    doc: Doc = Doc()
    settings = declare_roots(doc)[schema.SETTINGS]
    current = settings
    for level in range(1, 5):
        before = doc.get_state()
        inner: Map = Map()
        current["k"] = inner
        current = inner
        update = doc.get_update(before)
        if level <= 3:
            assert isinstance(live.apply(update, "writer", "alice"), Accepted)
        else:
            with pytest.raises(OverLimits, match="nested 4 deep"):
                live.apply(update, "writer", "alice")


def test_value_size_and_entries_are_bounded() -> None:
    live = LiveDoc(limits=ShapeLimits(depth=8, entries=10, value_bytes=1000))
    doc: Doc = Doc()
    settings = declare_roots(doc)[schema.SETTINGS]
    settings["system"] = "x" * 900
    assert isinstance(live.apply(doc.get_update(), "writer", "a"), Accepted)
    before = doc.get_state()
    settings["system"] = "x" * 1100
    with pytest.raises(OverLimits, match=r"a value of \d+ bytes \(limit 1000\)"):
        live.apply(doc.get_update(before), "writer", "a")

    doc = Doc()
    tools = declare_roots(doc)[schema.TOOLS]
    with doc.transaction():
        tools["t"] = nested = Map()
        for n in range(11):
            nested[f"k{n}"] = n
    with pytest.raises(OverLimits, match="over 10 entries in one nested Map or Array"):
        live.apply(doc.get_update(), "writer", "a")


def test_a_stored_state_is_indexed_without_judging_but_known_to_be_too_deep() -> None:
    """A room stored before the limit loads; its depth is known, so readers are warned and
    nothing is written deeper below it."""
    limits = ShapeLimits(depth=8)
    state = deep_settings_update(40)
    index = build_structure(state, limits)
    assert index.too_deep() and index.deepest == 41
    assert not build_structure(deep_settings_update(7), limits).too_deep()
    live = LiveDoc(state, limits=limits)
    assert not live.shape_checked()
    with pytest.raises(ShapeError):
        index.check(decode_update(deep_settings_update(9)))


def test_a_write_into_a_deleted_type_is_judged_by_its_root() -> None:
    """Finding 10: the write raises no event (yrs drops it unseen), so the rules over events
    saw nothing; the structure index knows which root the deleted Map was under."""
    live = LiveDoc()
    writer: Doc = Doc()
    meta = declare_roots(writer)[schema.META]
    meta["note"] = Map({"a": 1})
    assert isinstance(live.apply(writer.get_update(), "writer", "alice"), Accepted)
    before_delete = writer.get_update()
    state = writer.get_state()
    del meta["note"]
    assert isinstance(live.apply(writer.get_update(state), "writer", "alice"), Accepted)

    worker: Doc = Doc()  # a peer that still has the Map, as if the deletion had not reached it
    worker_meta = declare_roots(worker)[schema.META]
    worker.apply_update(before_delete)
    state = worker.get_state()
    worker_meta["note"]["b"] = 2  # type: ignore[index]
    write = worker.get_update(state)
    outcome = live.apply(write, "worker", "w")
    assert outcome == Refused("a worker may not write canonical.meta")
    assert live.apply(write, "reader", "r") == Refused("a reader may not change the document")
    # the writer, who may write meta, makes the same invisible write: accepted as before
    assert isinstance(live.apply(write, "writer", "alice"), Accepted)


def test_a_map_root_read_around_a_deep_value_reads_as_str_renders_it() -> None:
    """Readers skip a value too deep to read and must still agree, byte for byte, with readers
    of the same root without it: pycrdt returns 3.0 and bytes where yrs's JSON has 3 and a
    list (the convergence machine found prefix hashes differing over this)."""
    plain: Doc = Doc()
    deep: Doc = Doc()
    for doc in (plain, deep):
        root = doc.get("m", type=Map)
        with doc.transaction():
            root.update({"i": 3, "f": 1.5, "b": b"\x00\x01", "n": None, "t": Text("hi")})
            root["a"] = Array([1, 2.0, {"y": 1e20, "z": 1e300, "bb": b"ab"}])
            root["fl"] = [1e16, 2.0]
    with deep.transaction():
        top = deep.get("m", type=Map)["deep"] = Map()
        nest(top, MAX_READ_DEPTH + 1)
    expected = json.loads(str(plain.get("m", type=Map)))
    assert read_map(plain.get("m", type=Map)) == (expected, {})
    values, too_deep = read_map(deep.get("m", type=Map))
    assert values == expected and list(too_deep) == ["deep"]


def test_readers_bound_the_size_of_what_they_walk() -> None:
    """A message holding a nested Array of 10,001 Maps: walking it would cost O(n²) (pycrdt
    reads an Array item by index), so it is skipped as too large, in bounded time."""
    source = Conversation.create(author="alice")
    source.append("user", "wide", message_id="m1")
    source.append("user", "fine", message_id="m2", parent=None)
    with source.doc.transaction():
        source.messages[0]["extra"] = Array([Map() for _ in range(MAX_READ_ENTRIES + 1)])
    opened = Conversation.from_update(source.encode_state(), author="bob")
    assert [m.id for m in opened.all_messages()] == ["m2"]
    [problem] = opened.problems()
    assert problem.key == 0 and f"more than {MAX_READ_ENTRIES} entries" in problem.reason


# -- through the relay subprocess ------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    args = ["--max-value-bytes", "65536"]
    with running_relay(Path(tmp_path_factory.mktemp("shape")) / "data", args) as process:
        yield process


@pytest.mark.anyio
async def test_deep_message_closes_only_its_connection_and_every_room_carries_on(
    relay: RelayProcess,
) -> None:
    """Finding 1: before, the relay died with SIGSEGV checking the message."""
    attack = deep_message_update("evil", "mallory", DEEP)
    async with (
        raw_client(relay.url("calm", token("calm", "writer", "bob"), ack=True)) as bystander,
        raw_client(relay.url("shared", token("shared", "writer", "alice"), ack=True)) as alice,
        raw_client(relay.url("shared", token("shared", "writer", "mallory"))) as mallory,
    ):
        await mallory.send(SyncUpdate(attack))
        code, reason = await mallory.wait_closed(timeout=60)
        assert code == 1008
        assert reason is not None and "update exceeds limits: shared types nested" in reason
        assert relay.proc is not None and relay.proc.poll() is None

        for client, text in ((bystander, "still here"), (alice, "and here")):
            await client.push(
                lambda doc, text=text: declare_roots(doc)[schema.MESSAGES].append(
                    message_map(text, "user", "bob" if text == "still here" else "alice", text)
                )
            )
            await client.wait_acked(timeout=30)
            assert client.denied == []

    async with raw_client(relay.url("shared", token("shared", "reader", "carol"))) as late:
        assert late.texts() == ["and here"]  # nothing of the refused message


@pytest.mark.anyio
async def test_deep_settings_and_oversized_values_are_refused_with_a_clear_reason(
    relay: RelayProcess,
) -> None:
    """Finding 2's way in (a deep value under canonical.settings, never read by the relay,
    was stored and poisoned every reader) is closed, and the value size is configurable."""
    room = "settings"
    url = relay.url(room, token(room, "writer", "mallory"))
    async with raw_client(url) as mallory:
        await mallory.send(SyncUpdate(deep_settings_update(DEEP)))
        code, reason = await mallory.wait_closed(timeout=60)
    assert code == 1008 and reason is not None and "nested" in reason
    async with raw_client(url) as mallory:
        await mallory.push(
            lambda doc: declare_roots(doc)[schema.SETTINGS].update({"s": "x" * 70_000})
        )
        code, reason = await mallory.wait_closed(timeout=30)
    assert code == 1008 and reason is not None and "(limit 65536)" in reason
    async with raw_client(relay.url(room, token(room, "reader", "carol"))) as late:
        assert dict(late.roots[schema.SETTINGS]) == {}


@pytest.mark.anyio
async def test_a_workers_write_into_a_deleted_meta_map_is_refused(relay: RelayProcess) -> None:
    """Finding 10, end to end: before, it was accepted and broadcast."""
    room = "deleted"
    async with raw_client(relay.url(room, token(room, "writer", "alice"), ack=True)) as alice:
        await alice.push(lambda doc: declare_roots(doc)[schema.META].update({"n": Map({"a": 1})}))
        await alice.wait_acked()
        async with raw_client(relay.url(room, token(room, "worker", "w"), ack=True)) as worker:
            stale: Doc = Doc()  # the worker's view from before the deletion
            stale_meta = declare_roots(stale)[schema.META]
            stale.apply_update(worker.doc.get_update())
            await alice.push(lambda doc: declare_roots(doc)[schema.META].pop("n"))
            await alice.wait_acked()
            state = stale.get_state()
            stale_meta["n"]["b"] = 2  # type: ignore[index]
            await worker.send(SyncUpdate(stale.get_update(state)))
            await worker.wait_for(lambda: bool(worker.denied), timeout=30)
            assert worker.denied == ["a worker may not write canonical.meta"]


@pytest.mark.anyio
async def test_a_room_stored_before_the_limit_is_served_and_written_to(tmp_path: Path) -> None:
    """A message nested 20,000 deep in a room stored before the limit (put in the relay's own
    store here): the relay loads it, its readers (the message-id index, the waiting feed, the
    permission check) skip it instead of dying, and writes to the room are judged as usual."""
    data = tmp_path / "data"
    data.mkdir()
    async with Store(data) as store:
        await store.append("old", 1, deep_message_update("m1", "alice", DEEP))
    with running_relay(data) as relay:
        url = relay.url("old", token("old", "writer", "alice"), ack=True)
        async with raw_client(url) as alice:
            await alice.push(
                lambda doc: declare_roots(doc)[schema.MESSAGES].append(
                    message_map("m2", "user", "alice", "after the limit")
                )
            )
            await alice.wait_acked(timeout=60)
            assert alice.denied == []
            await alice.push(
                lambda doc: declare_roots(doc)[schema.MESSAGES][0].update({"content": Text("edit")})
            )
            await alice.wait_for(lambda: bool(alice.denied), timeout=60)
            assert alice.denied == ["invalid message: value nested deeper than 64 shared types"]
        assert relay.proc is not None and relay.proc.poll() is None


# -- readers survive a document that holds such a value (subprocess: a crash is a failure) ---

READER_SCRIPT = """
import json, sys
from pycrdt import Map
from crdtchat.document import Conversation
from crdtchat.replica import _message_dicts
from crdtchat.relay.http import referenced_blobs

levels = int(sys.argv[1])

def nest(top):
    current = top
    for _ in range(levels):
        inner = Map(); current["k"] = inner; current = inner

source = Conversation.create(author="alice", title="poisoned")
source.set_settings(system="be brief")
source.set_tool("search", "find things", {"type": "object"})
source.append("user", "hello", message_id="m1")
source.append("user", "again", message_id="m2", parent=None)
with source.doc.transaction():
    for root in (source.settings_map, source.tools_map, source.meta, source.derived):
        root["deep"] = top = Map(); nest(top)
    source.messages[0]["extra"] = top = Map(); nest(top)
state = source.encode_state()

opened = Conversation.from_update(state, author="bob")
synced = Conversation(author="bob")
synced.apply_update(state)
out = []
for c in (opened, synced):
    out.append({
        "system": c.settings.system,
        "tools": sorted(c.tools),
        "title": c.title,
        "messages": [m.id for m in c.all_messages()],
        "problems": sorted((p.root, str(p.key)) for p in c.problems()),
        "derived": len(c.derived_entries()),
        "waiting": [w.message.id for w in c.waiting_for_reply()],
        # the relay's blob scoping and the replica's recovery read the array too
        "blobs": sorted(referenced_blobs(c.messages)),
        "dicts": [m.get("id") for m in _message_dicts(c.doc)],
    })
print(json.dumps(out))
"""


def test_readers_report_and_skip_a_value_too_deep_to_read() -> None:
    """Finding 2: settings, tools, meta, derived and messages of a poisoned document are read
    (opened from bytes and synced in), the deep values reported as problems."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(READER_SCRIPT), str(DEEP)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    for reading in json.loads(done.stdout):
        assert reading["system"] == "be brief"
        assert reading["tools"] == ["search"]
        assert reading["title"] == "poisoned"
        assert reading["messages"] == ["m2"]  # m1 holds the deep value: reported, skipped
        assert reading["waiting"] == ["m2"]
        assert reading["derived"] == 0
        assert reading["blobs"] == [] and reading["dicts"] == ["m2"]
        assert reading["problems"] == [
            ["canonical.messages", "0"],
            ["canonical.meta", "deep"],
            ["canonical.settings", "deep"],
            ["canonical.tools", "deep"],
            ["derived.entries", "deep"],
        ]


# -- the worker serves every other room when one holds such a value -----------------------


@pytest.mark.anyio
async def test_worker_serving_every_room_answers_beside_a_poisoned_one(tmp_path: Path) -> None:
    """Finding 2: a `crdtchat worker` serving '*' died reading a deep settings value, on every
    restart, so no room was answered. The relay runs with the depth check off (`--max-depth
    0`), as one from before the limit, or a relay that is not ours, would have stored it."""
    with (
        running_relay(tmp_path / "data", ["--max-depth", "0"]) as relay,
        OpenAILoopback() as model,
    ):
        base = f"ws://127.0.0.1:{relay.port}"
        worker = WorkerProcess("worker-1", relay.ws_base, model.base_url, tmp_path)
        async with person(base, "poisoned", "alice") as alice, person(base, "fine", "bob") as bob:
            with alice.doc.transaction():
                alice.settings_map["deep"] = top = Map()
                nest(top, DEEP)
            poisoned_question = alice.append("user", "first, the poisoned room")
            worker.start()
            try:
                fine_question = bob.append("user", "and a fine room")
                for conversation, question in ((alice, poisoned_question), (bob, fine_question)):
                    answer_id = assistant_turn_id(question.id, 1)
                    await wait_for(
                        lambda c=conversation, a=answer_id: c.view.get(a) is not None,
                        watch_all(conversation),
                        90,
                    )
                    assert conversation.message(answer_id).status == "complete"
                assert worker.proc is not None and worker.proc.poll() is None
                problems = [(p.root, p.key) for p in alice.problems()]
                assert problems == [(schema.SETTINGS, "deep")]
            finally:
                worker.stop()


TUI_SCRIPT = """
import json, sys
import anyio
from pycrdt import Map
from crdtchat.document import Conversation
from crdtchat.tui.app import ChatApp
from crdtchat.tui.link import DetachedLink
from crdtchat.tui.widgets import Line, ThreadView

levels = int(sys.argv[1])
source = Conversation.create(author="alice")
source.set_settings(provider="openai", model="gpt-test")
source.append("user", "poisoned", message_id="m1")
source.append("user", "readable", message_id="m2", parent=None)
with source.doc.transaction():
    for target in (source.settings_map, source.messages[0]):
        target["deep"] = current = Map()
        for _ in range(levels):
            inner = Map(); current["k"] = inner; current = inner
conversation = Conversation.from_update(source.encode_state(), author="alice")

async def main():
    app = ChatApp(conversation, DetachedLink(conversation.doc), room="r", device="laptop")
    async with app.run_test() as pilot:
        await pilot.pause()
        texts = app.query_one("#thread", ThreadView).texts()
        header = app.query_one("#header", Line).text
        print(json.dumps({"texts": texts, "header": header, "running": app.is_running}))

anyio.run(main)
"""


def test_the_terminal_client_shows_what_it_can_read_of_a_poisoned_conversation() -> None:
    """Finding 2, the TUI: it opens the conversation and shows the readable message and the
    settings; the message nested too deeply is skipped (a problem), never a crash."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TUI_SCRIPT), str(DEEP)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    assert shown["running"]
    assert len(shown["texts"]) == 1 and shown["texts"][0].endswith("readable")
    assert "openai/gpt-test" in shown["header"]
