"""A device that comes back after a week: its replica was closed while the room gained 1,000
messages and the relay compacted the room's log many times, and it wrote offline meanwhile.
On its return it syncs, keeps its edits, and downloads about what it lacks (the bytes the
relay sent it, against the JSON of the messages it was missing; the exact ratio is printed and
recorded in docs/performance.md)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import httpx
import pytest

from crdtchat.document import Conversation
from crdtchat.replica import Backoff, Replica
from tests.support.relay import raw_client, running_relay, token
from tests.support.replica import wait_doc

ROOM = "week-1"
AWAY_MESSAGES = 1_000
COMPACT_EVERY = 50  # the relay compacts the room's log every 50 updates: 20+ times
FAST = Backoff(initial=0.05, maximum=0.5)


def _relay_metric(http_url: str, name: str) -> float:
    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    match = re.search(rf"^crdtchat_{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def _text(rng: random.Random) -> str:
    words = ["relay", "replica", "week", "offline", "message", "thread", "café", "日本", "😀"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))


@pytest.mark.anyio
async def test_a_replica_back_after_a_week_keeps_its_edits_and_downloads_what_it_lacks(
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    laptop_file = tmp_path / "laptop.db"
    args = ["--compact-updates", str(COMPACT_EVERY)]
    with running_relay(tmp_path / "relay-data", args) as relay:
        url = f"ws://{relay.host}:{relay.port}"

        def device(sub: str, conversation: Conversation, store: Path | None) -> Replica:
            return Replica(
                url,
                ROOM,
                token(ROOM, "writer", sub),
                doc=conversation.doc,
                store_path=store,
                backoff=FAST,
            )

        laptop = Conversation(author="ann", role="writer")
        async with device("ann", laptop, laptop_file) as rep:
            for i in range(10):
                laptop.append("user", f"before the week {i}")
            await rep.wait_until(lambda s: s.durable, timeout=30)
        last_seen = laptop.current_thread()[-1].id

        # The week: someone else writes 1,000 messages, one update each.
        compactions_before = _relay_metric(relay.http_url, "compactions_total")
        phone = Conversation(author="bob", role="writer")
        async with device("bob", phone, None) as rep:
            await rep.wait_until(lambda s: s.synced, timeout=30)
            for _ in range(AWAY_MESSAGES):
                phone.append("user", _text(rng))
                # One update per message reaches the relay, as when people write over a week
                # (written in one burst, the replica would merge them into a few updates).
                await rep.wait_until(lambda s: s.durable, timeout=30)
        missing = phone.all_messages()[10:]
        compactions = _relay_metric(relay.http_url, "compactions_total") - compactions_before
        assert compactions >= AWAY_MESSAGES // COMPACT_EVERY - 1

        # Meanwhile the laptop, offline (no relay where it looks), writes on its own.
        offline = Conversation(author="ann", role="writer")
        dead = Replica(
            "ws://127.0.0.1:9", ROOM, token(ROOM, "writer", "ann"), doc=offline.doc,
            store_path=laptop_file, backoff=FAST,
        )  # fmt: skip
        async with dead:
            own = [offline.append("user", f"offline {i}") for i in range(5)]
            assert dead.status.pending == 5 and not dead.status.connected
            await dead.wait_until(lambda s: s.unsaved == 0, timeout=30)
        assert own[0].parent == last_seen

        # Back online. Only the laptop is connected, so what the relay sends now is its.
        sent_before = _relay_metric(relay.http_url, "bytes_out_total")
        back = Conversation(author="ann", role="writer")
        async with device("ann", back, laptop_file) as rep:
            status = await rep.wait_until(lambda s: s.synced and s.durable, timeout=60)
            assert status.denied is None
        downloaded = _relay_metric(relay.http_url, "bytes_out_total") - sent_before

        ids = {m.id for m in back.all_messages()}
        assert {m.id for m in missing} <= ids and {m.id for m in own} <= ids
        assert len(back) == 10 + AWAY_MESSAGES + 5
        lacked = sum(
            len(json.dumps(m.model_dump(exclude_none=True), ensure_ascii=False).encode())
            for m in missing
        )
        ratio = downloaded / lacked
        print(
            f"\nweek away: downloaded {downloaded:,.0f} B for {len(missing):,} missing messages "
            f"of {lacked:,} B as JSON: {ratio:.3f}x, after {compactions:.0f} compactions"
        )
        assert ratio < 1.5, f"downloaded {ratio:.2f}x the JSON of what was missing"

        # Everyone else gets the laptop's offline edits from the relay.
        async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as observer:
            await wait_doc(observer.doc, lambda: len(observer.messages) == len(back))
            texts = set(observer.texts())
        assert {m.content for m in own} <= texts
