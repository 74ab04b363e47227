"""Awareness floods, for state machines whose replicas talk to a real relay (design §7.3).

Presence is not part of the document, so an awareness flood is not an `Operation`: it is a
list of wire frames that one hostile connection sends. Each flood breaks exactly one of the
relay's awareness limits, which are parameters here (the relay's configuration lives in the
server, which this library does not import); `expected_codes` says how the relay must close
the flooder. What must hold afterwards is the machine's usual invariant: the relay serves on
and every replica converges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import strategies as st

from crdtchat.wire import AwarenessEntry, AwarenessMessage, encode_awareness, encode_message

SearchStrategy = st.SearchStrategy


@dataclass(frozen=True)
class AwarenessFlood:
    """Frames one connection sends, and the close codes the relay may answer with."""

    kind: str
    frames: tuple[bytes, ...]
    expected_codes: frozenset[int]

    def __repr__(self) -> str:  # the frames are long: hypothesis prints this on failure
        return f"AwarenessFlood({self.kind!r}, {len(self.frames)} frames)"


def _frame(entries: list[AwarenessEntry]) -> bytes:
    return encode_message(AwarenessMessage(encode_awareness(entries)))


def awareness_floods(
    *, max_clients: int, max_bytes: int, max_depth: int, burst: int
) -> SearchStrategy[AwarenessFlood]:
    """Floods over a relay's limits: client ids per connection (at once or one by one),
    bytes per state, JSON depth (up to where Python's own parser would fail), and rate."""
    base = st.integers(2**20, 2**32)  # clear of the small client ids that machines hand out

    def many_at_once(first: int, extra: int) -> AwarenessFlood:
        entries = [AwarenessEntry(first + n, 1, json.dumps({"n": n})) for n in range(extra)]
        return AwarenessFlood("client ids at once", (_frame(entries),), frozenset({1008}))

    def one_by_one(first: int, extra: int) -> AwarenessFlood:
        frames = tuple(
            _frame([AwarenessEntry(first + n, 1, json.dumps({"n": n}))]) for n in range(extra)
        )
        return AwarenessFlood("client ids one by one", frames, frozenset({1008}))

    def too_big(client: int, over: int) -> AwarenessFlood:
        state = json.dumps({"name": "x" * (max_bytes + over)})
        frame = _frame([AwarenessEntry(client, 1, state)])
        return AwarenessFlood("big state", (frame,), frozenset({1009}))

    def too_deep(client: int, depth: int) -> AwarenessFlood:
        state = "[" * depth + "]" * depth
        frame = _frame([AwarenessEntry(client, 1, state)])
        # 1009 too when the brackets alone are over the size limit.
        return AwarenessFlood("deep state", (frame,), frozenset({1008, 1009}))

    def too_fast(client: int, over: int) -> AwarenessFlood:
        frames = tuple(
            _frame([AwarenessEntry(client, n + 1, json.dumps({"n": n}))])
            for n in range(burst + over)
        )
        return AwarenessFlood("burst", frames, frozenset({1008}))

    return st.one_of(
        st.builds(many_at_once, base, st.integers(max_clients + 1, max_clients * 4)),
        st.builds(one_by_one, base, st.integers(max_clients + 1, max_clients + 4)),
        st.builds(too_big, base, st.integers(1, 1024)),
        st.builds(too_deep, base, st.sampled_from([max_depth + 1, 1_000, 20_000])),
        st.builds(too_fast, base, st.integers(1, 50)),
    )
