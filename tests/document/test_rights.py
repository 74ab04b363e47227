"""A `Conversation` of a role refuses locally exactly what the relay refuses from that role.

A write the relay refuses stays in the local replica and blocks its later writes (they build
on it), and a write refused locally that the relay would take is a feature the role lacks for
no reason: both sides read one table (`crdtchat.rights`, design §4). These tests hold them to
it with the real parts: every operation of `crdtchat.testing.operations` is applied to a
`Conversation` of each role, and the update it made is judged by the relay's own `LiveDoc`
in process. An operation refused locally is made again by a peer with no role check (same
subject, same document), and that update, sent by the refused role, must be refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from pycrdt import Doc

from crdtchat import schema
from crdtchat.document import Conversation, PeerRole
from crdtchat.errors import ConversationError
from crdtchat.relay.livedoc import Accepted, LiveDoc, Refused
from crdtchat.rights import PERMITS, RIGHTS, SET_META, Access, local_refusal
from crdtchat.schema import DerivedEntry, Message, ModelRef, ToolCall
from crdtchat.testing import CreateConversation, strategies
from crdtchat.testing.machine import CLIENT_IDS
from crdtchat.testing.operations import (
    AppendMessage,
    AppendStream,
    ChangeSettings,
    ClaimLease,
    ClearRegeneration,
    CommitTurn,
    DeleteText,
    DiscardDerived,
    InsertText,
    MarkRead,
    Operation,
    PutDerived,
    ReleaseLease,
    RemoveTool,
    RenewLease,
    ReplaceText,
    RequestCancel,
    RequestRegeneration,
    ResetStream,
    SetDraft,
    SetTitle,
    SetTool,
    StartStream,
)

# the module: `crdtchat.testing.operations` as an attribute is the strategy of that name
operations_module = importlib.import_module("crdtchat.testing.operations")
NOW = 1_750_000_000.0
MODEL = ModelRef(provider="local", api="llama", model="smollm2")

#: (role, subject) of the peers that act; each owns one message of the fixed document
ACTORS: tuple[tuple[PeerRole, str], ...] = (
    ("reader", "carol"),
    ("writer", "alice"),
    ("writer", "bob"),
    ("worker", "bot"),
)
OWN_MESSAGE = {"alice": "q1", "bob": "q2", "bot": "q1~a1", "carol": "q3"}


def clock() -> float:
    return NOW


def operation_classes() -> set[type]:
    """Every operation the module defines that goes through the `Conversation` API.

    The `Foreign*` ones write around it, as a peer with no `Conversation` can: no local
    refusal stands in their way, and the relay's own tests judge them.
    """
    return {
        cls
        for name, cls in inspect.getmembers(operations_module, inspect.isclass)
        if cls.__module__ == operations_module.__name__
        and dataclasses.is_dataclass(cls)
        and hasattr(cls, "apply")
        and not name.startswith("Foreign")
    }


@dataclass(frozen=True)
class Verdict:
    """What happened to one operation under one role."""

    local: str | None  # why the Conversation refused it, or None
    relay: str | None  # why the relay refused the update, or None; None too when not judged
    judged: bool  # whether an update that changes something reached the relay


def made_by(state: bytes, sub: str, role: PeerRole | None, operation: Operation) -> bytes | None:
    """The update `operation` makes on a replica of `state` as (`role`, `sub`), or None when
    it changes nothing (an update always carries the whole delete set, so it is never empty)."""
    with Conversation.from_update(state, author=sub, role=role, clock=clock) as conversation:
        before = conversation.state_vector()
        whole = conversation.encode_state()
        operation.apply(conversation)
        if conversation.encode_state() == whole:
            return None
        return conversation.doc.get_update(before)


def relay_judges(state: bytes, update: bytes, role: str, sub: str) -> str | None:
    """Why the relay refuses `update` from (`role`, `sub`) on a room holding `state`."""
    with LiveDoc(state) as live:
        outcome = live.apply(update, role, sub)
    assert isinstance(outcome, Accepted | Refused)
    return outcome.reason if isinstance(outcome, Refused) else None


def verdict(state: bytes, role: PeerRole, sub: str, operation: Operation) -> Verdict:
    try:
        update = made_by(state, sub, role, operation)
    except ConversationError as refusal:
        try:  # the same write, made without the role check
            update = made_by(state, sub, None, operation)
        except ConversationError:
            return Verdict(str(refusal), None, judged=False)  # refused whatever the role
        if update is None:
            return Verdict(str(refusal), None, judged=False)  # it would change nothing
        return Verdict(str(refusal), relay_judges(state, update, role, sub), judged=True)
    if update is None:
        return Verdict(None, None, judged=False)
    return Verdict(None, relay_judges(state, update, role, sub), judged=True)


def disagreement(role: str, operation: Operation, found: Verdict) -> str | None:
    if not found.judged:
        return None
    if found.local is None and found.relay is not None:
        return f"{role}: {operation!r} allowed locally, relay refuses: {found.relay}"
    if found.local is not None and found.relay is None:
        return f"{role}: {operation!r} refused locally ({found.local}), relay accepts"
    return None


# -- one fixed document, every operation, every role ------------------------------------------


def fixed_document() -> bytes:
    """A conversation with something of every root for every operation to act on."""
    doc = Conversation.create(author="alice", title="rights", clock=clock).doc
    with ExitStack() as stack:
        peer = {
            sub: stack.enter_context(Conversation(doc, author=sub, clock=clock))
            for sub in ("alice", "bob", "bot", "carol")
        }
        alice, bob, bot, carol = peer["alice"], peer["bob"], peer["bot"], peer["carol"]
        alice.set_settings(system="be brief", provider="local", model="smollm2")
        alice.set_tool("calc", "adds", {"type": "object"})
        alice.append("user", "first question", message_id="q1", parent=None)
        bot.commit_turn("q1", "q1~a1", model=MODEL, status="complete", content="an answer")
        bob.append("user", "second question", message_id="q2", parent="q1~a1")
        carol.append("user", "written while carol could", message_id="q3", parent="q1")
        bot.claim_lease("q2", "q2~a1", holder="bot", ttl=60)
        bot.start_stream("q2~a1", parent="q2")
        bot.append_stream("q2~a1", "par")
        bot.put_derived(derived_entry("q1~a1", "usage"))
        alice.request_cancel("q2~a1")
        bob.request_regeneration("q1")
        alice.set_draft("hel")
        bob.set_draft("typing")
        alice.mark_read("q1")
    return doc.get_update()


def derived_entry(message_id: str, kind: str) -> DerivedEntry:
    return DerivedEntry.model_validate(
        {
            "kind": kind,
            "message_id": message_id,
            "prefix_hash": "0" * 64,
            "provider": MODEL.provider,
            "api": MODEL.api,
            "model": MODEL.model,
            "data": {"tokens": 3},
            "created_at": NOW,
            "producer": "bot",
        }
    )


def walk(sub: str) -> Iterator[Operation]:
    """At least one operation of every class, each valid on `fixed_document()` for `sub`."""
    own = OWN_MESSAGE[sub]
    yield AppendMessage("n-user", "user", "more", parent="q2")
    yield AppendMessage("n-system", "system", "be kind", parent=None)
    yield AppendMessage("n-tool", "tool", "42", parent="q1~a1", tool_call_id="c1")
    yield AppendMessage("n-asst", "assistant", "hm", parent="q1", model=MODEL, status="complete")
    yield AppendMessage("q3~a1", "assistant", "yes", parent="q3", model=MODEL, status="error")
    yield InsertText(own, 0, "¡")
    yield DeleteText(own, 0, 2)
    yield ReplaceText(own, "rewritten")
    yield ChangeSettings(system="be thorough", params={"temperature": 0.5})
    yield SetTool("search", "finds", {"type": "object"})
    yield RemoveTool("calc")
    yield SetTitle("renamed")
    yield ClaimLease("q3", "q3~a1", holder=sub, ttl=30)
    yield RenewLease("q2", holder="bot", ttl=30)
    yield ReleaseLease("q2", holder="bot")
    yield StartStream("q3~a1", parent="q3")
    yield AppendStream("q2~a1", "tial")
    yield ResetStream("q2~a1")
    yield CommitTurn("q2", "q2~a1", model=MODEL, status="complete")
    yield CommitTurn(
        "q3",
        "q3~a1",
        model=MODEL,
        status="complete",
        content="with state",
        tool_calls=(ToolCall(id="c9", name="calc", arguments="{}"),),
        derived=(("provider_state", (("id", "r1"),), None),),
    )
    yield PutDerived(derived_entry("q1", "title"))
    yield DiscardDerived(key="usage:q1~a1:local:llama:smollm2")
    yield DiscardDerived(kind="usage")
    yield DiscardDerived()
    yield SetDraft("hello")
    yield MarkRead("q2")
    yield RequestCancel("q2~a1")
    yield RequestRegeneration("q1")
    yield ClearRegeneration("q1")


def test_the_table_gives_only_schema_roots_and_never_access() -> None:
    """Nobody writes `access.*` (the relay does) nor a root outside the schema (design §4); a
    role that appends messages has message access; every kind of access permits something."""
    writable = set(schema.ALL_ROOTS) - set(schema.ACCESS_ROOTS)
    for role, rights in RIGHTS.items():
        assert set(rights.roots) <= writable, role
        assert bool(rights.messages) == (rights.roots.get(schema.MESSAGES) is Access.MESSAGES)
    assert set(PERMITS) == set(Access) and all(PERMITS.values())
    assert local_refusal("admin", SET_META) == "unknown role 'admin'"


def test_the_walk_covers_every_operation() -> None:
    walked = {type(operation) for operation in walk("alice")}
    assert walked == operation_classes()


@pytest.mark.parametrize(("role", "sub"), ACTORS, ids=[f"{r}-{s}" for r, s in ACTORS])
def test_every_operation_agrees_with_the_relay(role: PeerRole, sub: str) -> None:
    state = fixed_document()
    found: dict[str, Verdict] = {}
    wrong = []
    for operation in walk(sub):
        result = verdict(state, role, sub, operation)
        found[repr(operation)] = result
        problem = disagreement(role, operation, result)
        if problem is not None:
            wrong.append(problem)
    assert not wrong, "\n".join(wrong)
    judged = [r for r in found.values() if r.judged]
    assert len(judged) >= 20, f"only {len(judged)} of {len(found)} operations reached the relay"
    if role == "reader":
        assert all(r.local is not None for r in found.values())


def test_each_role_is_allowed_what_design_section_4_gives_it() -> None:
    """The walk is not vacuous: each role gets through locally and at the relay what §4 says."""
    state = fixed_document()
    allowed = {
        role: {
            type(op).__name__
            for op in walk(sub)
            if (v := verdict(state, role, sub, op)).local is None and v.judged
        }
        for role, sub in ACTORS
        if sub != "bob"
    }
    assert allowed["reader"] == set()
    assert allowed["writer"] == {
        "AppendMessage",
        "InsertText",
        "DeleteText",
        "ReplaceText",
        "ChangeSettings",
        "SetTool",
        "RemoveTool",
        "SetTitle",
        "DiscardDerived",
        "SetDraft",
        "MarkRead",
        "RequestCancel",
        "RequestRegeneration",
        "ClearRegeneration",
    }
    assert allowed["worker"] == {
        "AppendMessage",
        "InsertText",
        "DeleteText",
        "ReplaceText",
        "ClaimLease",
        "RenewLease",
        "ReleaseLease",
        "StartStream",
        "AppendStream",
        "ResetStream",
        "CommitTurn",
        "PutDerived",
        "DiscardDerived",
        "ClearRegeneration",
    }


@dataclass(frozen=True)
class ImportMessage:
    """`Conversation.append_message`, which keeps the message's author (for imports); not in
    `crdtchat.testing.operations`, whose appends always write the replica's author."""

    message: Message

    def apply(self, conversation: Conversation) -> None:
        conversation.append_message(self.message)


