"""Keep only the KV checkpoints that can still be used.

A local model saves one checkpoint per turn (about 23 MB at n_ctx 4096). A turn resumes from
the nearest usable checkpoint on its thread, so once an answer has its own checkpoint, the
ones before it on the same branch serve nobody, unless another live branch still has one of
them as its nearest. So for each leaf of the conversation the nearest checkpoint on its
thread (of this provider, api and model, with a prefix hash that still matches) is kept, and
every other one of that provider, api and model is dropped: its derived entry from the
document, its file from the cache. Entries of other models stay (a switch back may use them);
so do entries for messages this replica does not have.

What is dropped costs at most a prefill later: a new branch from an older point resumes from
whatever token prefix the live context shares with it, or evaluates its thread in full.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from crdtchat.document import Conversation
from crdtchat.schema import DerivedEntry

log = logging.getLogger(__name__)

__all__ = ["CheckpointReleaser", "drop_superseded_checkpoints", "superseded_checkpoints"]


@runtime_checkable
class CheckpointReleaser(Protocol):
    """A provider that keeps checkpoint files and can delete the ones no longer needed."""

    async def release_checkpoints(self, datas: Iterable[Mapping[str, Any]]) -> int: ...


def superseded_checkpoints(
    conversation: Conversation, *, provider: str, api: str, model: str
) -> dict[str, DerivedEntry]:
    """The `kv_checkpoint` entries of this provider, api and model that no branch needs."""
    entries = {
        key: entry
        for key, entry in conversation.derived_entries().items()
        if entry.kind == "kv_checkpoint"
        and (entry.provider, entry.api, entry.model) == (provider, api, model)
    }
    if not entries:
        return {}
    by_message: dict[str, list[tuple[str, DerivedEntry]]] = {}
    for key, entry in entries.items():
        by_message.setdefault(entry.message_id, []).append((key, entry))
    known = {m.id for m in conversation.all_messages()}
    live: set[str] = set()
    for leaf in conversation.leaves():
        thread = conversation.thread(leaf.id)
        for depth in range(len(thread) - 1, -1, -1):
            candidates = by_message.get(thread[depth].id)
            if not candidates:
                continue
            current = conversation.prefix_hash_of(thread[: depth + 1])
            matching = [(e.created_at, key) for key, e in candidates if e.prefix_hash == current]
            if matching:
                live.add(max(matching)[1])  # two for one message: the newer one
                break
    return {
        key: entry
        for key, entry in entries.items()
        if key not in live and entry.message_id in known
    }


async def drop_superseded_checkpoints(
    conversation: Conversation, provider: object, *, api: str, name: str, model: str
) -> int:
    """Delete superseded checkpoint entries (one transaction) and their files; bytes freed."""
    dropped = superseded_checkpoints(conversation, provider=name, api=api, model=model)
    if not dropped:
        return 0
    with conversation.doc.transaction():
        for key in dropped:
            conversation.discard_derived(key)
    freed = 0
    if isinstance(provider, CheckpointReleaser):
        try:
            freed = await provider.release_checkpoints([e.data for e in dropped.values()])
        except OSError as error:  # a cache that cannot shrink is no reason to fail a turn
            log.warning("could not delete superseded KV checkpoints: %s", error)
    log.info("dropped %d superseded KV checkpoints (%d bytes)", len(dropped), freed)
    return freed
