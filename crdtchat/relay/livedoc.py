"""A room's in-memory document, which only ever holds accepted changes.

An incoming update is applied to the live pycrdt document inside one transaction while deep
observers on every root record what changed; `crdtchat.relay.permissions` then judges the record. If
the update is refused, the document is thrown away and rebuilt from the last good state (a
base update plus the accepted updates since), which was never touched. The common case, an
accepted update, costs one apply plus reading the events; only refusals pay for a rebuild.
What is stored and broadcast is the update as received (it changed something, and all of it
was allowed); an update that changed nothing is acknowledged but neither stored nor sent on.

Before any of that, the update is decoded (`crdtchat.updates`) and its shape judged against
an index of where every item of the document lives (`crdtchat.structure`): an item that its
parent type cannot hold (a string inside an Array) makes pycrdt loop forever when the value is
read, so such an update is a protocol violation and is never applied. The index of a loaded
room is built off the event loop (`build_structure`) and `Room` holds writes until it is there.

Two things could slip past observers and are checked separately:
- Updates with missing dependencies stay *pending* inside yrs and raise no events now; they
  would be integrated later under someone else's update. The structure check refuses structs
  that would wait; after applying, the update's deletions must name known clocks, otherwise
  it is refused.
- A write to a root that the schema does not name creates that root; the number of roots is
  compared before and after.

New messages are also judged by their ids against every id the room holds
(`crdtchat.relay.message_ids`, design §7.2), which the observers cannot see: the old message is
not changed by the update.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from pycrdt import Array, Doc, Map

from crdtchat import schema
from crdtchat.early import split
from crdtchat.errors import RemoteProtocolError
from crdtchat.lifetime import ClosesOnExit, weak_method
from crdtchat.merge import merge
from crdtchat.pycrdt_internals import is_panic, raw_event_kind, root_count, wrap
from crdtchat.relay.message_ids import MessageIds
from crdtchat.relay.permissions import Change, check_changes
from crdtchat.relay.prejudge import refuse_before_applying, refuse_deletions_before_applying
from crdtchat.rights import RIGHTS, Access, Rights
from crdtchat.shape import MAX_READ_DEPTH
from crdtchat.structure import (
    MissingDependency,
    ShapeError,
    ShapeLimits,
    StructureError,
    StructureIndex,
)
from crdtchat.updates import (
    ARRAY,
    EMPTY_UPDATE,
    MAP,
    DecodedUpdate,
    UpdateFormatError,
    continuing_string,
    decode_update,
)
from crdtchat.wire import WireError, decode_state_vector

DEFAULT_LIMITS = ShapeLimits()  # the relay's defaults (crdtchat.relay.config.RelayConfig)
# Stored updates a node may hold unindexed (`LiveDoc.apply_stored`) before it drops the index.
MAX_UNINDEXED_BYTES = 1024 * 1024


class UndecodableUpdate(RemoteProtocolError, ValueError):
    """An update that pycrdt cannot decode or integrate: a protocol violation, not a refusal."""


class OverLimits(UndecodableUpdate):
    """An update whose values exceed the shape limits (design §7.1): closes the connection."""


@dataclass(frozen=True)
class Accepted:
    delta: bytes  # the update to store and broadcast; b"" when it changed nothing


@dataclass(frozen=True)
class Refused:
    reason: str


Outcome = Accepted | Refused


def _change(event: Any, doc: Doc) -> Change:
    """Read only what the rules need from a raw yrs event (each attribute is computed on
    access, and a text event's delta is never needed)."""
    kind = raw_event_kind(event)
    change = Change(kind, list(event.path))
    if kind == "array":
        change.delta = wrap(event.delta, doc)
    elif kind == "map":
        change.keys = wrap(event.keys, doc)
    return change


MESSAGE_WRITERS = frozenset(
    role for role, rights in RIGHTS.items() if schema.MESSAGES in rights.roots
)
_NO_RIGHTS = Rights({})

ROOT_TYPES = {name: ARRAY if name == schema.MESSAGES else MAP for name in schema.ALL_ROOTS}


def build_structure(
    state: bytes, limits: ShapeLimits = DEFAULT_LIMITS, log: Sequence[bytes] = ()
) -> StructureIndex:
    """The structure index of a stored room state and the log of updates stored after it, in
    order (trusted: they were checked on the way in).

    A 10,000-message room decodes into ~80,000 small tuples; the cyclic garbage collector,
    paused meanwhile, would otherwise scan them over and over (a third of the time). Each
    logged update was judged against the index of what came before it, so it is indexed the
    same way; one that cannot be (a log written by other means) has the whole indexed merged.
    """
    index = StructureIndex(ROOT_TYPES, limits)
    paused = gc.isenabled()
    gc.disable()
    try:
        if state and state != EMPTY_UPDATE:
            index.add(decode_update(state), judge=False)
        for update in log:
            try:
                index.add(decode_update(update), judge=False)
            except MissingDependency:
                return build_structure(merge(state, *log) if state else merge(*log), limits)
    finally:
        if paused:
            gc.enable()
    return index


class LiveDoc(ClosesOnExit):
    """The document of one room plus the last good state it can be rebuilt from.

    `close()` (or `with LiveDoc(...)`) when the room is done with it: it drops the deep
    observers, which yrs holds out of reach of Python's cycle collector (`crdtchat.lifetime`).
    """

    def __init__(
        self,
        state: bytes = b"",
        structure: StructureIndex | None = None,
        limits: ShapeLimits = DEFAULT_LIMITS,
        log: Sequence[bytes] = (),
    ) -> None:
        """`state`, then the stored updates of `log` in order: what the store holds, applied
        as it is (merging them into one update first would encode the whole room again)."""
        self.limits = limits
        self._subscriptions: list[Any] = []
        self.closed = False
        self._base = state
        self._since: list[bytes] = list(log)  # stored: a rebuild folds them into the base
        self.since_bytes = sum(len(update) for update in log)
        # The last `unstored` entries of `_since` were judged here but are not stored yet: a
        # cluster node may have to withdraw them (`withdraw`), so rebuilds keep them apart.
        self.unstored = 0
        self._loaded: tuple[bytes, Sequence[bytes]] = (state, log)
        self.structure = structure
        self.structure_error: str | None = None
        # Stored updates applied but not indexed yet (`apply_stored`), oldest first.
        self._unindexed: list[bytes] = []
        self._unindexed_bytes = 0
        self._index_from_document = False  # the index was dropped: build it from `doc`
        self.ids = MessageIds()  # the state never changes on a rebuild, so neither do they
        self._build(state, log)

    def _ensure_structure(self) -> StructureIndex | None:
        """The structure index of the whole document as it is now."""
        if self.structure is None and self.structure_error is None:
            if self._index_from_document:
                state, log = self.doc.get_update(), ()
            else:
                state, log = self._loaded
            try:  # nobody built it off the loop: build it now
                self.structure = build_structure(state, self.limits, log)
            except ValueError as error:
                self.structure_error = str(error)
            self._loaded = (b"", ())
            self._index_from_document = False
        if self._unindexed:
            self._index_stored()
        return self.structure

    def _index_stored(self) -> None:
        """Index the stored updates `apply_stored` left for later, in the order applied."""
        updates, self._unindexed, self._unindexed_bytes = self._unindexed, [], 0
        structure = self.structure
        if structure is None:
            return  # it cannot judge writes anyway (`structure_error`)
        for update in updates:
            try:
                structure.add(decode_update(update))
            except (ShapeError, UpdateFormatError, StructureError, MissingDependency) as error:
                # judged on another node against the same state: this copy cannot index
                # it, so it stops accepting writes rather than judge them against a wrong index
                self.structure = None
                self.structure_error = f"a stored update could not be indexed: {error}"
                return

    def shape_checked(self) -> bool:
        """Whether every shared type of the document is within the depth limit (design §7.1):
        then it can be read without checking first."""
        self._ensure_structure()
        structure, depth = self.structure, self.limits.depth
        return (
            structure is not None
            and depth is not None
            and depth <= MAX_READ_DEPTH
            and not structure.too_deep()
        )

    def adopt_structure(self, structure: StructureIndex) -> None:
        """Take the index `build_structure` made of the state this document was loaded from."""
        if self.structure is None and not self._index_from_document:
            self.structure = structure  # the stored updates applied meanwhile wait unindexed
        self._loaded = (b"", ())

    def close(self) -> None:
        """Drop the observers; the document is not used again (idempotent)."""
        self.closed = True
        self._drop_subscriptions()

    def _drop_subscriptions(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            subscription.drop()

    def _build(self, state: bytes, log: Sequence[bytes] = ()) -> None:
        self._drop_subscriptions()  # the old document's, on a rebuild
        doc: Doc = Doc()
        roots: dict[str, Array | Map] = {}
        for name in schema.ALL_ROOTS:
            roots[name] = doc.get(name, type=Array if name == schema.MESSAGES else Map)
        with doc.transaction():
            if state and state != EMPTY_UPDATE:
                doc.apply_update(state)
            for update in log:
                doc.apply_update(update)
        self._changes: list[tuple[str, Change | None]] = []
        self._rules: Mapping[str, Access] = {}
        # Whether the last `apply_stored` changed the membership: only then need a node look
        # again at every connection's role (`RoomProtocol.enforce_access`, O(peers)).
        self.members_changed = False
        self._record_error: str | None = None
        # Raw (unwrapped) deep observers: wrapping an event in pycrdt's Python classes costs
        # more than applying the update, and is only needed where the role's rights on that
        # root depend on what exactly changed. The callbacks hold this object weakly: yrs
        # holds them, and a strong reference back would be a cycle the collector cannot see.
        record = weak_method(self._record)
        self._subscriptions = [
            root.integrated.observe_deep(partial(record, name, doc)) for name, root in roots.items()
        ]
        self.doc = doc
        self._deleted: dict[int, list[tuple[int, int]]] | None = None  # see _delete_set
        self._roots = roots
        self._root_count = self._count_roots()

    def _record(self, root: str, doc: Doc, events: list[Any]) -> None:
        access = self._rules.get(root)
        try:
            for event in events:
                if access is None or access is Access.FULL:
                    self._changes.append((root, None))
                else:
                    self._changes.append((root, _change(event, doc)))
        except Exception as error:  # never let an observer fail inside yrs' commit
            self._record_error = f"update could not be inspected: {error}"

    def _count_roots(self) -> int:
        return root_count(self.doc)

    @property
    def messages(self) -> Array:
        return self._roots[schema.MESSAGES]  # type: ignore[return-value]

    def state_vector(self) -> bytes:
        return self.doc.get_state()

    def update_since(self, state_vector: bytes) -> bytes:
        """What a peer with `state_vector` lacks (a sync step 2); WireError if it is garbage."""
        try:
            return self.doc.get_update(state_vector)
        except Exception as error:  # yrs raises ValueError on a malformed state vector
            if is_panic(error):
                raise WireError("state vector could not be decoded") from None
            raise WireError(f"state vector could not be decoded: {error}") from None

    def apply(
        self,
        update: bytes,
        role: str,
        sub: str,
        *,
        partial: bool = False,
        gate: Callable[[int], None] | None = None,
    ) -> Outcome:
        """Apply `update` if (`role`, `sub`) may make every change in it; all or nothing.

        An accepted update that changed something comes back as its own bytes (they are what
        gets stored and broadcast); one that changed nothing comes back as b"".

        `partial`: part of an update may build on changes the room does not have; a Yjs
        client's sync step 2 carries the structs it holds pending, for instance. With
        `partial`, such an update is cut to the part that can be integrated (`crdtchat.early`),
        and that part is judged, stored and sent on as the update; without, it is refused
        (a peer that asked for acknowledgements must not be told the rest was stored).

        `gate(size)` is called before applying an update that adds new structs, with its size;
        it may raise (a quota, design §7.4), which leaves the document untouched. Refusals
        that the structure index can judge are made before applying too (`crdtchat.relay.prejudge`).
        """
        if self.closed:
            raise RuntimeError("this room document was closed")
        self._changes.clear()
        self._record_error = None
        self._rules = RIGHTS.get(role, _NO_RIGHTS).roots
        structure = self._ensure_structure()
        if structure is None:
            return Refused(f"the relay cannot check writes to this room: {self.structure_error}")
        streamed = self._apply_text_continued(update, structure, gate)
        if streamed is not None:
            return streamed
        try:
            decoded = decode_update(update)
            if partial:
                ready, rest = split(decoded, decode_state_vector(self.doc.get_state()))
                if ready is not None and rest is not None:
                    update, decoded = ready, decode_update(ready)
            plan = structure.check(decoded)
        except ShapeError as error:
            raise OverLimits(f"update exceeds limits: {error}") from None
        except (UpdateFormatError, StructureError) as error:
            raise UndecodableUpdate(f"update could not be decoded: {error}") from None
        except MissingDependency:
            return Refused("update depends on changes the relay does not have (sync first)")
        early = refuse_before_applying(role, structure, plan) or refuse_deletions_before_applying(
            role, structure, plan, decoded.deletes, self._delete_set
        )
        if early is not None:
            return Refused(early)  # nothing was applied: no rebuild
        reason = self._unwritable_root(plan.roots, role)
        if reason is not None:
            return Refused(reason)  # judged before applying: nothing to rebuild
        if gate is not None and plan.runs:
            gate(len(update))
        self.ids.discard()
        if not self.ids.loaded and role in MESSAGE_WRITERS and schema.MESSAGES in plan.roots:
            # once per load, before the first update that lands items in the messages (a
            # client's empty sync step 2, a draft, a read mark do not: no need to read them all)
            self.ids.load(self.messages, self.shape_checked())
        try:
            with self.doc.transaction():  # events fire when this transaction commits
                before = self.doc.get_state()
                self.doc.apply_update(update)
        except BaseException as error:
            if not isinstance(error, Exception) and not is_panic(error):
                raise
            self.rebuild()
            raise UndecodableUpdate(f"update could not be decoded: {error}") from None
        with self.doc.transaction():  # one read transaction for every check below
            after = self.doc.get_state()
            reason = self._record_error or self._unknown_deletion(decoded, after)
            changed = bool(self._changes) or (
                after != before and decode_state_vector(after) != decode_state_vector(before)
            )
            if reason is None and changed:
                if not self._rules:  # a role given no root (a reader) writes nothing
                    reason = f"a {role} may not change the document"
                elif self._count_roots() != self._root_count:
                    reason = "update writes a root that is not part of the schema"
                else:
                    reason = check_changes(
                        role, sub, self._changes, lambda: self.messages, self.ids.claim
                    )
        self._changes.clear()
        if reason is not None:
            self.ids.discard()
            self.rebuild()
            return Refused(reason)
        self.ids.commit()
        structure.commit(plan)
        if not changed:
            return Accepted(b"")
        self._deleted = None  # a change may delete items, its own update's delete set or not
        self._since.append(update)
        self.since_bytes += len(update)
        self.unstored += 1
        return Accepted(update)

    def _apply_text_continued(
        self, update: bytes, structure: StructureIndex, gate: Callable[[int], None] | None
    ) -> Outcome | None:
        """Judge and apply the commonest update, text added at the end of the writer's own
        last item in a root where the role may make any change; None for any other update.

        One flush of a streamed reply (the worker's text in `transport.streams`) is such an
        update, and the relay judges one per flush of every reply: the full path decodes it
        into objects, checks it as a plan, and reads the document's state and roots again
        after applying, none of which can change the verdict here. The same facts are
        checked for it (`continuing_string`, `StructureIndex.text_continued`): the item
        continues a known item of a Text whose root the role may change in any way (so no
        event can be refused, and no root can be created), within the value limit, past the
        growth gate; what it does not match goes the full way.
        """
        shape = continuing_string(update)
        if shape is None:
            return None
        client, clock, length, size = shape
        placed = structure.text_continued(client, clock)
        if placed is None:
            return None
        where, root = placed
        if self._rules.get(root) is not Access.FULL:
            return None
        max_bytes = self.limits.value_bytes
        if max_bytes is not None and size > max_bytes:
            return None  # the full path says why
        if gate is not None:
            gate(len(update))
        try:
            self.doc.apply_update(update)  # its own transaction: the events fire as it ends
        except BaseException as error:
            if not isinstance(error, Exception) and not is_panic(error):
                raise
            self.rebuild()
            raise UndecodableUpdate(f"update could not be decoded: {error}") from None
        self._changes.clear()
        if self._record_error is not None:
            reason = self._record_error
            self.rebuild()
            return Refused(reason)
        structure.extend(client, clock + length, where)
        self._deleted = None
        self._since.append(update)
        self.since_bytes += len(update)
        self.unstored += 1
        return Accepted(update)

    def local_write(self, write: Callable[[dict[str, Array | Map]], None]) -> bytes:
        """Make a change of the relay's own (membership, design §4) and return its update.

        No role may write the access roots, so the relay writes them itself, unjudged, in one
        transaction; the update is indexed and kept for rebuilds like an accepted one.
        """
        if self.closed:
            raise RuntimeError("this room document was closed")
        structure = self._ensure_structure()
        before = self.doc.get_state()
        with self.doc.transaction():
            write(self._roots)
        self._changes.clear()
        update = self.doc.get_update(before)
        if structure is not None:
            structure.commit(structure.check(decode_update(update)))
        self._deleted = None  # a removed member or a revoked invite is a deletion
        self._since.append(update)
        self.since_bytes += len(update)
        self.unstored += 1
        return update

    def apply_stored(self, update: bytes, *, unstored: bool = False) -> bool:
        """Apply an update that was judged elsewhere and is stored (a cluster node's stream
        hands back another node's write, design §3): unjudged and kept for rebuilds like an
        accepted one. Returns whether it changed the document.

        It is indexed only when this copy next needs the index (`_ensure_structure`): a node
        whose peers only watch what another node's writer sends never does, and decoding and
        checking every update was most of what relaying one cost it (issue 13). Past
        `MAX_UNINDEXED_BYTES` the index is dropped instead, to be built from the document
        when needed. The message id index is read again before the next judged write: the
        update may carry messages whose ids it must know. `unstored`: a withdrawn write of
        the relay's own (membership) applied again, which the store does not hold yet.
        """
        if self.closed:
            raise RuntimeError("this room document was closed")
        before = self.doc.get_state()
        self._changes.clear()
        self._rules = {}  # judged elsewhere: the observers only note which roots changed
        with self.doc.transaction():
            self.doc.apply_update(update)
        changes, self._changes = self._changes, []
        # A deletion of a live item is an event; one of a deleted item changes nothing.
        if not changes and self.doc.get_state() == before:
            self.members_changed = False
            return False
        self.members_changed = any(root == schema.MEMBERS for root, _ in changes)
        # (an index to be built from the document, or none at all, needs no backlog)
        if self.structure_error is None and not self._index_from_document:
            self._unindexed.append(update)
            self._unindexed_bytes += len(update)
            if self._unindexed_bytes > MAX_UNINDEXED_BYTES:
                self._drop_structure()
        self.ids.forget()
        self._deleted = None
        self._since.append(update)
        self.since_bytes += len(update)
        if unstored:
            self.unstored += 1
        return True

    def _drop_structure(self) -> None:
        """Forget the index and what waits to be indexed: built from the document as it is
        when next needed (a build decodes the whole state once; the backlog cost as much)."""
        self.structure = None
        self._unindexed, self._unindexed_bytes = [], 0
        self._loaded = (b"", ())
        self._index_from_document = True

    def _unwritable_root(self, roots: set[str], role: str) -> str | None:
        """Why new items may not land in `roots`, judged by the root alone.

        Items written into a type that is already deleted raise no event (yrs drops them
        unseen), so the rules over events cannot see them; the structure index knows the root
        they belong to. A role with no rights on a root, or only the right to delete, never
        adds items there.
        """
        for root in roots:
            if root not in ROOT_TYPES:
                continue  # a root outside the schema: refused after applying, as such
            access = self._rules.get(root)
            if access is None or access is Access.DELETE_ONLY:
                if not self._rules:
                    return f"a {role} may not change the document"
                if access is None:
                    return f"a {role} may not write {root}"
                return f"a {role} may only delete entries of {root}"
        return None

    def _delete_set(self) -> dict[int, list[tuple[int, int]]]:
        """Every deletion the document holds, per client in clock order.

        Read from an update from the document's own state vector (no structs, only the whole
        delete set): O(document), so it is kept until the next accepted change, which may
        delete items beyond its own delete set (a concurrent map write that loses). A run of
        refused deletions between two accepted changes reads it once.
        """
        if self._deleted is None:
            deletes = decode_update(self.doc.get_update(self.doc.get_state())).deletes
            self._deleted = {client: sorted(ranges) for client, ranges in deletes.items()}
        return self._deleted

    @staticmethod
    def _unknown_deletion(update: DecodedUpdate, state: bytes) -> str | None:
        """Why `update` is not fully integrated in a document at `state`, if it is not.

        Its structs were checked before it was applied (`StructureIndex.check` refuses any
        that would stay pending); what is left is its delete set, which yrs keeps pending too
        when it names clocks the document does not have.
        """
        if not update.deletes:
            return None
        known = decode_state_vector(state)
        for client, ranges in update.deletes.items():
            for clock, length in ranges:
                if clock + length > known.get(client, 0):
                    return "update deletes changes the relay does not have (sync first)"
        return None

    def rebuild(self) -> None:
        """Throw the document away and rebuild it from the last good state (the unstored
        updates stay apart from the base, so that they can still be withdrawn)."""
        state = self.snapshot_source()
        self._fold_stored()
        self._build(state)

    def _fold_stored(self) -> None:
        """Merge the stored part of `_since` into the base; keep the unstored tail."""
        keep = self.unstored
        stored = self._since[: len(self._since) - keep]
        if stored:
            tail = self._since[len(self._since) - keep :]
            self._base = self._merged(self._base, stored)
            self._since = tail
            self.since_bytes = sum(len(update) for update in tail)

    @staticmethod
    def _merged(base: bytes, updates: list[bytes]) -> bytes:
        if not base or base == EMPTY_UPDATE:
            return updates[0] if len(updates) == 1 else merge(*updates)
        return merge(base, *updates)

    def stored(self, count: int) -> None:
        """The oldest `count` unstored updates are stored now: they can no longer be withdrawn."""
        self.unstored -= min(count, self.unstored)

    def withdraw(self) -> list[bytes]:
        """Take back every unstored update (a cluster node's conditional publish was refused:
        another node wrote first) and rebuild the document from the stored state without
        them, as after a refusal. Returns them, oldest first, to be judged again. The
        structure index and the message ids are read again from the rebuilt document."""
        if not self.unstored:
            return []
        cut = len(self._since) - self.unstored
        withdrawn = self._since[cut:]
        self._since = self._since[:cut]
        self.since_bytes = sum(len(update) for update in self._since)
        self.unstored = 0
        self.rebuild()
        self.structure = None  # it indexed the withdrawn updates too: built again when needed
        self.structure_error = None
        self._unindexed, self._unindexed_bytes = [], 0  # the snapshot holds them
        self._index_from_document = False
        self._loaded = (self.snapshot_source(), ())
        self.ids.forget()
        self._deleted = None
        return withdrawn

    def snapshot_source(self) -> bytes:
        if not self._since:
            return self._base
        if not self._base or self._base == EMPTY_UPDATE:
            parts = self._since
        else:
            parts = [self._base, *self._since]
        return merge(*parts)

    def compact(self) -> bytes:
        """The whole current state as one update; also becomes the new rebuild base."""
        state = self.doc.get_update()
        if self.unstored:  # the rebuild base keeps only what is stored
            self._fold_stored()
        else:
            self._base = state
            self._since = []
            self.since_bytes = 0
        return state
