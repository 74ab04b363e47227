"""The convergence machine over the real relay: replicas are `crdtchat.replica.Replica`s on
real websockets to a relay subprocess, and the relay's and clients' restarts are rules.

Each replica writes only what its token's role allows (design §4), drawn from the
`crdtchat.testing` strategies. At quiescence (every replica connected, synced, and told by
the relay that its writes are durable) all replicas hold the same document, read it the same
way, and have every message anyone wrote; a fresh replica with no local file then gets the
same document from the relay alone.

The network is real, so a run does not replay exactly; the writes and the order of rules do.
A client "crash" here closes the replica (its local file is flushed) and reopens it from that
file with a new in-memory document; SIGKILLed clients are tested in tests/replica/test_replica.py.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pycrdt import Array, Doc, Map, Text
from websockets.exceptions import ConnectionClosed

from crdtchat import membership, schema
from crdtchat.document import Conversation, PeerRole
from crdtchat.relay.config import RelayConfig
from crdtchat.replica import Backoff, Replica
from crdtchat.schema import answered_id_of, assistant_turn_id, message_id_refusal
from crdtchat.testing import (
    CreateConversation,
    check_converged,
    check_no_gap,
    check_reader_rules,
    decode_state_vector,
    roots_json,
    strategies,
)
from crdtchat.testing.floods import AwarenessFlood, awareness_floods
from crdtchat.testing.invariants import raw_message_ids
from crdtchat.testing.operations import AppendMessage, CommitTurn, ForeignMessageAt, Operation
from crdtchat.tokens import mint_token
from crdtchat.wire import SyncStep1, SyncUpdate
from tests.support import hypothesis_profiles
from tests.support.relay import (
    SECRET,
    RawClient,
    RelayProcess,
    declare_roots,
    message_map,
    raw_client,
    token,
)

FAST = Backoff(initial=0.05, maximum=0.5)
DEFAULTS = RelayConfig(secret="")  # the relay below runs with the default limits
CONVERGE_TIMEOUT = 60.0
DEEP = 20_000  # a hostile value this deep killed the relay before it had a depth limit
LONG = hypothesis_profiles.PROFILE == "long"
pytestmark = pytest.mark.timeout(0 if LONG else 300)

_rooms = itertools.count()


@dataclass
class Client:
    """One device: its token's role, its local file, and the replica while it runs."""

    index: int
    sub: str
    role: PeerRole
    store: Path
    replica: Replica | None = None
    conversation: Conversation | None = None
    stop: anyio.Event | None = None
    done: Any = None  # the portal future of the task that runs the replica
    client_ids: list[int] = field(default_factory=list)


@dataclass
class Watcher:
    """A listener whose access ends: a member the owner removes, or a token that expires.

    `ended` is when its access ended (the owner's removal was answered, or the token's `exp`);
    every message written after that must never reach it (design §4, access ends)."""

    sub: str
    kind: str  # "member" or "expiring"
    client: RawClient
    stop: anyio.Event
    done: Any
    ended: float | None = None


def writes_for(
    conversation: Conversation, role: PeerRole, id_prefix: str
) -> st.SearchStrategy[Operation]:
    """What a token of `role` may write (design §4): the relay refuses anything else.

    Message ids start with `id_prefix`, one per client: the relay refuses a taken id (design
    §7.2), so two clients must not both append a message with the same one.
    """
    if role == "worker":
        holder = (conversation.author,)
        return st.one_of(
            strategies.commits(conversation),
            strategies.leases(conversation, holders=holder),
            strategies.streams(conversation),
            strategies.derived_changes(conversation),
            strategies.text_edits(conversation),
        )
    transport = strategies.transport_changes(conversation)
    return st.one_of(
        strategies.append_messages(
            conversation, roles=("system", "user", "tool"), id_prefix=id_prefix
        ),
        strategies.text_edits(conversation),
        strategies.settings_changes(),
        transport.filter(lambda op: type(op).__name__ != "ClearRegeneration"),
    )


