"""Differential oracle: Yjs reads the update bytes pycrdt wrote exactly as pycrdt does.

Histories come from `ConversationMachine` runs: at every quiescence each replica's updates
(in the order it applied them) are recorded with what pycrdt reads. One node process applies
all of them with the npm package `yjs` and prints, per history, the JSON of every root, the
state vector and Yjs's own encoding of the state, which pycrdt must read back the same.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

import tests.support.hypothesis_profiles  # noqa: F401  (profiles, if conftest has not loaded them)
from crdtchat import schema
from crdtchat.testing import ConversationMachine, SimulatedReplica, read_replica
from crdtchat.testing.invariants import assert_same_state, open_update
from tests.support import JS

SCRIPT = JS / "diff_apply.mjs"
KINDS = {name: "array" if name == schema.MESSAGES else "map" for name in schema.ALL_ROOTS}

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (JS / "node_modules" / "yjs").is_dir(),
    reason="needs node and `npm ci` in tests/js",
)


@dataclass(frozen=True)
class History:
    updates: tuple[bytes, ...]
    roots: dict[str, Any]
    state_vector: dict[int, int]


class RecordingMachine(ConversationMachine):
    """Records every replica's history at every quiescence (each distinct one once)."""

    histories: ClassVar[dict[tuple[bytes, ...], History]] = {}
    # Direct links: every write reaches the history, foreign junk included (behind the
    # relay most of it is refused, and the histories are poorer).
    topologies = ("peers",)

    def extra_invariants(self, replicas: Sequence[SimulatedReplica]) -> None:
        for replica in replicas:
            updates = tuple(replica.history)
            if updates not in self.histories:
                state = read_replica(replica.live)
                self.histories[updates] = History(updates, state.roots, state.state_vector)


def numbers_as_doubles(value: Any) -> Any:
    """JSON as both sides hold it: every number a double.

    The printers differ, not the values: for the double 43014339523086864.0 Rust prints
    `43014339523086864` and JavaScript `43014339523086860`, which Python parses as two
    different ints but as the same float.
    """
    if isinstance(value, dict):
        return {key: numbers_as_doubles(item) for key, item in value.items()}
    if isinstance(value, list):
        return [numbers_as_doubles(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def run_in_yjs(histories: Sequence[History]) -> list[dict[str, Any]]:
    cases = [
        {"updates": [base64.b64encode(u).decode() for u in h.updates], "roots": KINDS}
        for h in histories
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(cases, file)
    path = Path(file.name)
    try:
        done = subprocess.run(
            ["node", str(SCRIPT), str(path)],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        path.unlink()
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_yjs_reads_generated_histories_like_pycrdt() -> None:
    RecordingMachine.histories.clear()
    run_state_machine_as_test(
        RecordingMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    histories = list(RecordingMachine.histories.values())
    assert sum(1 for h in histories if h.roots[schema.MESSAGES]) >= 30, "too few messages"
    results = run_in_yjs(histories)
    assert len(results) == len(histories)
    for number, (history, result) in enumerate(zip(histories, results, strict=True)):
        where = f"history {number} ({len(history.updates)} updates)"
        for name in schema.ALL_ROOTS:
            assert numbers_as_doubles(result["roots"][name]) == numbers_as_doubles(
                history.roots[name]
            ), f"{where}: Yjs reads {name}"
        yjs_vector = {int(client): clock for client, clock in result["state_vector"].items()}
        assert yjs_vector == history.state_vector, f"{where}: state vectors"
        # and back: pycrdt reads Yjs's own encoding of the state as it read its own
        from_yjs = read_replica(open_update(base64.b64decode(result["state"])))
        assert from_yjs.roots == history.roots, f"{where}: pycrdt reading Yjs's encoding"
        assert from_yjs.state_vector == history.state_vector, f"{where}: state vector back"


def test_yjs_and_pycrdt_agree_on_every_kind_of_value() -> None:
    """One hand-made history with each JSON kind and astral text, as a readable anchor."""
    from pycrdt import Doc

    from crdtchat.document import Conversation

    conversation = Conversation(Doc(client_id=7), author="alice", clock=lambda: 1.5)
    updates: list[bytes] = []
    conversation.on_update(updates.append)
    conversation.set_settings(
        system="sys 😀",
        params={"t": 0.7, "n": 3, "big": 2**53 - 1, "neg": -1e300, "l": [None, True, "x"]},
    )
    conversation.append("user", "a😀b𝔘c", message_id="m", parent=None)
    conversation.insert_text("m", 2, "é👩‍👩‍👧")
    conversation.delete_text("m", 0, 1)
    conversation.set_draft("draft \x00 nul")
    state = read_replica(conversation)
    [result] = run_in_yjs([History(tuple(updates), state.roots, state.state_vector)])
    assert numbers_as_doubles(result["roots"]) == numbers_as_doubles(state.roots)
    reread = read_replica(open_update(base64.b64decode(result["state"])))
    assert_same_state(state, reread, "pycrdt reading Yjs's encoding")


def test_yjs_keeps_a_write_pending_until_its_clients_earlier_writes_arrive() -> None:
    """What `SimulatedNetwork(hold_early_updates=True)` models, checked against Yjs itself
    (pycrdt shows such a write at once: see tests/testing/test_convergence.py)."""
    from pycrdt import Doc

    from crdtchat.document import Conversation

    writer = Conversation(Doc(client_id=1), author="alice")
    updates: list[bytes] = []
    writer.on_update(updates.append)
    writer.set_title("one")
    writer.set_title("two")
    writer.set_tool("calc", "adds", {})
    early, complete = run_in_yjs(
        [
            History((updates[0], updates[2]), {}, {}),
            History((updates[0], updates[2], updates[1]), {}, {}),
        ]
    )
    assert early["roots"][schema.TOOLS] == {}
    assert early["state_vector"] == {"1": 1}
    assert complete["roots"][schema.TOOLS] == {"calc": {"description": "adds", "parameters": {}}}
    assert complete["roots"][schema.META] == {"title": "two"}
