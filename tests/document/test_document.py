"""Every operation of `Conversation` on one replica (design §2)."""

from __future__ import annotations

import pytest
from pycrdt import Array, Doc, Map, Text

from crdtchat import schema
from crdtchat.document import Conversation, ConversationError, derived_key
from crdtchat.schema import DerivedEntry, Message, ToolCall, assistant_turn_id
from tests.support.document import FILE, MODEL, Clock, fresh_copy, snapshot

# -- creating, opening, exchanging ---------------------------------------------------------


def test_create_fills_meta_and_declares_every_root() -> None:
    clock = Clock()
    conversation = Conversation.create(author="ann", title="Plans", clock=clock)
    assert conversation.meta["schema"] == schema.SCHEMA_VERSION
    assert conversation.meta["created_at"] == clock.now
    assert conversation.title == "Plans"
    opened = fresh_copy(conversation)
    assert opened.title == "Plans"
    assert opened.meta["schema"] == 1
    # The roots are found by their names by any reader of the bytes.
    doc = Doc()
    doc.apply_update(conversation.encode_state())
    assert doc.get(schema.META, type=Map)["title"] == "Plans"
    assert len(conversation) == 0
    assert conversation.current_thread() == []
    assert conversation.problems() == []


def test_open_from_update_and_from_state_vector_exchange() -> None:
    ann = Conversation.create(author="ann")
    first = ann.append("user", "hello")
    state = ann.encode_state()
    bob = Conversation.from_update(state, author="bob")
    assert snapshot(bob) == snapshot(ann)

    vector = bob.state_vector()
    second = ann.append("user", "again", parent=first.id)
    missing = ann.update_since(vector)
    assert len(missing) < len(ann.encode_state())
    bob.apply_update(missing)
    assert [m.id for m in bob.current_thread()] == [first.id, second.id]
    # Applying the same update again changes nothing.
    bob.apply_update(missing)
    assert snapshot(bob) == snapshot(ann)


def test_on_update_reports_local_and_remote_updates() -> None:
    ann = Conversation.create(author="ann")
    bob = Conversation(author="bob")
    seen: list[bytes] = []
    bob.on_update(seen.append)
    ann.append("user", "hi")
    bob.apply_update(ann.encode_state())
    assert len(seen) == 1
    bob.append("user", "hi back")
    assert len(seen) == 2
    relay = Doc()
    for update in seen:
        relay.apply_update(update)
    assert len(relay.get(schema.MESSAGES, type=Array)) == 2


def test_on_messages_change_fires_for_remote_and_local_writes() -> None:
    ann = Conversation.create(author="ann")
    bob = Conversation(author="bob")
    calls: list[int] = []
    bob.on_messages_change(lambda: calls.append(len(bob)))
    bob.apply_update(ann.encode_state())  # no messages yet: meta only
    ann.append("user", "one")
    bob.apply_update(ann.update_since(bob.state_vector()))
    bob.append("user", "two")
    assert calls == [1, 2]


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00", b"not a yjs update at all", b"\x01\x01\xff\xff\xff\xff\x0f"],
)
def test_bad_bytes_are_refused_and_leave_the_document_untouched(garbage: bytes) -> None:
    with pytest.raises(ConversationError, match="not a Yjs update"):
        Conversation.from_update(garbage, author="ann")
    ann = Conversation.create(author="ann")
    ann.append("user", "keep me")
    before = ann.encode_state()
    with pytest.raises(ConversationError, match="not a Yjs update"):
        ann.apply_update(garbage)
    assert ann.encode_state() == before
    assert [m.content for m in ann.all_messages()] == ["keep me"]
    ann.append("user", "still writable")
    assert len(ann) == 2


# -- appending -----------------------------------------------------------------------------


