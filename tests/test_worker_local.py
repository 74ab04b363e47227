"""The worker with the embedded local model (real SmolLM2 via llama-cpp-python).

The provider ignores whatever the shared llama.cpp context still holds
(`reuse_live_state=False`), so any prompt tokens a turn does not evaluate were restored from
the `kv_checkpoint` entry the previous turn left in the document: that is the derived state
under test. Replies are kept short through the conversation's `params.max_tokens`; the module
takes a few seconds once the model is loaded.
"""

from __future__ import annotations

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
