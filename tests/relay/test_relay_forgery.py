"""Nobody rewrites what others said or asks in their name, through a real relay subprocess
(issue 10, findings 3, 8 and 9; design §7.2): a message that would shadow another by its id,
an answer id taken in advance, read marks and requests in someone else's name, and room names
that only match up to a final newline. Each attack is refused to its sender while the relay
keeps serving another room, and a legitimate `Conversation` on the same relay is never refused.

The rules themselves are unit-tested in test_message_ids.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pycrdt import Map
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.kvcache import CheckpointRef, CheckpointUnavailable
from crdtchat.relay.blobs import BlobStore, HttpRefusal
from crdtchat.schema import ROOM_NAME, FileRef
from crdtchat.tokens import mint_token
from crdtchat.wire import SyncUpdate
from tests.support.relay import (
    REPO,
    SECRET,
    RawClient,
    RelayProcess,
    message_map,
    raw_client,
    running_relay,
    token,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with running_relay(Path(tmp_path_factory.mktemp("forgery")) / "data") as process:
        yield process


def url(relay: RelayProcess, room: str, sub: str, role: str = "writer") -> str:
    return relay.url(room, token(room, role, sub), ack=True)


class Bystanders:
    """Two peers of another room: after every attack, the relay must still serve them."""

    def __init__(self, writer: RawClient, reader: RawClient) -> None:
        self.writer, self.reader, self.sent = writer, reader, 0

    async def still_served(self) -> None:
        self.sent += 1
        marker = f"still-{self.sent}"
        await self.writer.push(
            lambda doc: self.writer.messages.append(message_map(marker, "user", "carol", "hi"))
        )
        await self.reader.wait_for(lambda: marker in [m["id"] for m in self.reader.messages])


@asynccontextmanager
async def bystanders(relay: RelayProcess, room: str) -> AsyncIterator[Bystanders]:
    async with (
        raw_client(url(relay, room, "carol")) as writer,
        raw_client(url(relay, room, "dave", "reader")) as reader,
    ):
        watch = Bystanders(writer, reader)
        await watch.still_served()
        yield watch


async def attempt(
    relay: RelayProcess, room: str, sub: str, role: str, change: Callable[[RawClient], None]
) -> str:
    """Make `change` as `sub` on a fresh connection; the relay's reason for refusing it."""
    async with raw_client(url(relay, room, sub, role)) as client:
        await client.push(lambda doc: change(client))
        await client.wait_for(lambda: bool(client.denied))
        await client.wait_acked()
        assert not client.closed  # refused, not thrown out
        return client.denied[0]


def insert(position: int, item: Map) -> Callable[[RawClient], None]:
    return lambda client: client.messages.insert(position, item)


def reading(client: RawClient) -> Conversation:
    return Conversation(client.doc, author="reader")


async def test_a_message_cannot_shadow_another_nor_take_an_answer_in_advance(
    relay: RelayProcess,
) -> None:
    room = "shadowing"
    async with (
        bystanders(relay, "shadowing-others") as others,
        raw_client(url(relay, room, "alice")) as alice,
        raw_client(url(relay, room, "viewer", "reader")) as viewer,
    ):
        await alice.push(
            lambda doc: alice.messages.append(message_map("q1", "user", "alice", "my question"))
        )
        await viewer.wait_for(lambda: len(viewer.messages) == 1)

        # mallory reuses alice's id, before it and after it
        for position in (0, 1):
            forged = message_map("q1", "user", "mallory", "mallory's words")
            reason = await attempt(relay, room, "mallory", "writer", insert(position, forged))
            assert "taken" in reason
            await others.still_served()
        # ... takes the id alice's answer will get
        forged = message_map("q1~a1", "user", "mallory", "no answer for you", "q1")
        reason = await attempt(relay, room, "mallory", "writer", insert(1, forged))
        assert "form of an answer to 'q1'" in reason
        await others.still_served()
        # a worker cannot take alice's id either, nor answer under another answer's id
        forged = message_map("q1", "assistant", "w9", "a worker's words")
        reason = await attempt(relay, room, "w9", "worker", insert(0, forged))
        assert "taken" in reason
        await others.still_served()

        # The designed case: two workers commit the same turn, concurrently. Both are kept, and
        # readers show one answer.
        async with (
            raw_client(url(relay, room, "w1", "worker")) as w1,
            raw_client(url(relay, room, "w2", "worker")) as w2,
        ):
            updates = []
            for worker, sub in ((w1, "w1"), (w2, "w2")):
                before = worker.doc.get_state()
                worker.messages.append(message_map("q1~a1", "assistant", sub, f"{sub}'s", "q1"))
                updates.append((worker, worker.doc.get_update(before)))
            for worker, update in updates:
                await worker.send(SyncUpdate(update))
            for worker, _update in updates:
                await worker.wait_acked()
                assert worker.denied == []
        await viewer.wait_for(lambda: len(viewer.messages) == 3)
        view = reading(viewer)
        assert view.message("q1").content == "my question"
        assert len(view.assistant_answers("q1")) == 1
        await others.still_served()

    # Late joiners, after a SIGKILL, read alice's question as she wrote it.
    relay.restart()
    async with raw_client(url(relay, room, "late", "reader")) as late:
        view = reading(late)
        assert view.message("q1").content == "my question"
        assert view.message("q1").author == "alice"
        assert [p.reason for p in view.problems()] == ["duplicate id 'q1~a1'"]