def test_append_every_role_with_all_fields() -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", clock=clock)
    system = ann.append("system", "Be brief.", message_id="s1")
    user = ann.append("user", "Weather?", files=[FILE])
    assert user.parent == system.id
    assert user.author == "ann"
    assert user.created_at == clock.now
    assert user.files == (FILE,)

    worker = Conversation.from_update(ann.encode_state(), author="worker-1", clock=clock)
    call = ToolCall(id="call_1", name="weather", arguments='{"city": "Oslo"}')
    answer = worker.append(
        "assistant", "", tool_calls=[call], model=MODEL, status="complete", parent=user.id
    )
    ann.apply_update(worker.update_since(ann.state_vector()))
    result = ann.append("tool", '{"temp": -3}', tool_call_id="call_1")
    assert result.parent == answer.id

    opened = fresh_copy(ann)
    got = {m.id: m for m in opened.all_messages()}
    assert got[answer.id].tool_calls == (call,)
    assert got[answer.id].model == MODEL
    assert got[answer.id].status == "complete"
    assert got[answer.id].author == "worker-1"
    assert got[result.id].tool_call_id == "call_1"
    assert got[result.id].role == "tool"
    assert got[user.id].files == (FILE,)
    assert got["s1"].role == "system"
    assert opened.problems() == []
    # The stored map holds exactly the contract's keys, content as a Text.
    item = ann.messages[ann.view.position(answer.id)]
    assert isinstance(item["content"], Text)
    assert set(item.keys()) == {
        "id",
        "role",
        "author",
        "parent",
        "created_at",
        "content",
        "tool_calls",
        "model",
        "status",
    }


def test_append_error_status_with_error_text() -> None:
    worker = Conversation.create(author="w")
    user = worker.append("user", "q")
    failed = worker.append(
        "assistant", "", parent=user.id, model=MODEL, status="error", error="rate limited"
    )
    assert fresh_copy(worker).message(failed.id).error == "rate limited"


def test_append_defaults_to_the_end_of_the_current_thread_and_parent_none_starts_a_root() -> None:
    ann = Conversation.create(author="ann")
    a = ann.append("user", "a")
    b = ann.append("user", "b")
    assert a.parent is None and b.parent == a.id
    root = ann.append("user", "new root", parent=None)
    assert root.parent is None
    assert ann.current_thread() == [root]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "robot", "content": "x"}, "role"),
        ({"role": "user", "content": "x", "parent": "nope"}, "parent 'nope' is not a message"),
        ({"role": "user", "content": "x", "message_id": "m1"}, "exists already"),
        ({"role": "user", "content": "x", "message_id": ""}, None),
        ({"role": "tool", "content": "x"}, "needs the tool_call_id"),
        (
            {
                "role": "user",
                "content": "x",
                "tool_calls": [ToolCall(id="c", name="n", arguments="{}")],
            },
            "only assistant messages carry tool_calls",
        ),
        ({"role": "user", "content": "x", "model": MODEL}, "only assistant"),
        (
            {"role": "user", "content": "x", "status": "complete"},
            "only assistant messages carry a status",
        ),
        ({"role": "assistant", "content": "x", "tool_call_id": "c"}, "no tool_call_id"),
        ({"role": "assistant", "content": "x", "status": "done"}, "status"),
        (
            {
                "role": "user",
                "content": "x",
                "files": [{"sha256": "xyz", "name": "a", "mime": "b", "size": 1}],
            },
            "sha256",
        ),
        ({"role": "user", "content": 5}, "content"),
    ],
)
def test_invalid_appends_are_refused_with_a_clear_error(kwargs: dict, message: str | None) -> None:
    ann = Conversation.create(author="ann")
    ann.append("user", "first", message_id="m1")
    before = ann.encode_state()
    with pytest.raises(ConversationError) as raised:
        ann.append(**kwargs)
    if message is not None:
        assert message in str(raised.value)
    assert ann.encode_state() == before
    assert len(ann) == 1


def test_appends_inside_one_transaction_can_chain() -> None:
    ann = Conversation.create(author="ann")
    with ann.doc.transaction():
        first = ann.append("user", "one")
        second = ann.append("user", "two")
        third = ann.append("user", "three", parent=second.id)
    assert second.parent == first.id
    assert [m.id for m in ann.current_thread()] == [first.id, second.id, third.id]
    assert snapshot(fresh_copy(ann)) == snapshot(ann)


def test_append_message_keeps_a_validated_message_as_is() -> None:
    ann = Conversation.create(author="importer")
    message = Message(id="x1", role="user", author="someone-else", content="hi", created_at=5.0)
    ann.append_message(message)
    assert fresh_copy(ann).message("x1") == message


# -- editing text --------------------------------------------------------------------------

ASTRAL = "héllo 😀 wörld 𝄞 end"