@pytest.mark.parametrize(("role", "sub"), ACTORS, ids=[f"{r}-{s}" for r, s in ACTORS])
def test_imported_messages_agree_with_the_relay(role: PeerRole, sub: str) -> None:
    """A message in someone else's name is refused locally as the relay refuses it."""
    state = fixed_document()
    wrong = []
    for kind in ("user", "assistant"):
        for author in (sub, "someone-else"):
            message = Message(
                id=f"i-{kind}-{author}", role=kind, author=author, content="hi", created_at=NOW
            )
            operation = ImportMessage(message)
            result = verdict(state, role, sub, operation)
            assert result.judged
            problem = disagreement(role, operation, result)
            if problem is not None:
                wrong.append(problem)
    assert not wrong, "\n".join(wrong)


# -- drawn documents and operations -----------------------------------------------------------

AUTHORS = ("alice", "bob", "bot", "carol")


Kind = Callable[[Conversation], st.SearchStrategy[Operation]]

#: the kinds of write, drawn one at a time: building every kind's strategy for every step (as
#: `strategies.operations` does) costs more than the rest of an example
KINDS: tuple[Kind, ...] = (
    strategies.append_messages,
    strategies.text_edits,
    lambda conversation: strategies.settings_changes(),
    lambda conversation: strategies.leases(conversation, holders=(conversation.author, "w2")),
    strategies.streams,
    strategies.commits,
    strategies.derived_changes,
    lambda conversation: strategies.transport_changes(conversation, regenerate_unanswered=True),
)
FOREIGN: tuple[Kind, ...] = (strategies.foreign_writes, strategies.duplicate_ids)


