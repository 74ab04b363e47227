"""What every provider takes and yields, independent of any wire format.

The worker builds a `TurnRequest` from the canonical thread plus the derived entries that
passed the three usability rules of design §2; a provider turns it into HTTP (or a local
model call) and yields `TurnEvent`s. Providers never touch the document: that keeps them
testable against loopback servers with no CRDT in sight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from crdtchat.errors import ProviderError as ProviderError
from crdtchat.schema import DerivedEntry, Message, Status, ToolCall, ToolSpec


@dataclass(frozen=True)
class TurnRequest:
    conversation_id: str
    model: str
    system: str
    tools: Mapping[str, ToolSpec]
    # root → the message being answered, inclusive; already validated by the view.
    thread: Sequence[Message]
    # prefix_hash of each message of `thread`, same order.
    prefix_hashes: Sequence[str]
    # usable derived entries (entry key → entry) for messages on `thread`, already checked
    # against the three rules for this provider, api and model; plus, when the message is
    # answered again, the `kv_checkpoint` entries of its earlier answers (off the thread).
    derived: Mapping[str, DerivedEntry] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDone:
    call: ToolCall


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    # what was actually sent after derived state saved the rest (for benchmarks/tokens.py)
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewDerived:
    """A derived entry the provider wants recorded against the assistant turn it produced."""

    kind: Literal["provider_state", "hidden", "kv_checkpoint"]
    data: Mapping[str, Any]
    expires_at: float | None = None


@dataclass(frozen=True)
class DiscardDerived:
    """The provider said a handle is gone: delete the entry (the turn is replayed in full)."""

    key: str
    reason: str


@dataclass(frozen=True)
class Finished:
    status: Status
    usage: Usage = field(default_factory=Usage)
    derived: Sequence[NewDerived] = ()
    error: str | None = None


@dataclass(frozen=True)
class StreamReset:
    """Text yielded so far is void (a retry after a cut stream starts over)."""

    reason: str


TurnEvent = TextDelta | ToolCallDone | DiscardDerived | StreamReset | Finished


class Provider(Protocol):
    """One API of one vendor. `name`/`api` go into ModelRef and derived entries."""

    name: str
    api: str

    def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        """Yield deltas, then exactly one `Finished` last.

        Retryable transport failures (429, 5xx, connection errors, a stream cut mid-way) are
        retried inside; what cannot be recovered ends with `Finished(status="incomplete"|"error")`
        rather than raising. Cancellation is the caller's: it cancels the task that iterates.
        """
        ...