def test_edit_text_replaces_and_keeps_astral_characters() -> None:
    ann = Conversation.create(author="ann")
    message = ann.append("user", ASTRAL)
    ann.edit_text(message.id, "héllo 😀😀 wörld 𝄞 end!")
    assert ann.message(message.id).content == "héllo 😀😀 wörld 𝄞 end!"
    ann.edit_text(message.id, "😀")
    assert ann.message(message.id).content == "😀"
    ann.edit_text(message.id, "")
    assert ann.message(message.id).content == ""
    ann.edit_text(message.id, "𝄞 back")
    assert fresh_copy(ann).message(message.id).content == "𝄞 back"


def test_insert_and_delete_text_count_code_points() -> None:
    ann = Conversation.create(author="ann")
    message = ann.append("user", ASTRAL)
    emoji = ASTRAL.index("😀")
    ann.insert_text(message.id, emoji + 1, "[after]")
    ann.insert_text(message.id, emoji, "[before]")
    expected = ASTRAL[:emoji] + "[before]😀[after]" + ASTRAL[emoji + 1 :]
    assert ann.message(message.id).content == expected
    start = expected.index("𝄞")
    ann.delete_text(message.id, start, 1)
    expected = expected[:start] + expected[start + 1 :]
    assert ann.message(message.id).content == expected
    ann.insert_text(message.id, len(expected), "🎉")
    ann.insert_text(message.id, 0, "𝄞")
    expected = "𝄞" + expected + "🎉"
    assert ann.message(message.id).content == expected
    assert fresh_copy(ann).message(message.id).content == expected


@pytest.mark.parametrize(("index", "length"), [(-1, 1), (0, 99), (5, -1), (30, 0)])
def test_text_ranges_outside_the_text_are_refused(index: int, length: int) -> None:
    ann = Conversation.create(author="ann")
    message = ann.append("user", "short 😀")
    with pytest.raises(ConversationError):
        ann.delete_text(message.id, index, length)
    with pytest.raises(ConversationError):
        ann.insert_text(message.id, 99, "x")
    assert ann.message(message.id).content == "short 😀"


def test_only_the_author_edits_a_message() -> None:
    ann = Conversation.create(author="ann")
    message = ann.append("user", "mine")
    bob = Conversation.from_update(ann.encode_state(), author="bob")
    for edit in (
        lambda: bob.edit_text(message.id, "bob's"),
        lambda: bob.insert_text(message.id, 0, "x"),
        lambda: bob.delete_text(message.id, 0, 1),
    ):
        with pytest.raises(ConversationError, match="only its author edits"):
            edit()
    assert bob.message(message.id).content == "mine"
    with pytest.raises(KeyError):
        ann.edit_text("no-such-id", "x")


# -- settings, tools, title ----------------------------------------------------------------


def test_settings_and_tools_round_trip() -> None:
    ann = Conversation.create(author="ann")
    assert ann.settings.system == ""
    ann.set_settings(
        system="Be kind 😀", provider="openai", model="gpt-x", params={"temperature": 0.2}
    )
    ann.set_settings(model="gpt-y")
    ann.set_tool("weather", "Weather by city", {"type": "object", "properties": {"city": {}}})
    ann.set_tool("clock", "Time", {"type": "object"})
    ann.set_title("Renamed")
    opened = fresh_copy(ann)
    settings = opened.settings
    assert (settings.system, settings.provider, settings.model) == ("Be kind 😀", "openai", "gpt-y")
    assert settings.params == {"temperature": 0.2}
    assert set(opened.tools) == {"weather", "clock"}
    assert opened.tools["weather"].parameters["properties"] == {"city": {}}
    assert opened.title == "Renamed"
    ann.remove_tool("clock")
    ann.remove_tool("never-there")
    assert set(ann.tools) == {"weather"}


def test_settings_refuse_params_that_are_not_json() -> None:
    ann = Conversation.create(author="ann")
    ann.set_settings(system="kept")
    with pytest.raises((TypeError, ValueError)):
        ann.set_settings(system="changed", params={"x": object()})
    assert ann.settings.system == "kept"


def test_broken_settings_keys_do_not_hide_good_ones() -> None:
    ann = Conversation.create(author="ann")
    ann.set_settings(system="still here")
    ann.settings_map["params"] = "not an object"
    ann.settings_map["model"] = 12
    ann.tools_map["broken"] = "not a spec"
    ann.set_tool("ok", "fine", {})
    assert ann.settings.system == "still here"
    assert ann.settings.model is None
    assert set(ann.tools) == {"ok"}


# -- threads -------------------------------------------------------------------------------