class RelayMachine(RuleBasedStateMachine):
    """2–3 replicas of one room on a real relay; set `relay`, `workdir`, `portal` first."""

    relay: ClassVar[RelayProcess]
    workdir: ClassVar[Path]
    portal: ClassVar[BlockingPortal]
    #: what the runs did, so the test can say it exercised something
    tally: ClassVar[dict[str, int]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.room = f"stateful-{next(_rooms)}"
        self.clients: list[Client] = []
        self.written: set[str] = set()
        self.written_at: dict[str, float] = {}  # when each message was made, before sending
        self.watchers: list[Watcher] = []
        self.next_client_id = 1

    # -- running replicas on the portal's event loop -------------------------------------------

    def _open(self, client: Client) -> None:
        client_id = self.next_client_id
        self.next_client_id += 1
        client.client_ids.append(client_id)
        url = f"ws://{self.relay.host}:{self.relay.port}"
        tok = token(self.room, client.role, client.sub)

        async def run(stop: anyio.Event, *, task_status: Any) -> None:
            async with Replica(
                url,
                self.room,
                tok,
                doc=Doc(client_id=client_id),
                store_path=client.store,
                backoff=FAST,
            ) as replica:
                task_status.started(replica)
                await stop.wait()

        client.stop = self.portal.call(anyio.Event)
        client.done, client.replica = self.portal.start_task(run, client.stop)
        assert client.replica is not None
        client.conversation = Conversation(
            client.replica.doc, author=client.sub, role=client.role, clock=_clock
        )

    def _close(self, client: Client) -> None:
        if client.stop is not None:
            self.portal.call(client.stop.set)
            client.done.result(timeout=30)
        if client.conversation is not None:
            self.portal.call(client.conversation.view.close)
        client.replica = client.conversation = client.stop = client.done = None

    def _on_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        """pycrdt documents are bound to the thread of the event loop that edits them."""
        return self.portal.call(_sync_call, function, *args)

    # -- rules ------------------------------------------------------------------------------------

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        # The room's owner: the first identity to open it while it holds nothing (design §4).
        self.portal.call(
            _touch, self.relay.url(self.room, mint_token(SECRET, None, None, "owner", 3600))
        )
        count = data.draw(st.integers(2, 3), label="replicas")
        people: list[tuple[str, PeerRole]] = [("alice", "writer")]
        for _ in range(count - 1):
            people.append(
                data.draw(
                    st.sampled_from([("alice", "writer"), ("bob", "writer"), ("bot", "worker")]),
                    label="device",
                )
            )
        for index, (sub, role) in enumerate(people):
            client = Client(index, sub, role, self.workdir / f"{self.room}-{index}.db")
            self.clients.append(client)
            self._open(client)
        first = self.clients[0].conversation
        assert first is not None
        self._on_loop(CreateConversation().apply, first)
        # alice's first question: something for every run to answer, edit, and forge
        self._on_loop(AppendMessage("q", "user", "first", parent=None).apply, first)
        self.written.add("q")

    @rule(data=st.data(), count=st.integers(1, 6))
    def write(self, data: st.DataObject, count: int) -> None:
        """`count` writes, each by any client, of what its role allows."""
        for _ in range(count):
            client = data.draw(st.sampled_from(self.clients), label="client")
            conversation = client.conversation
            assert conversation is not None
            strategy = self._on_loop(writes_for, conversation, client.role, f"{client.index}")
            if strategy.is_empty:
                continue
            operation = data.draw(strategy, label="operation")
            made = time.time()
            self._on_loop(operation.apply, conversation)
            event(f"write {type(operation).__name__} as {client.role}")
            _count(f"write as {client.role}")
            if isinstance(operation, AppendMessage):
                self.written.add(operation.message_id)
                self.written_at[operation.message_id] = made
            elif isinstance(operation, CommitTurn):
                self.written.add(operation.turn_id)
                self.written_at[operation.turn_id] = made

    @precondition(lambda self: bool(self.clients))
    @rule()
    def restart_relay(self) -> None:
        """SIGKILL the relay and start it again on the same port and data."""
        self.relay.restart()
        event("relay restarted")
        _count("relay restarts")

    @precondition(lambda self: bool(self.clients))
    @rule(data=st.data())
    def restart_client(self, data: st.DataObject) -> None:
        """Close a replica and reopen it from its local file, with a new client id."""
        client = data.draw(st.sampled_from(self.clients), label="client")
        self._close(client)
        self._open(client)
        event("client restarted")
        _count("client restarts")

    @precondition(lambda self: bool(self.clients))
    @rule(
        flood=awareness_floods(
            max_clients=DEFAULTS.awareness_clients,
            max_bytes=DEFAULTS.awareness_state_bytes,
            max_depth=DEFAULTS.awareness_depth,
            burst=int(DEFAULTS.awareness_burst),
        )
    )
    def awareness_flood(self, flood: AwarenessFlood) -> None:
        """A reader of the room floods awareness (design §7.3): it alone is closed, and the
        relay and the replicas carry on (checked at the next quiescence)."""
        url = self.relay.url(self.room, token(self.room, "reader", "mallory"))
        code, reason = self.portal.call(_flood, url, flood)
        assert code in flood.expected_codes, (flood, code, reason)
        assert self.relay.proc is not None and self.relay.proc.poll() is None
        event(f"awareness flood: {flood.kind}")
        _count("awareness floods")

    @precondition(lambda self: bool(self.clients))
    @rule(kind=st.sampled_from(["deep message", "deep settings", "oversized", "entries"]))
    def hostile_write(self, kind: str) -> None:
        """Another writer sends a value past the relay's shape limits (design §7.1): its
        connection is closed, and the relay and every replica carry on and converge."""
        url = f"ws://{self.relay.host}:{self.relay.port}"
        tok = token(self.room, "writer", "mallory")
        code, reason = self.portal.call(_hostile_write, url, self.room, tok, _hostile(kind))
        assert code == 1008 and reason is not None, (code, reason)
        assert reason.startswith("update exceeds limits"), reason
        event(f"hostile {kind} refused")
        _count("hostile writes refused")

    @precondition(lambda self: bool(self.clients))
    @rule()
    def quiesce(self) -> None:
        self.check_quiescent()

    # -- access that ends: membership and expiry (design §4) ------------------------------------

    def _watch(self, sub: str, kind: str, tok: str) -> Watcher:
        stop = self.portal.call(anyio.Event)
        done, client = self.portal.start_task(_listen, self.relay.url(self.room, tok), stop)
        watcher = Watcher(sub, kind, client, stop, done)
        self.watchers.append(watcher)
        return watcher

    @precondition(lambda self: bool(self.clients) and len(self.watchers) < 4)
    @rule(role=st.sampled_from(["reader", "writer"]))
    def share_with_a_listener(self, role: str) -> None:
        """The owner shares the room with a new person, who listens on a live connection."""
        sub = f"member-{len(self.watchers)}"
        base = f"ws://{self.relay.host}:{self.relay.port}"
        owner = mint_token(SECRET, None, None, "owner", 3600)
        membership.share(base, self.room, owner, sub, role)  # type: ignore[arg-type]
        self._watch(sub, "member", mint_token(SECRET, None, None, sub, 3600))
        _count("members added")

    @precondition(lambda self: bool(self.clients) and len(self.watchers) < 4)
    @rule()
    def listen_until_expiry(self) -> None:
        """A reader whose token expires within seconds listens on a live connection."""
        sub = f"expiring-{len(self.watchers)}"
        tok = token(self.room, "reader", sub, ttl=3)
        watcher = self._watch(sub, "expiring", tok)
        watcher.ended = float(read_exp(tok))
        _count("expiring listeners")

    @precondition(lambda self: any(w.kind == "member" and w.ended is None for w in self.watchers))
    @rule(data=st.data())
    def remove_a_member(self, data: st.DataObject) -> None:
        """The owner removes a listening member: from the answer on, nothing reaches it."""
        live = [w for w in self.watchers if w.kind == "member" and w.ended is None]
        watcher = data.draw(st.sampled_from(live), label="member")
        base = f"ws://{self.relay.host}:{self.relay.port}"
        owner = mint_token(SECRET, None, None, "owner", 3600)
        membership.unshare(base, self.room, owner, watcher.sub)
        watcher.ended = time.time()
        _count("members removed")
        # alice writes at once: a message the removed member must never receive
        after = f"after-{watcher.sub}"
        alice = self.clients[0].conversation
        made = time.time()
        self._on_loop(AppendMessage(after, "user", "after the removal", parent="q").apply, alice)
        self.written.add(after)
        self.written_at[after] = made

    def check_access_ended(self) -> None:
        """No message made after a listener's access ended has reached it."""
        for watcher in self.watchers:
            if watcher.ended is None:
                continue
            got = self._on_loop(_message_ids, watcher.client.doc)
            late = {i for i in got if self.written_at.get(i, 0.0) > watcher.ended}
            assert not late, f"{watcher.sub} got {sorted(late)} after its access ended"
            withheld = [i for i, at in self.written_at.items() if at > watcher.ended]
            _count("messages withheld from listeners whose access ended", len(withheld))

    # -- a forger: messages reusing taken ids (design §7.2) ---------------------------------------

    @precondition(lambda self: bool(self.written))
    @rule(data=st.data())
    def forge_duplicate_id(self, data: st.DataObject) -> None:
        """mallory inserts, at any position, a message reusing the id of a message written
        here (or the id of an answer to it). The relay refuses it unless it is the same
        assistant turn, and keeps serving the replicas, which converge without it (checked at
        every quiescence). What the replicas hold depends on the real network's timing, so the
        draws depend only on what was written; the forger waits until the relay has it."""
        written = sorted(self.written)
        answers = [assistant_turn_id(i, 1) for i in written if answered_id_of(i) is None]
        role = data.draw(st.sampled_from(strategies.ROLES), label="role")
        fields: dict[str, Any] = {
            "id": data.draw(st.sampled_from([*written, *answers]), label="id"),
            "role": role,
            "author": "mallory",
            "parent": data.draw(st.sampled_from([None, *written]), label="parent"),
            "content": data.draw(strategies.texts(), label="content"),
        }
        if role == "tool":
            fields["tool_call_id"] = "x"
        # a position in the document the forger gets: taken modulo its length
        operation = ForeignMessageAt(data.draw(st.integers(0, 2**16), label="position"), fields)
        role = "worker" if operation.fields["role"] == "assistant" else "writer"
        url = f"ws://{self.relay.host}:{self.relay.port}/{self.room}"
        tok = token(self.room, role, "mallory")
        expected, reason = self.portal.call(_forge, f"{url}?token={tok}&ext=ack", operation)
        if expected is None:
            assert reason is None, reason
            _count("forgeries accepted (the same assistant turn)")
        else:
            assert reason == expected
            _count("forgeries refused")
        event(f"forgery {'refused' if expected else 'accepted'}")

    # -- invariants -------------------------------------------------------------------------------

    def check_quiescent(self) -> None:
        replicas = [c.replica for c in self.clients]
        conversations = [c.conversation for c in self.clients]
        assert all(r is not None for r in replicas) and all(c is not None for c in conversations)
        self.portal.call(_wait_converged, replicas, CONVERGE_TIMEOUT)
        self._on_loop(_check_replicas, conversations, self.written)
        self.check_access_ended()
        event(f"quiescence with {min(len(self.written), 5)}+ messages written")
        _count("quiescences")
        _count("messages checked", len(self.written))

    def check_fresh_replica(self) -> None:
        """A replica with no local file gets everything from the relay alone."""
        expected = self._on_loop(lambda: roots_json(self.clients[0].conversation))
        url = f"ws://{self.relay.host}:{self.relay.port}"
        tok = token(self.room, "reader", "eve")
        fresh = self.portal.call(_fresh_roots, url, self.room, tok)
        assert fresh == expected, "a fresh replica got another document from the relay"

    def teardown(self) -> None:
        try:
            if self.clients and sys.exc_info()[0] is None:
                self.check_quiescent()
                self.check_fresh_replica()
        finally:
            for client in self.clients:
                self._close(client)
            for watcher in self.watchers:
                self.portal.call(watcher.stop.set)
                watcher.done.result(timeout=30)


async def _flood(url: str, flood: AwarenessFlood) -> tuple[int | None, str | None]:
    async with raw_client(url) as mallory:
        for frame in flood.frames:
            if mallory.closed:
                break
            with contextlib.suppress(ConnectionClosed):  # closed meanwhile
                await mallory.send_raw(frame)
        return await mallory.wait_closed(timeout=CONVERGE_TIMEOUT)


async def _forge(url: str, operation: ForeignMessageAt) -> tuple[str | None, str | None]:
    """Make `operation` on a fresh connection, once the relay holds what the id belongs to;
    (the relay's reason as `message_id_refusal` gives it, the reason the relay gave)."""
    fields = operation.fields
    message_id = fields["id"]
    async with raw_client(url) as forger:
        seen = Conversation(forger.doc, author="mallory")
        try:
            needed = answered_id_of(message_id) or message_id
            await forger.wait_for(
                lambda: seen.view.claimed(needed) is not None, timeout=CONVERGE_TIMEOUT
            )
            taken = seen.view.claimed(message_id)
            expected = message_id_refusal(
                message_id,
                fields["role"],
                fields["parent"],
                None if taken is None else (taken.role, taken.parent),
            )
            item = Map({**fields, "created_at": 0.0, "content": Text(fields["content"])})
            position = operation.position % (len(forger.messages) + 1)
            await forger.push(lambda doc: forger.messages.insert(position, item))
            await forger.wait_acked(timeout=CONVERGE_TIMEOUT)
        finally:
            seen.view.close()
        return expected, (forger.denied[0] if forger.denied else None)


MAX_VALUE_BYTES = 65_536
MAX_ENTRIES = 1_000
RELAY_ARGS = ["--max-value-bytes", str(MAX_VALUE_BYTES), "--max-entries", str(MAX_ENTRIES)]


def _hostile(kind: str) -> bytes:
    """An update past one of the relay's shape limits (default depth 32, RELAY_ARGS)."""
    doc: Doc = Doc()
    roots = declare_roots(doc)
    with doc.transaction():
        if kind == "oversized":
            roots[schema.SETTINGS]["system"] = "x" * (MAX_VALUE_BYTES + 1)
            return doc.get_update()
        top: Map = Map()
        if kind == "deep message":
            roots[schema.MESSAGES].append(message_map("hostile", "user", "mallory", "hi"))
            roots[schema.MESSAGES][0]["extra"] = top
        else:
            roots[schema.SETTINGS]["x"] = top
        if kind == "entries":
            for n in range(MAX_ENTRIES + 1):
                top[str(n)] = n
        else:
            current = top
            for _ in range(DEEP if kind == "deep message" else 40):
                current["k"] = inner = Map()
                current = inner
    return doc.get_update()


async def _hostile_write(url: str, room: str, tok: str, update: bytes) -> tuple[Any, Any]:
    async with raw_client(f"{url}/{room}?token={tok}") as client:
        await client.send(SyncUpdate(update))
        return await client.wait_closed(timeout=CONVERGE_TIMEOUT)


async def _touch(url: str) -> None:
    async with raw_client(url):
        pass


async def _listen(url: str, stop: anyio.Event, *, task_status: Any) -> None:
    """A raw listener that keeps what it receives until `stop` (or until the relay ends it).
    It asks for the room's state (so later updates integrate) without waiting for it: a
    token about to expire may be closed before the answer."""
    async with raw_client(url, hello=False) as client:
        with contextlib.suppress(ConnectionClosed):
            await client.send(SyncStep1(client.doc.get_state()))
        task_status.started(client)
        await stop.wait()


def _message_ids(doc: Doc) -> set[str]:
    items = doc.get(schema.MESSAGES, type=Array).to_py() or []
    return {m["id"] for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)}


