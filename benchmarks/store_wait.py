"""The relay store's wait (append to acknowledged) while the event loop is busy.

In the relay a write is acknowledged and broadcast only after the commit that holds it, and
the store thread needs the GIL between SQLite calls while the event loop's thread judges the
next updates. This reproduces that pairing in one process: 2,000 writes per second over 200
rooms (a 200-reply stream's rate), the loop spending `--busy` µs of pure Python per write,
the interpreter's switch interval as the relay sets it. Reported: the wait's p50/p99/mean.

Compare two checkouts by alternating PYTHONPATH:

    for i in 1 2 3 4; do for t in ../old .; do PYTHONPATH=$t \\
        .venv/bin/python benchmarks/store_wait.py; done; done
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import crdtchat.relay.store
from crdtchat.relay.main import SWITCH_INTERVAL
from crdtchat.relay.store import Store
from crdtchat.updates import EMPTY_UPDATE


def spin(seconds: float) -> None:
    """Hold the GIL for `seconds`, as judging an update does."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pass


async def measure(writes: int, rate: float, busy: float, rooms: int) -> list[float]:
    waits: list[float] = []
    with tempfile.TemporaryDirectory(prefix="crdtchat-store-wait-") as directory:
        async with Store(Path(directory)) as store:
            seqs: dict[str, int] = {}
            futures = []
            start = time.perf_counter()
            for n in range(writes):
                room = f"reply-{n % rooms:04d}"
                seqs[room] = seqs.get(room, 0) + 1
                queued = time.perf_counter()
                future = store.append(room, seqs[room], EMPTY_UPDATE)
                future.add_done_callback(
                    lambda _, queued=queued: waits.append(time.perf_counter() - queued)
                )
                futures.append(future)
                spin(busy)
                await asyncio.sleep(max(0.0, start + (n + 1) / rate - time.perf_counter()))
            await asyncio.gather(*futures)
    return sorted(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=2000.0, help="writes per second")
    parser.add_argument("--busy", type=float, default=250.0, help="µs of Python per write")
    parser.add_argument("--rooms", type=int, default=200)
    args = parser.parse_args()
    sys.setswitchinterval(SWITCH_INTERVAL)
    waits = asyncio.run(measure(args.writes, args.rate, args.busy / 1e6, args.rooms))
    n = len(waits)
    print(
        f"{Path(crdtchat.relay.store.__file__).parents[2]}: {n} writes, store wait "
        f"p50 {waits[n // 2] * 1e3:.2f} ms, p99 {waits[int(n * 0.99)] * 1e3:.2f} ms, "
        f"mean {statistics.mean(waits) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