def _branching(ann: Conversation) -> dict[str, Message]:
    """root → a → (b1 → c1, b2): two leaves, b2 last in document order."""
    root = ann.append("system", "sys", message_id="root")
    a = ann.append("user", "a", message_id="a", parent=root.id)
    b1 = ann.append("user", "b1", message_id="b1", parent=a.id)
    c1 = ann.append("user", "c1", message_id="c1", parent=b1.id)
    b2 = ann.append("user", "b2", message_id="b2", parent=a.id)
    return {m.id: m for m in (root, a, b1, c1, b2)}


def test_threads_children_and_leaves() -> None:
    ann = Conversation.create(author="ann")
    m = _branching(ann)
    assert [x.id for x in ann.thread("c1")] == ["root", "a", "b1", "c1"]
    assert [x.id for x in ann.current_thread()] == ["root", "a", "b2"]
    assert [x.id for x in ann.children("a")] == ["b1", "b2"]
    assert ann.children("c1") == []
    assert [x.id for x in ann.leaves()] == ["c1", "b2"]
    # A new child of c1 comes last in document order: its thread becomes current.
    d = ann.append("user", "d", parent=m["c1"].id)
    assert [x.id for x in ann.current_thread()] == ["root", "a", "b1", "c1", d.id]
    assert [x.id for x in ann.leaves()] == ["b2", d.id]
    with pytest.raises(KeyError):
        ann.thread("missing")


# -- waiting for a reply, regeneration -------------------------------------------------------


def test_user_leaf_waits_and_an_answer_ends_the_wait() -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", clock=clock)
    ann.append("system", "sys")
    question = ann.append("user", "q")
    waiting = ann.waiting_for_reply()
    assert [(w.message.id, w.answer_number) for w in waiting] == [(question.id, 1)]
    assert waiting[0].turn_id == assistant_turn_id(question.id, 1)
    worker = Conversation.from_update(ann.encode_state(), author="w", clock=clock)
    worker.append(
        "assistant",
        "a",
        parent=question.id,
        message_id=waiting[0].turn_id,
        model=MODEL,
        status="complete",
    )
    assert worker.waiting_for_reply() == []
    # system and assistant leaves never wait
    lone = Conversation.create(author="ann")
    lone.append("system", "only a system prompt")
    assert lone.waiting_for_reply() == []


def test_tool_results_wait_only_when_every_call_has_its_result() -> None:
    ann = Conversation.create(author="ann")
    question = ann.append("user", "weather in two cities")
    calls = [
        ToolCall(id="c1", name="weather", arguments='{"city":"Oslo"}'),
        ToolCall(id="c2", name="weather", arguments='{"city":"Rome"}'),
    ]
    worker = Conversation.from_update(ann.encode_state(), author="w")
    worker.append(
        "assistant", "", parent=question.id, tool_calls=calls, model=MODEL, status="complete"
    )
    ann.apply_update(worker.update_since(ann.state_vector()))
    assert ann.waiting_for_reply() == []  # an assistant leaf
    first = ann.append("tool", "-3", tool_call_id="c1")
    assert ann.waiting_for_reply() == []  # c2 still open
    second = ann.append("tool", "21", tool_call_id="c2", parent=first.id)
    assert [w.message.id for w in ann.waiting_for_reply()] == [second.id]


def test_tool_result_without_open_calls_still_asks_for_a_reply() -> None:
    ann = Conversation.create(author="ann")
    ann.append("user", "q")
    result = ann.append("tool", "out", tool_call_id="orphan")
    assert [w.message.id for w in ann.waiting_for_reply()] == [result.id]


def test_several_waiting_messages_come_in_document_order() -> None:
    ann = Conversation.create(author="ann")
    a = ann.append("user", "a", parent=None)
    b = ann.append("user", "b", parent=None)
    assert [w.message.id for w in ann.waiting_for_reply()] == [a.id, b.id]


