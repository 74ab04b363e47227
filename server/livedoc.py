"""A room's in-memory document, which only ever holds accepted changes.

An incoming update is applied to the live pycrdt document inside one transaction while deep
observers on every root record what changed; `server.permissions` then judges the record. If
the update is refused, the document is thrown away and rebuilt from the last good state (a
base update plus the accepted updates since), which was never touched. The common case, an
accepted update, costs one apply plus reading the events; only refusals pay for a rebuild.

Two things could slip past observers and are checked separately:
- Updates with missing dependencies stay *pending* inside yrs and raise no events now; they
  would be integrated later under someone else's update. After applying, the update's structs
  must all be below the new state vector and its deletions must name known items, otherwise it
  is refused.
- A write to a root that the schema does not name creates that root; the number of roots is
  compared before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from pycrdt import Array, Doc, Map, TransactionEvent, get_update, merge_updates

from crdtchat import schema
from crdtchat.wire import Reader, WireError, decode_state_vector
from server.permissions import Event, check_changes

EMPTY_UPDATE = b"\x00\x00"


class UndecodableUpdate(ValueError):
    """An update that pycrdt cannot decode or integrate: a protocol violation, not a refusal."""


@dataclass(frozen=True)
class Accepted:
    delta: bytes  # what the document gained; b"" when the update changed nothing


@dataclass(frozen=True)
class Refused:
    reason: str


Outcome = Accepted | Refused


def _is_panic(error: BaseException) -> bool:
    return type(error).__name__ == "PanicException"


class LiveDoc:
    """The document of one room plus the last good state it can be rebuilt from."""

    def __init__(self, state: bytes = b"") -> None:
        self._base = state
        self._since: list[bytes] = []
        self.since_bytes = 0
        self._build(state)

    def _build(self, state: bytes) -> None:
        doc: Doc = Doc()
        roots: dict[str, Array | Map] = {}
        for name in schema.ALL_ROOTS:
            roots[name] = doc.get(name, type=Array if name == schema.MESSAGES else Map)
        if state and state != EMPTY_UPDATE:
            doc.apply_update(state)
        self._changes: list[tuple[str, Event]] = []
        self._deltas: list[bytes] = []
        for name, root in roots.items():
            root.observe_deep(partial(self._record, name))
        doc.observe(self._record_update)
        self.doc = doc
        self._roots = roots  # keeps the observed wrappers (and so the subscriptions) alive
        self._root_count = self._count_roots()

    def _record(self, root: str, events: list[Any]) -> None:
        for event in events:
            self._changes.append((root, event))

    def _record_update(self, event: TransactionEvent) -> None:
        self._deltas.append(event.update)

    def _count_roots(self) -> int:
        with self.doc.transaction() as txn:
            return len(self.doc._doc.roots(txn._txn))

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
            if _is_panic(error):
                raise WireError("state vector could not be decoded") from None
            raise WireError(f"state vector could not be decoded: {error}") from None

    def apply(self, update: bytes, role: str, sub: str) -> Outcome:
        """Apply `update` if (`role`, `sub`) may make every change in it; all or nothing."""
        self._changes.clear()
        self._deltas.clear()
        try:
            self.doc.apply_update(update)
        except BaseException as error:
            if not isinstance(error, Exception) and not _is_panic(error):
                raise
            self.rebuild()
            raise UndecodableUpdate(f"update could not be decoded: {error}") from None
        if not self._deltas:
            # Nothing integrated. Either everything was known already, or it is all pending.
            reason = self._pending_reason(update)
            if reason is not None:
                self.rebuild()
                return Refused(reason)
            return Accepted(b"")
        reason = self._pending_reason(update)
        if reason is None and role == "reader":
            reason = "a reader may not change the document"
        if reason is None and self._count_roots() != self._root_count:
            reason = "update writes a root that is not part of the schema"
        if reason is None:
            reason = check_changes(role, sub, self._changes, lambda: self.messages)
        if reason is not None:
            self.rebuild()
            return Refused(reason)
        delta = self._deltas[0] if len(self._deltas) == 1 else merge_updates(*self._deltas)
        self._changes.clear()
        self._since.append(delta)
        self.since_bytes += len(delta)
        return Accepted(delta)

    def _pending_reason(self, update: bytes) -> str | None:
        state = self.doc.get_state()
        try:
            rest = get_update(update, state)
            reader = Reader(rest)
            if reader.var_uint("struct client count") != 0:
                return "update depends on changes the relay does not have (sync first)"
            known = decode_state_vector(state)
            for _ in range(reader.var_uint("delete set client count")):
                client = reader.var_uint("delete set client")
                for _ in range(reader.var_uint("delete set range count")):
                    clock = reader.var_uint("delete range clock")
                    length = reader.var_uint("delete range length")
                    if clock + length > known.get(client, 0):
                        return "update deletes changes the relay does not have (sync first)"
        except (WireError, ValueError) as error:
            return f"update could not be checked: {error}"
        return None

    def rebuild(self) -> None:
        """Throw the document away and rebuild it from the last good state."""
        state = self.snapshot_source()
        self._base = state
        self._since = []
        self.since_bytes = 0
        self._build(state)

    def snapshot_source(self) -> bytes:
        if not self._since:
            return self._base
        if not self._base or self._base == EMPTY_UPDATE:
            parts = self._since
        else:
            parts = [self._base, *self._since]
        return parts[0] if len(parts) == 1 else merge_updates(*parts)

    def compact(self) -> bytes:
        """The whole current state as one update; also becomes the new rebuild base."""
        state = self.doc.get_update()
        self._base = state
        self._since = []
        self.since_bytes = 0
        return state
