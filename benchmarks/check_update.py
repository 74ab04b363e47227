"""`check_update` on a long conversation, against pycrdt applying the same bytes.

Every update a client applies whole (a join's sync step 2, a saved document, a stored room)
is checked first (design §7.1): a JSON value nested too deep would crash pycrdt natively.
This times that check on `long_chat(N)` (benchmarks/_support.py, 10,000 messages by default)
beside its anchor in the same process, `Doc().apply_update` of the same bytes (what a join
pays anyway), median of `--repeat` runs. The code measured is the one imported: compare two
trees with `PYTHONPATH=<worktree>`, alternating.

    .venv/bin/python benchmarks/check_update.py [--messages 10000] [--repeat 9]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

from _support import long_chat
from pycrdt import Doc

from crdtchat.updates import check_update


def median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    state = long_chat(args.messages)
    check_update(state)  # warm up
    apply = median_ms(lambda: Doc().apply_update(state), args.repeat)
    check = median_ms(lambda: check_update(state), args.repeat)
    print(
        f"{args.messages} messages, {len(state) / 1e6:.1f} MB: pycrdt apply {apply:.1f} ms, "
        f"check_update {check:.1f} ms ({check / apply:.2f}x)"
    )


if __name__ == "__main__":
    main()