def test_regeneration_asks_for_the_next_answer_number() -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", clock=clock)
    system = ann.append("system", "s")
    with pytest.raises(ConversationError, match="only user and tool"):
        ann.request_regeneration(system.id)
    with pytest.raises(KeyError):
        ann.request_regeneration("no-such")
    question = ann.append("user", "q")
    worker = Conversation.from_update(ann.encode_state(), author="w", clock=clock)
    (waiting,) = worker.waiting_for_reply()
    first = worker.commit_turn(
        question.id, waiting.turn_id, model=MODEL, status="complete", content="1st"
    )
    ann.apply_update(worker.update_since(ann.state_vector()))
    assert ann.waiting_for_reply() == []

    assert ann.request_regeneration(question.id) == 2
    assert ann.regenerate_requests()[question.id].n == 2
    worker.apply_update(ann.update_since(worker.state_vector()))
    (again,) = worker.waiting_for_reply()
    assert again.message.id == question.id
    assert again.answer_number == 2
    assert again.turn_id == assistant_turn_id(question.id, 2)
    second = worker.commit_turn(
        question.id, again.turn_id, model=MODEL, status="complete", content="2nd"
    )
    # Serving the request clears it, and the answers are siblings.
    assert worker.regenerate_requests() == {}
    assert worker.waiting_for_reply() == []
    assert [m.id for m in worker.assistant_answers(question.id)] == [first.id, second.id]
    assert [m.id for m in worker.current_thread()] == [system.id, question.id, second.id]

    # Asking twice before any answer asks for two more.
    ann.apply_update(worker.update_since(ann.state_vector()))
    assert ann.request_regeneration(question.id) == 3
    assert ann.request_regeneration(question.id) == 4
    (third,) = ann.waiting_for_reply()
    assert third.answer_number == 3
    ann.clear_regeneration(question.id)
    assert ann.waiting_for_reply() == []


def test_regeneration_of_an_unanswered_message_is_the_plain_wait() -> None:
    ann = Conversation.create(author="ann")
    question = ann.append("user", "q")
    ann.request_regeneration(question.id)
    assert [(w.message.id, w.answer_number) for w in ann.waiting_for_reply()] == [(question.id, 1)]


def test_answer_number_skips_an_id_already_taken() -> None:
    ann = Conversation.create(author="ann")
    question = ann.append("user", "q")
    worker = Conversation.from_update(ann.encode_state(), author="w")
    # An answer with the id answer number 2 would get, written by some other peer.
    worker.append(
        "assistant",
        "x",
        parent=question.id,
        message_id=assistant_turn_id(question.id, 2),
        model=MODEL,
        status="complete",
    )
    ann.apply_update(worker.update_since(ann.state_vector()))
    ann.request_regeneration(question.id)
    (waiting,) = ann.waiting_for_reply()
    assert ann.view.get(waiting.turn_id) is None
    worker.apply_update(ann.update_since(worker.state_vector()))
    worker.commit_turn(question.id, waiting.turn_id, model=MODEL, status="complete", content="y")
    assert worker.waiting_for_reply() == []


# -- prefix hash and derived state ---------------------------------------------------------


def _entry(message_id: str, prefix_hash: str, **overrides) -> DerivedEntry:
    fields = {
        "kind": "provider_state",
        "message_id": message_id,
        "prefix_hash": prefix_hash,
        "provider": MODEL.provider,
        "api": MODEL.api,
        "model": MODEL.model,
        "data": {"response_id": "resp_1"},
        "created_at": 1.0,
        "expires_at": None,
        "producer": "w",
    }
    fields.update(overrides)
    return DerivedEntry.model_validate(fields)


def _answered(clock: Clock) -> tuple[Conversation, Message, Message]:
    ann = Conversation.create(author="ann", clock=clock)
    ann.set_settings(system="sys")
    question = ann.append("user", "q")
    worker = Conversation.from_update(ann.encode_state(), author="w", clock=clock)
    answer = worker.commit_turn(
        question.id,
        assistant_turn_id(question.id, 1),
        model=MODEL,
        status="complete",
        content="a",
        derived=[("provider_state", {"response_id": "resp_1"}, None)],
    )
    ann.apply_update(worker.update_since(ann.state_vector()))
    return ann, question, answer