def read_exp(tok: str) -> int:
    from crdtchat.tokens import read_claims_unverified

    return read_claims_unverified(tok).exp


def _count(what: str, n: int = 1) -> None:
    RelayMachine.tally[what] = RelayMachine.tally.get(what, 0) + n


def _clock() -> float:
    return 1_700_000_000.0


def _sync_call(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


async def _fresh_roots(url: str, room: str, tok: str) -> dict[str, Any]:
    async with Replica(url, room, tok, backoff=FAST, durable_acks=False) as replica:
        await replica.wait_until(lambda s: s.synced, timeout=CONVERGE_TIMEOUT)
        return roots_json(Conversation(replica.doc, author="eve", role="reader"))


async def _wait_converged(replicas: list[Replica], timeout: float) -> None:
    """Until every replica is connected, synced, durable and holds the same state vector,
    woken by status changes and document updates (no polling)."""

    def settled() -> bool:
        statuses = [r.status for r in replicas]
        if not all(s.connected and s.synced and s.durable and s.unsaved == 0 for s in statuses):
            return False
        return _same_state(replicas)

    with anyio.fail_after(timeout):
        while not settled():
            changed = anyio.Event()
            with _wake_on_change(replicas, changed.set):
                if settled():
                    return
                await changed.wait()


def _same_state(replicas: list[Replica]) -> bool:
    vectors = {tuple(sorted(decode_state_vector(r.doc.get_state()).items())) for r in replicas}
    return len(vectors) == 1


@contextmanager
def _wake_on_change(replicas: list[Replica], wake: Callable[[], None]) -> Iterator[None]:
    subscriptions = [(r.doc, r.doc.observe(lambda _event: wake())) for r in replicas]
    unsubscribes = [r.on_status(lambda _status: wake()) for r in replicas]
    try:
        yield
    finally:
        for doc, subscription in subscriptions:
            doc.unobserve(subscription)
        for unsubscribe in unsubscribes:
            unsubscribe()


def _check_replicas(conversations: list[Conversation], written: set[str]) -> None:
    for index, conversation in enumerate(conversations):
        check_no_gap(conversation, f"replica {index}")
    states = check_converged(conversations)
    for state in states:
        check_reader_rules(state)
    for index, conversation in enumerate(conversations):
        lost = written - raw_message_ids(conversation)
        assert not lost, f"replica {index} lost messages {sorted(lost)}"


def test_replicas_on_a_real_relay_converge_through_relay_and_client_restarts(
    tmp_path: Path,
) -> None:
    RelayMachine.tally = {}
    relay = RelayProcess(tmp_path / "relay-data", RELAY_ARGS).start()
    try:
        with start_blocking_portal("asyncio") as portal:
            RelayMachine.relay = relay
            RelayMachine.workdir = tmp_path
            RelayMachine.portal = portal
            run_state_machine_as_test(
                RelayMachine,
                settings=settings(
                    max_examples=40 if LONG else 12,  # 8 missed a rule in 1 run of 12
                    stateful_step_count=40 if LONG else 15,
                    deadline=None,
                    database=None,
                    derandomize=not LONG,
                    suppress_health_check=list(HealthCheck),
                    phases=settings.default.phases,
                ),
            )
    finally:
        relay.stop()
    tally = RelayMachine.tally
    print(f"\nRelayMachine: {tally}")
    for what in (
        "write as writer",
        "relay restarts",
        "client restarts",
        "quiescences",
        "awareness floods",
        "forgeries refused",
        "hostile writes refused",
        "members added",
        "expiring listeners",
    ):
        assert tally.get(what, 0) > 0, f"no {what} in {tally}"
    assert tally.get("messages checked", 0) > 0
