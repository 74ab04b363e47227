"""The relay gives memory that unloaded rooms freed back to the system (crdtchat.relay.heap).

glibc keeps freed chunks in the middle of its heap for reuse; `malloc_trim(0)` returns their
pages. The first test shows that on this process's own heap, with the real C library, the way
a relay's heap looks after most of its rooms unloaded while a few stay.
"""

from __future__ import annotations

import gc

from crdtchat.relay.heap import HeapTrimmer
from tests.support.memory import rss_bytes


def test_a_trim_gives_back_what_was_freed_between_live_allocations() -> None:
    trimmer = HeapTrimmer(interval=1.0)
    assert trimmer.trim is not None, "this C library has no malloc_trim"
    # 64 MiB in 2 KiB chunks (malloc'd: above Python's small-object limit), then every chunk
    # but one in 64 freed: the survivors pin the heap, so nothing goes back by itself.
    chunks = [bytearray(2048) for _ in range(32 * 1024)]
    survivors = chunks[::64]
    del chunks
    gc.collect()
    before = rss_bytes()
    trimmer.room_unloaded(rooms_left=0)
    given_back = before - rss_bytes()
    assert trimmer.trims == 1
    assert given_back > 32 * 2**20, f"the trim gave back {given_back / 2**20:.1f} MiB of ~63"
    assert len(survivors) == 512


def test_trims_at_most_once_per_interval_and_when_the_last_room_goes() -> None:
    calls: list[None] = []
    trimmer = HeapTrimmer(interval=3600.0, trim=lambda: calls.append(None))
    for rooms_left in range(100, 1, -1):
        trimmer.room_unloaded(rooms_left)
    assert len(calls) == 1
    trimmer.room_unloaded(rooms_left=0)  # the load is gone: trimmed whatever the interval
    assert len(calls) == 2 and trimmer.trims == 2
    never = HeapTrimmer(interval=0, trim=lambda: calls.append(None))
    never.room_unloaded(rooms_left=0)
    assert len(calls) == 2