def test_usable_derived_follows_the_three_rules() -> None:
    clock = Clock()
    ann, question, answer = _answered(clock)
    thread = ann.thread(answer.id)
    usable, stale = ann.usable_derived(
        thread, provider=MODEL.provider, api=MODEL.api, model=MODEL.model
    )
    assert [e.data for e in usable.values()] == [{"response_id": "resp_1"}]
    assert stale == []
    (key,) = usable
    assert usable[key].prefix_hash == ann.prefix_hash(answer.id)

    # rule 2: another provider, api or model sees nothing, and does not delete it either
    for other in (
        {"provider": "x", "api": MODEL.api, "model": MODEL.model},
        {"provider": MODEL.provider, "api": "chat", "model": MODEL.model},
        {"provider": MODEL.provider, "api": MODEL.api, "model": "other"},
    ):
        assert ann.usable_derived(thread, **other) == ({}, [])

    # rule 3: expiry, with the injected clock
    ann.put_derived(
        _entry(answer.id, ann.prefix_hash(answer.id), kind="hidden", expires_at=clock.now + 10)
    )
    kinds = {e.kind for e in ann.usable_derived(thread, **MODEL.model_dump())[0].values()}
    assert kinds == {"provider_state", "hidden"}
    clock.advance(10)
    usable, stale = ann.usable_derived(thread, **MODEL.model_dump())
    assert {e.kind for e in usable.values()} == {"provider_state"}
    assert [ann.derived_entries()[k].kind for k in stale] == ["hidden"]

    # rule 1: an edit anywhere on the path changes the hash
    ann.edit_text(question.id, "q, edited")
    thread = ann.thread(answer.id)
    usable, stale = ann.usable_derived(thread, **MODEL.model_dump())
    assert usable == {}
    assert sorted(ann.derived_entries()[k].kind for k in stale) == ["hidden", "provider_state"]
    # ... and so does a change of the system prompt or the tools
    ann2, _, answer2 = _answered(Clock())
    thread2 = ann2.thread(answer2.id)
    assert ann2.usable_derived(thread2, **MODEL.model_dump())[0]
    ann2.set_settings(system="other system")
    assert ann2.usable_derived(thread2, **MODEL.model_dump())[0] == {}
    ann3, _, answer3 = _answered(Clock())
    ann3.set_tool("t", "d", {})
    assert ann3.usable_derived(ann3.thread(answer3.id), **MODEL.model_dump())[0] == {}


def test_usable_derived_records_are_only_returned_when_asked_for() -> None:
    clock = Clock()
    ann, _, answer = _answered(clock)
    hash_ = ann.prefix_hash(answer.id)
    ann.put_derived(_entry(answer.id, hash_, kind="usage", data={"input_tokens": 5}))
    ann.put_derived(_entry(answer.id, hash_, kind="title", data={"title": "T"}))
    thread = ann.thread(answer.id)
    default = ann.usable_derived(thread, **MODEL.model_dump())[0]
    assert {e.kind for e in default.values()} == {"provider_state"}
    asked = ann.usable_derived(thread, **MODEL.model_dump(), kinds=["title"])[0]
    assert [e.data for e in asked.values()] == [{"title": "T"}]


def test_entries_for_messages_off_the_thread_are_left_alone() -> None:
    ann, _, _ = _answered(Clock())
    other = ann.append("user", "branch", parent=None)
    assert ann.usable_derived([other], **MODEL.model_dump()) == ({}, [])
    assert len(ann.derived_entries()) == 1


def test_put_replaces_and_discard_one_kind_all_leave_canonical_untouched() -> None:
    ann, question, answer = _answered(Clock())
    hash_ = ann.prefix_hash(answer.id)
    key = ann.put_derived(_entry(answer.id, hash_, data={"response_id": "resp_2"}))
    assert key == derived_key(_entry(answer.id, hash_))
    assert ann.derived_entries()[key].data == {"response_id": "resp_2"}  # replaced, not added
    ann.put_derived(_entry(answer.id, hash_, kind="usage"))
    ann.put_derived(_entry(answer.id, hash_, kind="hidden"))
    ann.put_derived(_entry(question.id, ann.prefix_hash(question.id), kind="hidden"))
    canonical = snapshot(ann), ann.settings, ann.tools_raw()
    assert len(ann.derived_entries()) == 4

    ann.discard_derived(key)
    ann.discard_derived("never-there")
    assert key not in ann.derived_entries()
    ann.discard_derived_kind("hidden")
    assert [e.kind for e in ann.derived_entries().values()] == ["usage"]
    ann.put_derived(_entry(answer.id, hash_, kind="summary"))
    ann.derived["garbage"] = "not an entry"
    ann.discard_all_derived()
    assert len(ann.derived) == 0
    assert (snapshot(ann), ann.settings, ann.tools_raw()) == canonical


# -- transport: leases -----------------------------------------------------------------------


