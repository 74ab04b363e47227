"""The web client reads documents exactly as the Python `Conversation` does (design §2).

A differential test: random documents, hostile ones included (the operations of
`crdtchat.testing`, with foreign writes and shadowing ids), are read by `Conversation` and by
the web client's rules (web/src/rules.js, run in node on a yjs document built from the same
update), and what each would show must be equal: the current thread, which messages count,
which are skipped, and what waits for a reply with which answer number.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdtchat.document import Conversation
from crdtchat.testing.strategies import duplicate_ids, operations
from tests.support import JS


class JsReader:
    """One node process reading documents with rules.js, a line per document."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["node", str(JS / "web_rules.mjs")],
            cwd=JS,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def shown(self, update: bytes) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"update": base64.b64encode(update).decode()}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"node exited ({self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def js() -> Iterator[JsReader]:
    reader = JsReader()
    yield reader
    reader.close()


def python_shown(conversation: Conversation) -> dict[str, Any]:
    """What `Conversation` shows, in the shape rules.js `shown` returns."""
    last = conversation.view.last()
    thread = [] if last is None else conversation.thread(last.id)
    return {
        "thread": [
            {"id": m.id, "role": m.role, "content": m.content, "status": m.status} for m in thread
        ],
        "accepted": [m.id for m in conversation.all_messages()],
        "problems": [p.key for p in conversation.view.problems()],
        "waiting": [[w.message.id, w.answer_number] for w in conversation.waiting_for_reply()],
    }


def test_a_hand_made_hostile_document_reads_the_same(js: JsReader) -> None:
    """The cases the rules name, each present once: both readers skip the same entries."""
    conversation = Conversation(author="alice")
    first = conversation.append("user", "question")
    conversation.append(
        "assistant", "cut", parent=first.id, message_id=f"{first.id}~a1", status="incomplete"
    )
    messages = conversation.messages
    from pycrdt import Map, Text

    with conversation.doc.transaction():
        messages.append(Map({"id": first.id, "role": "user", "author": "m", "content": Text("x")}))
        messages.append(Map({"id": "d", "role": "user", "author": "m", "parent": "nowhere"}))
        messages.append(Map({"id": "r", "role": "wizard", "author": "m"}))
        messages.append(Map({"id": "s", "role": "user", "author": "m", "created_at": "1_0"}))
        messages.append(Map({"id": "t", "role": "user", "author": "m", "created_at": "never"}))
        messages.append(Map({"id": "f", "role": "user", "author": "m", "files": [{"sha256": "x"}]}))
        messages.append("not a map")
    conversation.request_regeneration(first.id)
    expected = python_shown(conversation)
    assert expected["problems"] == [2, 3, 4, 6, 7, 8]  # the document is as hostile as meant
    assert js.shown(conversation.encode_state()) == expected


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_random_and_hostile_documents_read_the_same(js: JsReader, data: st.DataObject) -> None:
    conversation = Conversation(author="alice", clock=lambda: 1000.0)  # operations check times
    for _ in range(data.draw(st.integers(1, 14), label="operations")):
        strategy = operations(conversation)
        if data.draw(st.integers(0, 4), label="shadow?") == 0:
            strategy = duplicate_ids(conversation) | strategy
        data.draw(strategy).apply(conversation)
    assert js.shown(conversation.encode_state()) == python_shown(conversation)
