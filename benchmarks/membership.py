"""What membership (design §4) costs at the upgrade and per change, against a relay subprocess.

1. Joining: opening a connection and syncing (websocket upgrade, sync step 1 and its answer)
   with a member's identity token, where the relay reads the room's `access.members` at the
   upgrade and again once connected, against the anchor of the same join with a token for the
   room, which reads nothing. Interleaved in rounds, in one run; the room has 100 members.
2. A membership change (`POST /rooms/<room>/members`, a role flipped and written into the
   document, stored, every identity connection re-judged) with no connection in the room,
   the anchor, and with 200 identity connections open, where `Room.enforce_access` walks
   every one of them.

Run: .venv/bin/python benchmarks/membership.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crdtchat import membership
from crdtchat.stack import RelaySubprocess
from crdtchat.tokens import mint_token
from tests.support import REPO
from tests.support.relay import SECRET, raw_client, token

ROOM = "bench-members"


def identity(sub: str) -> str:
    return mint_token(SECRET, None, None, sub, 3600)


async def timed(action: Callable[[], Awaitable[None]], count: int) -> float:
    """Median milliseconds of `count` runs of `action`."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def run(quick: bool) -> None:
    rounds, per_round, peers = (3, 10, 50) if quick else (7, 30, 200)
    with tempfile.TemporaryDirectory() as tmp:
        relay = RelaySubprocess(Path(tmp) / "data", SECRET, cwd=REPO).start()
        try:
            base = relay.ws_base
            owner = identity("owner")
            async with raw_client(f"{base}/{ROOM}?token={owner}"):
                pass  # the owner creates the room
            for k in range(100):
                await anyio.to_thread.run_sync(
                    membership.share, base, ROOM, owner, f"member-{k}", "writer"
                )
            capability = token(ROOM, "writer", "app")
            member = identity("member-7")

            async def join(tok: str) -> None:
                async with raw_client(f"{base}/{ROOM}?token={tok}"):
                    pass

            anchor, measured = [], []
            for _ in range(rounds):
                anchor.append(await timed(lambda: join(capability), per_round))
                measured.append(await timed(lambda: join(member), per_round))
            a, m = statistics.median(anchor), statistics.median(measured)
            print("join (upgrade + sync), median of rounds:")
            print(f"  token for the room (anchor)   {a:8.2f} ms  1.00")
            print(f"  member's identity token       {m:8.2f} ms  {m / a:.2f}")

            flip = iter(("reader", "writer") * 10_000)

            async def change() -> None:
                await anyio.to_thread.run_sync(
                    membership.share, base, ROOM, owner, "member-99", next(flip)
                )

            alone = await timed(change, per_round * rounds)
            async with AsyncExitStack() as stack:
                for k in range(peers):
                    tok = identity(f"member-{k % 100}")
                    await stack.enter_async_context(raw_client(f"{base}/{ROOM}?token={tok}"))
                crowded = await timed(change, per_round * rounds)
            print("membership change (POST /rooms/<room>/members), median:")
            print(f"  no connection in the room (anchor)  {alone:8.2f} ms  1.00")
            print(
                f"  {peers} identity connections open    {crowded:8.2f} ms  {crowded / alone:.2f}"
            )
        finally:
            relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, to check it runs")
    args = parser.parse_args()
    anyio.run(run, args.quick)


if __name__ == "__main__":
    main()