def test_leases_claim_renew_release_and_take_over_when_expired() -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", clock=clock)
    question = ann.append("user", "q")
    turn = assistant_turn_id(question.id, 1)
    w1 = Conversation.from_update(ann.encode_state(), author="w1", clock=clock)
    w2 = Conversation.from_update(ann.encode_state(), author="w2", clock=clock)

    assert w1.claim_lease(question.id, turn, holder="w1", ttl=30)
    w2.apply_update(w1.update_since(w2.state_vector()))
    assert w2.lease(question.id).holder == "w1"
    assert not w2.claim_lease(question.id, turn, holder="w2", ttl=30)
    assert not w2.renew_lease(question.id, holder="w2", ttl=30)
    w2.release_lease(question.id, holder="w2")  # not the holder: nothing happens
    assert w2.lease(question.id).holder == "w1"

    clock.advance(20)
    assert w1.renew_lease(question.id, holder="w1", ttl=30)
    assert w1.lease(question.id).expires_at == clock.now + 30
    assert w1.claim_lease(question.id, turn, holder="w1", ttl=30)  # re-claiming our own is fine
    w2.apply_update(w1.update_since(w2.state_vector()))
    clock.advance(29)
    assert not w2.claim_lease(question.id, turn, holder="w2", ttl=30)
    clock.advance(1)  # expired now: take over
    assert w2.claim_lease(question.id, turn, holder="w2", ttl=30)
    assert w2.lease(question.id).holder == "w2"
    assert w2.lease(question.id).turn_id == turn
    w1.apply_update(w2.update_since(w1.state_vector()))
    assert not w1.renew_lease(question.id, holder="w1", ttl=30)
    w2.release_lease(question.id, holder="w2")
    assert w2.lease(question.id) is None
    assert w2.renew_lease(question.id, holder="w2", ttl=30) is False


# -- transport: streams ----------------------------------------------------------------------


def test_stream_start_append_reset_and_commit_in_one_transaction() -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", clock=clock)
    question = ann.append("user", "q")
    worker = Conversation.from_update(ann.encode_state(), author="w", clock=clock)
    turn = assistant_turn_id(question.id, 1)
    assert worker.claim_lease(question.id, turn, holder="w", ttl=30)
    worker.start_stream(turn, parent=question.id)
    worker.append_stream(turn, "Hel")
    worker.append_stream(turn, "lo 😀")
    ann.apply_update(worker.update_since(ann.state_vector()))
    assert ann.streams_in_flight() == {turn: "Hello 😀"}
    worker.reset_stream(turn)
    assert worker.stream_text(turn) == ""
    worker.append_stream(turn, "Bonjour 😀 𝄞")
    worker.append_stream(turn, "!")
    ann.apply_update(worker.update_since(ann.state_vector()))
    assert ann.stream_text(turn) == "Bonjour 😀 𝄞!"
    with pytest.raises(ConversationError, match="no stream"):
        worker.append_stream("other-turn", "x")

    updates: list[bytes] = []
    worker.on_update(updates.append)
    seen: list[tuple[dict, list[str]]] = []
    ann.on_messages_change(
        lambda: seen.append((ann.streams_in_flight(), [m.id for m in ann.all_messages()]))
    )
    message = worker.commit_turn(
        question.id,
        turn,
        model=MODEL,
        status="complete",
        derived=[("usage", {"input_tokens": 3}, None)],
    )
    assert message.content == "Bonjour 😀 𝄞!"
    assert len(updates) == 1  # one transaction, one update
    ann.apply_update(updates[0])
    # When the message appears, the stream, the lease and the derived entry travel with it.
    assert seen == [({}, [question.id, turn])]
    assert ann.message(turn).content == "Bonjour 😀 𝄞!"
    assert ann.lease(question.id) is None
    assert [e.kind for e in ann.derived_entries().values()] == ["usage"]
    assert ann.derived_entries()[next(iter(ann.derived_entries()))].prefix_hash == ann.prefix_hash(
        turn
    )
    assert ann.waiting_for_reply() == []


def test_commit_turn_refuses_a_turn_id_already_answered_and_keeps_the_stream() -> None:
    ann = Conversation.create(author="ann")
    question = ann.append("user", "q")
    worker = Conversation.from_update(ann.encode_state(), author="w")
    turn = assistant_turn_id(question.id, 1)
    worker.commit_turn(question.id, turn, model=MODEL, status="complete", content="first")
    worker.start_stream(turn, parent=question.id)
    worker.append_stream(turn, "late")
    with pytest.raises(ConversationError, match="exists already"):
        worker.commit_turn(question.id, turn, model=MODEL, status="complete")
    assert worker.stream_text(turn) == "late"