def draw_operation(draw: st.DrawFn, conversation: Conversation, kinds: Sequence[Kind]) -> Operation:
    """An operation valid for `conversation`'s state, each kind as likely as the others: the
    kind drawn, or the next one that has something to work on (settings always have)."""
    start = draw(st.integers(0, len(kinds) - 1), label="kind")
    for kind in (*kinds[start:], *kinds[:start]):
        strategy = kind(conversation)
        if not strategy.is_empty:
            return draw(strategy, label="operation")
    raise AssertionError("no kind of write has anything to work on")


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A conversation after a few operations of any kind by any author, and now and then a
    foreign write (junk in a root, a broken message, a taken id): no role check, since the
    relay loads a stored state without judging it, and odd states are where rules differ."""
    doc = Doc(client_id=draw(CLIENT_IDS, label="client id"))
    with ExitStack() as stack:
        peer = {
            sub: stack.enter_context(Conversation(doc, author=sub, clock=clock)) for sub in AUTHORS
        }
        CreateConversation().apply(peer["alice"])
        for _ in range(draw(st.integers(0, 12), label="steps")):
            author = peer[draw(st.sampled_from(AUTHORS), label="author")]
            foreign = draw(st.integers(0, 4), label="foreign?") == 0
            operation = draw_operation(draw, author, (*KINDS, *FOREIGN) if foreign else KINDS)
            try:
                operation.apply(author)
            except ConversationError:
                continue  # drawn valid, refused for a reason of its own: the state is as before
    return doc.get_update()


@given(state=documents(), data=st.data())
def test_drawn_operations_agree_with_the_relay(state: bytes, data: st.DataObject) -> None:
    role, sub = data.draw(st.sampled_from(ACTORS), label="actor")
    with Conversation.from_update(state, author=sub, clock=clock) as view:
        operation = draw_operation(data.draw, view, KINDS)
    result = verdict(state, role, sub, operation)
    outcome = "not judged" if not result.judged else "refused" if result.relay else "accepted"
    event(f"{role} {type(operation).__name__}: {outcome}")
    problem = disagreement(role, operation, result)
    assert problem is None, problem
