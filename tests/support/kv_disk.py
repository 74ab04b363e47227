"""Run in a child process under `unshare -m` (see tests/worker/test_worker_local.py): local-model
turns whose KV checkpoint directory is a small tmpfs that fills up, turns read-only, becomes
writable again, then refuses to create files (immutable: EPERM, an error that is not "full"),
and is cleared again.

Usage: python -m tests.support.kv_disk DIR, from the repository (DIR is a tmpfs mounted in
this mount namespace). Prints one JSON object per turn: status, cached input tokens, whether a
checkpoint entry was written, and the checkpoint files in DIR; logs warnings to stderr.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import anyio

from crdtchat.document import Conversation
from crdtchat.kvcache import KVCheckpointStore
from crdtchat.providers.local import LocalProvider
from crdtchat.worker.room import ProviderPool, RoomSettings, serve_room
from crdtchat.worker.turn import TurnSettings
from tests.support.faults import set_immutable

ONCE = RoomSettings(idle_after=0.0, turn=TurnSettings(flush_interval=0.05))


async def main(directory: Path) -> None:
    # No byte limit to speak of: only the filesystem can say no here.
    store = KVCheckpointStore(directory, max_bytes=1 << 40)
    provider = LocalProvider(kv_store=store, reuse_live_state=False, n_threads=1)
    pool = ProviderPool("local", make=lambda name, *, model: provider)
    person = Conversation.create(author="alice")
    person.set_settings(system="Be brief.", params={"max_tokens": 8})
    worker = Conversation(person.doc, author="worker-1")

    async def turn(question: str) -> None:
        asked = person.append("user", question)
        with anyio.fail_after(60):
            committed = await serve_room(worker, pool, room="disk", settings=ONCE)
        [reply] = person.assistant_answers(asked.id)
        entries = [e for e in person.derived_entries().values() if e.message_id == reply.id]
        usage = next(e.data for e in entries if e.kind == "usage")
        print(
            json.dumps(
                {
                    "committed": committed,
                    "status": reply.status,
                    "text": reply.content,
                    "cached": usage["cached_input_tokens"],
                    "checkpoint": any(e.kind == "kv_checkpoint" for e in entries),
                    "files": sorted(p.name for p, _ in store.files()),
                    "sizes": [s.st_size for _, s in store.files()],
                }
            ),
            flush=True,
        )

    await turn("Name a colour.")
    # Shrink the filesystem to 2.4 of that checkpoint: the next one (~1.7 of it, as it holds
    # more tokens) only fits once the old one is evicted.
    [size] = [s.st_size for _, s in store.files()]
    remount(directory, f"size={size * 12 // 5 // 4096 * 4096}")
    await turn("Name another one.")
    # Fill what is left with someone else's file: even evicting every checkpoint cannot make
    # room now.
    filler = directory / "someone-elses-file"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    await turn("And a third?")
    filler.unlink()
    remount(directory, "ro")
    await turn("One more?")
    # Writable again: checkpoints are written again, with no restart.
    remount(directory, "rw,size=64m")
    await turn("Name a fruit.")
    # Files cannot be created (EPERM, not a full disk): no checkpoint, but the one before
    # still serves this turn's prefix; then cleared, and the next turn writes one again.
    set_immutable(directory, True)
    try:
        await turn("Another fruit?")
    finally:
        set_immutable(directory, False)
    await turn("And a last one?")


def remount(directory: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(directory)], check=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    anyio.run(main, Path(sys.argv[1]))