def test_cancel_then_commit_as_cancelled() -> None:
    ann = Conversation.create(author="ann")
    question = ann.append("user", "q")
    worker = Conversation.from_update(ann.encode_state(), author="w")
    turn = assistant_turn_id(question.id, 1)
    worker.start_stream(turn, parent=question.id)
    worker.append_stream(turn, "partial")
    ann.apply_update(worker.update_since(ann.state_vector()))
    assert not ann.cancel_requested(turn)
    ann.request_cancel(turn)
    worker.apply_update(ann.update_since(worker.state_vector()))
    assert worker.cancel_requested(turn)
    message = worker.commit_turn(question.id, turn, model=MODEL, status="cancelled")
    assert (message.status, message.content) == ("cancelled", "partial")
    assert not worker.cancel_requested(turn)
    ann.apply_update(worker.update_since(ann.state_vector()))
    assert not ann.cancel_requested(turn)


# -- transport: drafts, read marks -----------------------------------------------------------


def test_drafts_are_per_author_and_shared_by_that_authors_devices() -> None:
    phone = Conversation.create(author="ann")
    laptop = Conversation.from_update(phone.encode_state(), author="ann")
    bob = Conversation.from_update(phone.encode_state(), author="bob")
    assert phone.draft() == ""
    phone.set_draft("Hel")
    phone.set_draft("Hello 😀")
    laptop.apply_update(phone.update_since(laptop.state_vector()))
    assert laptop.draft() == "Hello 😀"
    laptop.set_draft("Hello 😀 there")
    laptop.set_draft("Help 😀 there")
    bob.set_draft("bob typing")
    for target in (phone, bob):
        target.apply_update(laptop.update_since(target.state_vector()))
    phone.apply_update(bob.update_since(phone.state_vector()))
    assert phone.draft() == "Help 😀 there"
    assert phone.draft("bob") == "bob typing"
    phone.set_draft("")
    assert phone.draft() == ""


def test_read_marks() -> None:
    ann = Conversation.create(author="ann")
    message = ann.append("user", "q")
    assert ann.read_mark() is None
    ann.mark_read(message.id)
    # keyed by the author, the token's subject, so the relay can tell whose it is (design §7.2)
    assert ann.read_marks.to_py() == {"ann": message.id}
    assert fresh_copy(ann).read_mark("ann") == message.id
    assert Conversation(ann.doc, author="bob").read_mark() is None
    ann.read_marks["laptop"] = 7
    assert ann.read_mark("laptop") is None


def test_an_update_that_decodes_but_cannot_be_integrated_is_refused_without_loss() -> None:
    """An item whose parent names a non-shared item (found by fuzzing: one byte changed)."""
    writer = Conversation(Doc(client_id=7), author="a", clock=lambda: 1.0)
    for index in range(3):
        writer.append("user", f"hi {index}", message_id=f"m{index}")
    good = writer.encode_state()
    # The "role" entry of m0 names its parent Map as (client 7, clock 0), just before the key.
    clock_at = good.index(b"\x07\x00\x04role") + 1
    bad = good[:clock_at] + b"\x01" + good[clock_at + 1 :]  # parent (7, 1): the "id" string
    with pytest.raises(ConversationError, match="malformed Yjs update"):
        Conversation.from_update(bad, author="b")
    reader = Conversation.create(author="b")
    mine = reader.append("user", "mine 😀")
    with pytest.raises(ConversationError, match="malformed Yjs update"):
        reader.apply_update(bad)
    assert reader.message(mine.id).content == "mine 😀"
    assert snapshot(fresh_copy(reader)) == snapshot(reader)
    assert fresh_copy(reader).problems() == reader.problems()
    reader.append("user", "still writable")
    reader.apply_update(good)
    assert {"m0", "m1", "m2", mine.id} <= {m.id for m in reader.all_messages()}


def test_a_closed_view_stops_following_the_document() -> None:
    ann = Conversation.create(author="ann")
    ann.append("user", "seen")
    calls: list[int] = []
    ann.on_messages_change(lambda: calls.append(1))
    ann.view.close()
    ann.messages.append(Map({"id": "raw", "role": "user", "author": "x", "content": Text("t")}))
    assert calls == []
    assert [m.id for m in fresh_copy(ann).all_messages()][-1] == "raw"
