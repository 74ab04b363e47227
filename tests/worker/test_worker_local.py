"""The worker with the embedded local model (real SmolLM2 via llama-cpp-python).

The provider ignores whatever the shared llama.cpp context still holds
(`reuse_live_state=False`), so any prompt tokens a turn does not evaluate were restored from
the `kv_checkpoint` entry the previous turn left in the document: that is the derived state
under test. Replies are kept short through the conversation's `params.max_tokens`; the module
takes a few seconds once the model is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

pytest.importorskip("llama_cpp")

from crdtchat.document import Conversation
from crdtchat.kvcache import KVCheckpointStore
from crdtchat.providers.base import ProviderError
from crdtchat.providers.local import DEFAULT_MODEL, LocalProvider, find_smollm2_gguf
from crdtchat.schema import DerivedEntry, DerivedKind, Message
from crdtchat.worker.room import ProviderPool, RoomSettings, serve_room
from crdtchat.worker.turn import TurnSettings
from tests.support import REPO

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(60)]

SYSTEM = "You are a concise assistant. Answer in one short sentence."
ONCE = RoomSettings(idle_after=0.0, turn=TurnSettings(flush_interval=0.05))


@pytest.fixture
def provider(tmp_path: Path) -> LocalProvider:
    try:
        find_smollm2_gguf()
    except ProviderError as exc:  # the `local` extra is optional
        pytest.skip(f"local model not installed: {exc}")
    # One thread: on a busy machine llama.cpp's threads wait on each other, not on work.
    return LocalProvider(
        kv_store=KVCheckpointStore(tmp_path / "kv"), reuse_live_state=False, n_threads=1
    )


def local_pool(provider: LocalProvider) -> ProviderPool:
    return ProviderPool("local", make=lambda name, *, model: provider)


def peers() -> tuple[Conversation, Conversation]:
    person = Conversation.create(author="alice")
    person.set_settings(system=SYSTEM, params={"max_tokens": 8})
    return person, Conversation(person.doc, author="worker-1")


async def ask(person: Conversation, worker: Conversation, pool: ProviderPool, text: str) -> Message:
    question = person.append("user", text)
    with anyio.fail_after(30):
        assert await serve_room(worker, pool, room="local", settings=ONCE) == 1
    [reply] = person.assistant_answers(question.id)
    return reply


def only(conversation: Conversation, message_id: str, kind: DerivedKind) -> DerivedEntry:
    [entry] = [
        e
        for e in conversation.derived_entries().values()
        if e.message_id == message_id and e.kind == kind
    ]
    return entry


def assert_answered(reply: Message) -> None:
    """A real answer: text, and either finished or stopped by the small max_tokens."""
    assert reply.content.strip()
    assert reply.model is not None and reply.model.provider == "local"
    assert reply.model.model == DEFAULT_MODEL
    if reply.status == "incomplete":
        assert reply.error == "stopped at max_tokens (8)"
    else:
        assert reply.status == "complete"


async def test_turn_two_evaluates_only_what_the_first_turns_checkpoint_lacks(
    provider: LocalProvider,
) -> None:
    person, worker = peers()
    pool = local_pool(provider)

    first = await ask(person, worker, pool, "What colour is the sky?")
    assert_answered(first)
    usage1 = only(person, first.id, "usage").data
    assert usage1["cached_input_tokens"] == 0  # nothing to start from: a full prefill
    checkpoint = only(person, first.id, "kv_checkpoint")
    assert checkpoint.prefix_hash == person.prefix_hash(first.id)
    assert checkpoint.data["n_tokens"] >= usage1["input_tokens"]  # prompt plus its answer
    assert provider.kv_store is not None
    assert (provider.kv_store.directory / checkpoint.data["ref"]).is_file()

    second = await ask(person, worker, pool, "And at night?")
    assert_answered(second)
    usage2 = only(person, second.id, "usage").data
    # All of turn 1's prompt came back from the checkpoint; only the rest was evaluated.
    assert usage2["cached_input_tokens"] >= usage1["input_tokens"]
    assert usage2["cached_input_tokens"] < usage2["input_tokens"]
    assert only(person, second.id, "kv_checkpoint").data["ref"] != checkpoint.data["ref"]


async def test_after_discarding_derived_state_the_next_turn_still_answers_by_full_prefill(
    provider: LocalProvider,
) -> None:
    person, worker = peers()
    pool = local_pool(provider)
    await ask(person, worker, pool, "Name a fruit.")
    person.discard_all_derived()
    assert person.derived_entries() == {}

    reply = await ask(person, worker, pool, "Name another one.")

    assert_answered(reply)
    usage = only(person, reply.id, "usage").data
    assert usage["cached_input_tokens"] == 0  # nothing reused: the whole thread evaluated
    assert usage["input_tokens"] > 0
    # and it leaves a checkpoint again, so the turn after it is cheap once more
    only(person, reply.id, "kv_checkpoint")
    third = await ask(person, worker, pool, "And a vegetable?")
    assert only(person, third.id, "usage").data["cached_input_tokens"] >= usage["input_tokens"]


async def test_a_stale_checkpoint_after_an_edit_is_dropped_not_used(
    provider: LocalProvider,
) -> None:
    person, worker = peers()
    pool = local_pool(provider)
    first = await ask(person, worker, pool, "Name a colour.")
    stale_key = next(
        key for key, e in person.derived_entries().items() if e.kind == "kv_checkpoint"
    )
    person.edit_text(person.current_thread()[0].id, "Name a number.")  # rule 1 now fails

    reply = await ask(person, worker, pool, "Why that one?")

    assert_answered(reply)
    assert stale_key not in person.derived_entries()  # the worker deleted it
    assert only(person, reply.id, "usage").data["cached_input_tokens"] == 0
    assert first.id in {m.id for m in person.current_thread()}


def checkpoints(conversation: Conversation) -> dict[str, DerivedEntry]:
    """kv_checkpoint entries by the id of the message they belong to."""
    return {
        e.message_id: e
        for e in conversation.derived_entries().values()
        if e.kind == "kv_checkpoint"
    }


async def test_only_the_last_checkpoint_of_each_live_branch_is_kept_within_the_byte_limit(
    tmp_path: Path, provider: LocalProvider
) -> None:
    person, worker = peers()
    pool = local_pool(provider)
    store = provider.kv_store
    assert store is not None

    first = await ask(person, worker, pool, "Name a colour.")
    size = only(person, first.id, "usage").data["kv_checkpoint_bytes"]
    assert size == store.total_bytes() > 0  # reported per turn, in the usage entry

    second = await ask(person, worker, pool, "And another one?")
    # Turn 2 resumed from turn 1's checkpoint, which nothing can use any more: its entry and
    # its file are gone, leaving one checkpoint, the newest on the only branch.
    assert only(person, second.id, "usage").data["cached_input_tokens"] > 0
    assert set(checkpoints(person)) == {second.id}
    assert [p.name for p, _ in store.files()] == [checkpoints(person)[second.id].data["ref"]]
    # A checkpoint's size grows with its tokens (~14 kB per token here). From now on the limit
    # holds turn 2's checkpoint and half of turn 1's: never two of them.
    store.max_bytes = store.total_bytes() + size // 2

    # A second branch, from turn 1's answer: nearest checkpoint gone, so a full prefill.
    branch = person.append("user", "Name a fruit instead.", parent=first.id)
    with anyio.fail_after(30):
        assert await serve_room(worker, pool, room="local", settings=ONCE) == 1
    [other] = person.assistant_answers(branch.id)
    assert_answered(other)
    assert only(person, other.id, "usage").data["cached_input_tokens"] == 0
    # Both branches keep their last checkpoint entry, but the byte limit holds one file: the
    # least recently used one (turn 2's) was evicted to make room.
    assert set(checkpoints(person)) == {second.id, other.id}
    assert [p.name for p, _ in store.files()] == [checkpoints(person)[other.id].data["ref"]]
    assert store.total_bytes() <= store.max_bytes

    # Back on the first branch: its checkpoint file is gone, the turn still answers in full.
    third = person.append("user", "Why that one?", parent=second.id)
    with anyio.fail_after(30):
        assert await serve_room(worker, pool, room="local", settings=ONCE) == 1
    [reply] = person.assistant_answers(third.id)
    assert_answered(reply)
    assert only(person, reply.id, "usage").data["cached_input_tokens"] == 0
    assert other.id in checkpoints(person)  # still the last one of a live branch
    assert second.id not in checkpoints(person) or reply.id not in checkpoints(person)
    assert store.total_bytes() <= store.max_bytes


def test_a_full_read_only_or_failing_checkpoint_directory_never_fails_a_turn(
    tmp_path: Path,
) -> None:
    """A real tmpfs in a private mount namespace (root only): it fills up, goes read-only,
    comes back, refuses to create files (EPERM), and comes back again (tests/support/kv_disk.py)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs")
    try:
        find_smollm2_gguf()
    except ProviderError as exc:
        pytest.skip(f"local model not installed: {exc}")
    directory = tmp_path / "kv"
    directory.mkdir()
    script = 'mount -t tmpfs -o size=64m tmpfs "$1" && exec "$2" -m tests.support.kv_disk "$1"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(directory), sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    turns = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(turns) == 7
    for turn in turns:  # every turn answered, whatever the disk did
        assert turn["committed"] == 1 and turn["text"].strip()
        assert turn["status"] in ("complete", "incomplete")
    first, second, third, fourth, fifth, sixth, seventh = turns
    assert first["checkpoint"] and len(first["files"]) == 1
    # ENOSPC: the old checkpoint was evicted (it was superseded anyway) and the write retried.
    assert second["cached"] > 0 and second["checkpoint"]
    assert len(second["files"]) == 1 and second["files"] != first["files"]
    assert second["sizes"][0] > first["sizes"][0]
    # Full even after evicting everything: no checkpoint, and the answer is there all the same.
    assert third["cached"] > 0 and not third["checkpoint"] and third["files"] == []
    # Read-only: no checkpoint to resume from, a full prefill, no checkpoint written.
    assert fourth["cached"] == 0 and not fourth["checkpoint"]
    # Writable again: the next turn writes a checkpoint, nobody restarted anything.
    assert fifth["checkpoint"] and len(fifth["files"]) == 1
    # EPERM on create: the turn answers from the earlier checkpoint and writes none.
    assert sixth["cached"] > 0 and not sixth["checkpoint"] and sixth["files"] == fifth["files"]
    # Cleared: checkpoints again, resuming from the one of two turns before.
    assert seventh["cached"] > 0 and seventh["checkpoint"]
    # Every failed save is logged (turns 3, 4 and 6), not only noted in the usage entry.
    assert done.stderr.count("KV checkpoint not saved") == 3, done.stderr[-2000:]


async def test_a_regenerated_answer_resumes_from_the_checkpoint_of_the_first_answer(
    provider: LocalProvider,
) -> None:
    # Only the last checkpoint of a branch is kept, so the one of the turn before is gone;
    # the first answer's checkpoint holds the whole prompt of the second answer.
    person, worker = peers()
    pool = local_pool(provider)
    first = await ask(person, worker, pool, "Name a colour.")
    [question] = [m for m in person.current_thread() if m.role == "user"]
    person.request_regeneration(question.id)

    with anyio.fail_after(30):
        assert await serve_room(worker, pool, room="local", settings=ONCE) == 1

    [_, again] = person.assistant_answers(question.id)
    assert_answered(again)
    usage = only(person, again.id, "usage").data
    assert usage["cached_input_tokens"] == usage["input_tokens"] - 1  # all but the last token
    # Both answers are leaves now: each keeps its checkpoint.
    assert set(checkpoints(person)) == {first.id, again.id}
