"""The worker's turn logic on in-process documents: lease, stream, commit, cancel, takeover.

The provider here is a scripted stand-in for a model (the external boundary), so these tests
pin down the worker's own behaviour; the real providers are tested against loopback servers
and the local model elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from crdtchat.document import Conversation
from crdtchat.providers.base import (
    Finished,
    NewDerived,
    ProviderError,
    TextDelta,
    ToolCallDone,
    TurnEvent,
    TurnRequest,
    Usage,
)
from crdtchat.schema import ToolCall, assistant_turn_id
from crdtchat.worker.room import ProviderPool, RoomSettings, serve_room
from crdtchat.worker.titles import fallback_title, title_of
from crdtchat.worker.turn import Changes, TurnSettings, serve_turn

pytestmark = pytest.mark.anyio


class ScriptedModel:
    """Yields the pieces it is given; blocks after them if `hang` until cancelled."""

    name = "scripted"
    api = "test"

    def __init__(self, pieces: list[str], *, hang: anyio.Event | None = None) -> None:
        self.pieces = pieces
        self.hang = hang
        self.requests: list[TurnRequest] = []
        self.started = anyio.Event()

    async def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        self.requests.append(request)
        self.started.set()
        for piece in self.pieces:
            yield TextDelta(piece)
        if self.hang is not None:
            await self.hang.wait()
        last = request.thread[-1]
        if "tool" in last.content and last.role == "user":
            yield ToolCallDone(ToolCall(id="call-1", name="clock", arguments="{}"))
        yield Finished(
            status="complete",
            usage=Usage(input_tokens=len(request.thread), output_tokens=len(self.pieces)),
            derived=[NewDerived(kind="provider_state", data={"response_id": "r1"})],
        )


def sync(a: Conversation, b: Conversation) -> None:
    a_missing = b.update_since(a.state_vector())
    b_missing = a.update_since(b.state_vector())
    a.apply_update(a_missing)
    b.apply_update(b_missing)


async def test_turn_streams_then_commits_with_usage_and_provider_state() -> None:
    person = Conversation.create(author="alice")
    question = person.append("user", "hello")
    worker = Conversation(person.doc, author="worker-1")
    model = ScriptedModel(["Hel", "lo ", "there"])
    [waiting] = worker.waiting_for_reply()

    message = await serve_turn(worker, waiting, model, model="m", changes=Changes())

    assert message is not None
    assert message.id == assistant_turn_id(question.id, 1)
    assert (message.content, message.status, message.author) == (
        "Hello there",
        "complete",
        "worker-1",
    )
    assert worker.streams_in_flight() == {}
    assert worker.lease(question.id) is None
    kinds = {entry.kind for entry in worker.derived_entries().values()}
    assert kinds == {"usage", "provider_state", "title"}  # the first reply names it
    assert worker.waiting_for_reply() == []


async def test_streamed_text_is_visible_before_the_commit() -> None:
    person = Conversation.create(author="alice")
    person.append("user", "hello")
    worker = Conversation(person.doc, author="worker-1")
    release = anyio.Event()
    model = ScriptedModel(["partial ", "text"], hang=release)
    [waiting] = worker.waiting_for_reply()
    changes = Changes()
    streamed = Changes()
    person.streams.observe_deep(streamed.notify)
    seen: list[str] = []

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: serve_turn(
                worker,
                waiting,
                model,
                model="m",
                changes=changes,
                settings=TurnSettings(flush_interval=0.01),
            )
        )
        with anyio.fail_after(5):
            while person.stream_text(waiting.turn_id) != "partial text":
                await streamed.wait()
        seen.append(person.stream_text(waiting.turn_id) or "")
        assert person.view.get(waiting.turn_id) is None
        release.set()
    assert seen == ["partial text"]
    assert person.message(waiting.turn_id).content == "partial text"


async def test_cancel_request_commits_partial_text_as_cancelled() -> None:
    person = Conversation.create(author="alice")
    person.append("user", "write forever")
    worker = Conversation(person.doc, author="worker-1")
    model = ScriptedModel(["one ", "two "], hang=anyio.Event())  # never released
    [waiting] = worker.waiting_for_reply()
    changes = Changes()
    worker.cancels.observe(changes.notify)
    result = []

    async def run() -> None:
        result.append(await serve_turn(worker, waiting, model, model="m", changes=changes))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await model.started.wait()
            person.request_cancel(waiting.turn_id)
    [message] = result
    assert message is not None
    assert (message.status, message.content) == ("cancelled", "one two ")
    assert not person.cancel_requested(waiting.turn_id)


async def test_live_lease_is_respected_and_expired_lease_is_taken_over() -> None:
    now = [1000.0]
    person = Conversation.create(author="alice", clock=lambda: now[0])
    question = person.append("user", "hi")
    dead = Conversation(person.doc, author="worker-dead", clock=lambda: now[0])
    [waiting] = dead.waiting_for_reply()
    assert dead.claim_lease(question.id, waiting.turn_id, holder="worker-dead", ttl=30)
    dead.start_stream(waiting.turn_id, parent=question.id)
    dead.append_stream(waiting.turn_id, "half an ans")

    alive = Conversation(person.doc, author="worker-2", clock=lambda: now[0])
    model = ScriptedModel(["full answer"])
    assert await serve_turn(alive, waiting, model, model="m", changes=Changes()) is None
    assert model.requests == []

    now[0] += 31
    message = await serve_turn(alive, waiting, model, model="m", changes=Changes())
    assert message is not None and message.content == "full answer"
    assert person.streams_in_flight() == {}


async def test_a_turn_whose_lease_goes_to_another_worker_stops_and_leaves_the_reply() -> None:
    """Two workers can both pass the claim before their claims cross; once the lease names
    the other (or ours expired and was taken over), this turn stops streaming at its next
    renewal and commits nothing: one turn streams into the reply, not two."""
    person = Conversation.create(author="alice")
    question = person.append("user", "hi")
    worker = Conversation(person.doc, author="worker-1")
    [waiting] = worker.waiting_for_reply()
    model = ScriptedModel(["a long ", "answer"], hang=anyio.Event())  # never finishes
    settings = TurnSettings(flush_interval=0.01, lease_ttl=0.3, titles="off")

    async def take_the_lease_once_streaming() -> None:
        await model.started.wait()
        other = Conversation(person.doc, author="worker-2")
        other.leases[question.id] = {
            "holder": "worker-2",
            "turn_id": waiting.turn_id,
            "expires_at": other.clock() + 30,
        }

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take_the_lease_once_streaming)
            turn = await serve_turn(
                worker, waiting, model, model="m", changes=Changes(), settings=settings
            )
    assert turn is None
    assert person.assistant_answers(question.id) == []
    lease = person.lease(question.id)
    assert lease is not None and lease.holder == "worker-2"  # left as the other holds it


async def test_two_workers_racing_on_two_replicas_leave_one_visible_reply() -> None:
    person = Conversation.create(author="alice")
    person.append("user", "hi")
    replica_a = Conversation.from_update(person.encode_state(), author="worker-a")
    replica_b = Conversation.from_update(person.encode_state(), author="worker-b")
    [wa] = replica_a.waiting_for_reply()
    [wb] = replica_b.waiting_for_reply()
    a = await serve_turn(replica_a, wa, ScriptedModel(["from a"]), model="m", changes=Changes())
    b = await serve_turn(replica_b, wb, ScriptedModel(["from b"]), model="m", changes=Changes())
    assert a is not None and b is not None and a.id == b.id
    sync(replica_a, replica_b)
    sync(person, replica_a)
    assert [m.role for m in person.current_thread()] == ["user", "assistant"]
    assert len(person.children(person.current_thread()[0].id)) == 1
    assert person.waiting_for_reply() == []
    assert [p.reason for p in person.problems()] == [f"duplicate id {a.id!r}"]
    assert replica_a.current_thread() == replica_b.current_thread() == person.current_thread()


async def test_room_serves_tool_call_round_trip_and_regeneration() -> None:
    person = Conversation.create(author="alice")
    person.set_tool("clock", "the time", {"type": "object", "properties": {}})
    question = person.append("user", "use the tool please")
    worker = Conversation(person.doc, author="worker-1")
    model = ScriptedModel(["ok"])
    pool = ProviderPool("scripted", make=lambda name, model: ScriptedModel(["ok"]))
    pool._built["scripted"] = model
    settings = RoomSettings(idle_after=0.05)

    assert await serve_room(worker, pool, room="r", settings=settings) == 1
    call_turn = person.current_thread()[-1]
    assert call_turn.tool_calls == (ToolCall(id="call-1", name="clock", arguments="{}"),)
    assert model.requests[0].tools.keys() == {"clock"}

    person.append("tool", "12:00", tool_call_id="call-1")
    assert await serve_room(worker, pool, room="r", settings=settings) == 1
    assert [m.role for m in person.current_thread()] == ["user", "assistant", "tool", "assistant"]

    assert person.request_regeneration(question.id) == 2
    assert await serve_room(worker, pool, room="r", settings=settings) == 1
    answers = person.assistant_answers(question.id)
    assert [m.id for m in answers] == [
        assistant_turn_id(question.id, 1),
        assistant_turn_id(question.id, 2),
    ]
    assert person.regenerate_requests() == {}
    assert person.current_thread()[-1].id == assistant_turn_id(question.id, 2)


async def test_provider_switch_mid_conversation_and_unbuildable_provider() -> None:
    person = Conversation.create(author="alice")
    person.append("user", "first")
    worker = Conversation(person.doc, author="worker-1")
    built: list[str] = []

    def make(name: str, *, model: str | None) -> ScriptedModel:
        if name == "missing":
            raise ProviderError("provider 'missing' is not available: no key")
        built.append(name)
        scripted = ScriptedModel([f"answer from {name}"])
        scripted.name = name
        return scripted

    pool = ProviderPool("alpha", make=make)
    settings = RoomSettings(idle_after=0.05)
    await serve_room(worker, pool, room="r", settings=settings)
    person.set_settings(provider="beta", model="beta-large")
    person.append("user", "second")
    await serve_room(worker, pool, room="r", settings=settings)
    person.set_settings(provider="missing")
    person.append("user", "third")
    await serve_room(worker, pool, room="r", settings=settings)

    answers = [m for m in person.current_thread() if m.role == "assistant"]
    assert [a.content for a in answers[:2]] == ["answer from alpha", "answer from beta"]
    assert [a.model.provider for a in answers[:2]] == ["alpha", "beta"]
    assert answers[1].model.model == "beta-large"
    assert answers[2].status == "error" and "no key" in (answers[2].error or "")
    assert built == ["alpha", "beta"]


async def test_a_room_answered_by_another_live_worker_is_left_until_its_lease_expires() -> None:
    # A second worker that stayed in the room would receive every token the first streams.
    person = Conversation.create(author="alice")
    question = person.append("user", "hello")
    other = Conversation(person.doc, author="worker-2")
    [waiting] = other.waiting_for_reply()
    assert other.claim_lease(question.id, waiting.turn_id, holder="worker-2", ttl=20.0)
    worker = Conversation(person.doc, author="worker-1")
    model = ScriptedModel(["never"])
    pool = ProviderPool("scripted", make=lambda name, *, model_name=None, **_: model)
    recheck: list[float] = []

    with anyio.fail_after(5):  # idle_after is 30 s: it left because of the lease
        committed = await serve_room(
            worker,
            pool,
            room="r",
            settings=RoomSettings(idle_after=30.0),
            on_foreign_leases=recheck.append,
        )

    assert committed == 0 and model.requests == []
    [delay] = recheck
    assert 15.0 < delay <= 20.0  # when to look again, to take over if worker-2 died


async def test_first_reply_writes_a_title_the_persons_own_overrides() -> None:
    person = Conversation.create(author="alice")
    person.append("user", "How do I bake sourdough bread at home with rye flour?")
    worker = Conversation(person.doc, author="worker-1")
    model = ScriptedModel(["Bake it slowly."])
    [waiting] = worker.waiting_for_reply()
    reply = await serve_turn(worker, waiting, model, model="m", changes=Changes())
    assert reply is not None
    # Asked of the same provider and model: the scripted model answers its pieces again.
    assert [r.model for r in model.requests] == ["m", "m"]
    assert "sourdough" in model.requests[1].thread[-1].content
    assert title_of(person) == "Bake it slowly"
    person.set_title("Rye bread")
    assert title_of(person) == "Rye bread"
    # Later replies leave the title alone.
    person.append("user", "And without rye?")
    [later] = worker.waiting_for_reply()
    await serve_turn(worker, later, model, model="m", changes=Changes())
    titles = [e for e in worker.derived_entries().values() if e.kind == "title"]
    assert len(titles) == 1 and len(model.requests) == 3


async def test_local_model_and_failing_providers_get_the_first_words() -> None:
    question = "How do I bake *sourdough* bread at home with rye flour?"
    assert fallback_title(question) == "How do I bake sourdough bread…"
    assert fallback_title("Hi") == "Hi"

    class LocalModel(ScriptedModel):
        name = "local"

    class Failing(ScriptedModel):
        async def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
            if self.requests:  # the title request, after the reply
                self.requests.append(request)
                raise ProviderError("rate limited")
            async for event in super().stream_turn(request):
                yield event

    for model in (LocalModel(["Sure."]), Failing(["Sure."])):
        person = Conversation.create(author="alice")
        person.append("user", question)
        worker = Conversation(person.doc, author="worker-1")
        [waiting] = worker.waiting_for_reply()
        await serve_turn(worker, waiting, model, model="m", changes=Changes())
        assert title_of(person) == "How do I bake sourdough bread…"
        assert len(model.requests) == (1 if model.name == "local" else 2)  # local: never asked
