"""Shared helpers for the document tests: a clock tests move by hand, and replica plumbing."""

from __future__ import annotations

from crdtchat.document import Conversation
from crdtchat.schema import FileRef, ModelRef

MODEL = ModelRef(provider="openai", api="responses", model="gpt-test")
OTHER_MODEL = ModelRef(provider="anthropic", api="messages", model="claude-test")
FILE = FileRef(sha256="ab" * 32, name="notes.txt", mime="text/plain", size=12)


class Clock:
    """Time that only moves when a test says so: lease and expiry tests need no sleeps."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sync(*replicas: Conversation) -> None:
    """Exchange state until every replica has everything every other one has."""
    for source in replicas:
        for target in replicas:
            if source is not target:
                target.apply_update(source.update_since(target.state_vector()))


def snapshot(conversation: Conversation) -> list[dict]:
    """The accepted messages as plain data, for comparing replicas."""
    return [m.model_dump() for m in conversation.all_messages()]


def fresh_copy(conversation: Conversation, author: str = "reader") -> Conversation:
    """The same document opened from scratch: what a full rebuild of the view sees."""
    return Conversation.from_update(conversation.encode_state(), author=author)
