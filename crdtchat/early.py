"""Updates that arrive before what they build on wait, as they do in Yjs.

pycrdt 0.14 integrates an item whose client's earlier clocks are missing as soon as its
origins are present: it is shown, but its clock is not in the state vector, so it is never
passed on, and later edits inside it raise no events (tests/testing/test_convergence.py). Through a
relay this happens whenever a broadcast overtakes the sync step 2 that carries its
predecessors. Yjs keeps such an update back until the gap is filled (its "pending structs";
here "pending" means local updates the relay has not stored, design §3); `EarlyUpdates` does
the same in front of `Doc.apply_update`: of each update, the structs that can be integrated
(their client's earlier clocks, their origins and parents are in the document or taken from
the same update) and the deletions of known clocks are applied; the rest is held and retried
after each update that is applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from crdtchat.updates import (
    SKIP,
    DecodedUpdate,
    Struct,
    check_update,
    decode_update,
    encode_update,
)
from crdtchat.wire import decode_state_vector

log = logging.getLogger(__name__)

Ready = tuple[bytes | None, DecodedUpdate | None]


def split(update: DecodedUpdate, state: dict[int, int]) -> Ready:
    """The part of `update` a document at `state` can integrate now, and the rest.

    Per client, structs are taken in clock order while each one's earlier clocks, origins and
    parent are in the document or already taken (across clients, until nothing more can be
    taken); deletions are taken up to the clocks then known. Returns (ready bytes or None,
    rest or None); when nothing waits, the ready bytes are `update`'s own.
    """
    available = dict(state)
    todo: dict[int, list[Struct]] = {}
    for client, runs in update.structs.items():
        known = state.get(client, 0)
        fresh = [struct for struct in runs if struct.end > known]
        if fresh:
            todo[client] = fresh
    taken: dict[int, list[Struct]] = {}
    progress = True
    while progress:
        progress = False
        for client, fresh in todo.items():
            done = 0
            for struct in fresh:
                cursor = available.get(client, 0)
                if struct.clock > cursor or (struct.kind == SKIP and struct.end > cursor):
                    break
                refs = (struct.origin, struct.right_origin, struct.parent)
                if any(type(ref) is tuple and ref[1] >= available.get(ref[0], 0) for ref in refs):
                    break
                if struct.kind != SKIP:
                    taken.setdefault(client, []).append(struct)
                available[client] = max(cursor, struct.end)
                done += 1
            if done:
                del fresh[:done]
                progress = True
    left = {client: fresh for client, fresh in todo.items() if fresh}
    ready_deletes: dict[int, list[tuple[int, int]]] = {}
    rest_deletes: dict[int, list[tuple[int, int]]] = {}
    for client, ranges in update.deletes.items():
        end_known = available.get(client, 0)
        for clock, length in ranges:
            end = clock + length
            if clock < end_known:
                ready_deletes.setdefault(client, []).append((clock, min(end, end_known) - clock))
            if end > end_known:
                start = max(clock, end_known)
                rest_deletes.setdefault(client, []).append((start, end - start))
    if not left and not rest_deletes:
        return update.data, None
    ready = None
    if taken or ready_deletes:
        ready = encode_update(update.data, taken, ready_deletes)
    return ready, decode_update(encode_update(update.data, left, rest_deletes))


class EarlyUpdates:
    """What one document holds back; `offer` applies what it can and keeps the rest.

    At most `max_bytes` are held: past that the oldest held parts are dropped (logged). That
    loses nothing for good, since a peer that sent them can send them again at the next sync,
    and it bounds what a peer that sends updates which never become ready can make us keep.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._held: list[DecodedUpdate] = []

    def __len__(self) -> int:
        return len(self._held)

    @property
    def held(self) -> list[bytes]:
        """The parts of updates still waiting, as updates (to pass on, or to inspect)."""
        return [held.data for held in self._held]

    def missing_from(self, state: dict[int, int]) -> list[bytes]:
        """The held parts a peer at `state` (a decoded state vector) lacks, to pass on after
        a sync step 2, as Yjs passes on its pending structs (filtered by the peer's state
        vector in `encodeStateAsUpdate`).

        Per client, the structs that end beyond `state`; a part is passed on, with its
        deletions, when it has such structs or deletes clocks beyond `state`. A part the peer
        already holds is not: behind a relay, everything a client holds early came from the
        relay and is in its state vector, so nothing is sent back for it to judge.
        """
        missing: list[bytes] = []
        for held in self._held:
            structs = {
                client: [struct for struct in runs if struct.end > state.get(client, 0)]
                for client, runs in held.structs.items()
            }
            beyond = any(structs.values()) or any(
                clock + length > state.get(client, 0)
                for client, ranges in held.deletes.items()
                for clock, length in ranges
            )
            if not beyond:
                continue
            whole = all(len(structs[c]) == len(runs) for c, runs in held.structs.items())
            missing.append(held.data if whole else encode_update(held.data, structs, held.deletes))
        return missing

    def offer(
        self,
        update: bytes,
        state_vector: Callable[[], bytes],
        apply: Callable[[bytes], None],
        *,
        complete: bool = False,
    ) -> list[bytes]:
        """Apply what of `update` can be integrated, hold the rest; then apply what of the
        held updates has become ready. Returns what was applied, in order.

        `complete`: the sender computed `update` from this document's state vector (a sync
        step 2 from a peer that holds nothing back), so all of it can be integrated; it is
        applied without being decoded here, which matters for a whole conversation, but is
        checked first (`check_update`: a JSON value nested too deep would crash pycrdt).
        Raises UpdateFormatError (a ValueError) for bytes that are not an update; nothing is
        held then.
        """
        applied: list[bytes] = []
        if complete:
            check_update(update)  # not decoded, but never applied unchecked (design §7.1)
            apply(update)
            applied.append(update)
        else:
            self._held.append(decode_update(update))
        progress = bool(self._held)
        while progress:
            progress = False
            for held in list(self._held):
                ready, rest = split(held, decode_state_vector(state_vector()))
                if ready is not None:
                    # Out of the list before applying: if pycrdt refuses it, it is not kept.
                    self._held.remove(held)
                    apply(ready)
                    applied.append(ready)
                    if rest is not None:
                        self._held.append(rest)
                    progress = True
                elif rest is not None and rest.data != held.data:
                    self._held[self._held.index(held)] = rest
        while sum(len(held.data) for held in self._held) > self.max_bytes:
            dropped = self._held.pop(0)
            log.warning("dropped %d bytes of updates held too long", len(dropped.data))
        return applied