async def test_read_marks_and_requests_only_in_ones_own_name(relay: RelayProcess) -> None:
    room = "in-my-name"
    async with (
        bystanders(relay, "in-my-name-others") as others,
        raw_client(url(relay, room, "alice")) as alice,
    ):
        # alice's client, through the Conversation API: every write of hers goes through.
        conversation = Conversation(alice.doc, author="alice", role="writer")
        await alice.push(lambda doc: conversation.append("user", "hi", message_id="q1"))
        await alice.push(lambda doc: conversation.mark_read("q1"))
        await alice.push(lambda doc: conversation.request_cancel("q1~a1"))
        await alice.push(lambda doc: conversation.request_regeneration("q1"))
        await alice.wait_acked()
        assert alice.denied == []

        forgeries: list[Callable[[RawClient], None]] = [
            lambda c: c.roots[schema.READ].__setitem__("alice", "q1"),
            lambda c: c.roots[schema.READ].__setitem__("alice/phone", "q1"),
            lambda c: c.roots[schema.CANCEL].__setitem__("q1~a1", {"by": "alice", "at": 1.0}),
            lambda c: c.roots[schema.REGENERATE].__setitem__(
                "q1", {"n": 3, "by": "alice", "at": 1.0}
            ),
        ]
        for forge in forgeries:
            reason = await attempt(relay, room, "mallory", "writer", forge)
            assert "own entry 'mallory'" in reason or "by = its subject 'mallory'" in reason
            await others.still_served()
        # In one's own name it goes through.
        async with raw_client(url(relay, room, "mallory")) as mallory:
            mine = Conversation(mallory.doc, author="mallory", role="writer")
            await mallory.push(lambda doc: mine.mark_read("q1"))
            await mallory.push(lambda doc: mine.request_regeneration("q1"))
            await mallory.wait_acked()
            assert mallory.denied == []
        await alice.wait_for(
            lambda: (
                conversation.read_mark("mallory") == "q1"
                and conversation.regenerate_requests()["q1"].by == "mallory"
            )
        )
        assert conversation.read_mark() == "q1"
        assert conversation.cancels.to_py()["q1~a1"]["by"] == "alice"
        await others.still_served()


async def test_a_room_name_with_a_final_newline_is_refused(relay: RelayProcess) -> None:
    """`/abc%0A` was room "abc\\n", a room of its own, for a token of every room."""
    everywhere = mint_token(SECRET, "*", "writer", "mallory", 3600)
    async with bystanders(relay, "abc") as others:
        for path in ("/abc%0A", "/abc%0D%0A", "/%0A", "/abc%00"):
            with pytest.raises(InvalidStatus) as caught:
                async with connect(f"ws://{relay.host}:{relay.port}{path}?token={everywhere}"):
                    pass
            assert caught.value.response.status_code == 400, path
            await others.still_served()
        async with raw_client(relay.url("abc", everywhere)) as same:
            assert [m["id"] for m in same.messages] == [f"still-{n}" for n in range(1, 6)]


# -- full matches elsewhere (finding 8) ----------------------------------------------------------


def test_full_matches_for_room_names_blob_hashes_and_checkpoint_refs(tmp_path: Path) -> None:
    digest = "ab" * 32
    assert ROOM_NAME.fullmatch("abc") and ROOM_NAME.match("abc")
    for name in ("abc\n", "abc\r\n", "\nabc", "ab c", "", "a" * 129):
        assert not ROOM_NAME.match(name), repr(name)
        with pytest.raises(ValueError, match="invalid room name"):
            mint_token(SECRET, name, "writer", "mallory", 60)
    store = BlobStore(tmp_path, 1000)
    assert store.path_for(digest).name == digest
    for bad in (digest + "\n", digest.upper(), digest[:-1]):
        with pytest.raises(HttpRefusal):
            store.path_for(bad)
    # pydantic's patterns use Rust's regex, where "$" is the end of the text: checked anyway
    with pytest.raises(ValidationError):
        FileRef(sha256=digest + "\n", name="a", mime="text/plain", size=1)
    good = {"ref": f"{digest}.kv", "n_tokens": 3, "sha256": digest}
    assert CheckpointRef.from_data(good).ref == f"{digest}.kv"
    with pytest.raises(CheckpointUnavailable, match="not a checkpoint file name"):
        CheckpointRef.from_data({**good, "ref": f"{digest}.kv\n"})


def test_the_token_command_mints_no_token_for_a_name_with_a_newline() -> None:
    env = {**os.environ, "CRDTCHAT_SECRET": SECRET}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "crdtchat.cli",
            "token",
            "--room",
            "abc\n",
            "--role",
            "writer",
            "--sub",
            "mallory",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    assert "invalid room name" in done.stderr
