"""What checking whole documents before applying them costs (design §7.1, `check_update`).

Before and after in one run: the same 10,000-message conversation (benchmarks/document.py's
realistic chat) is opened from bytes and joined by a replica, taking turns, by the code of two
source trees: `--before` (a checkout of the commit before the check) and this one. Each
measurement runs in a child process of its tree, beside an anchor measured in that same
child (`json.loads` of the same messages), so the ratios mean something on a loaded machine.

  - open: `Conversation.from_update(state)` until the current thread is built;
  - join: a `Replica` without a local file joins a room the relay holds as a stored snapshot,
    until synced: "cold" (a room not loaded yet: the relay loads it from SQLite, which now
    checks it, then the replica checks the sync step 2) and "in memory" (the room loaded).

    git worktree add /tmp/before <commit before the check>
    .venv/bin/python benchmarks/whole_check.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def child_open(state_path: str, repeat: int) -> dict[str, float]:
    from crdtchat.document import Conversation

    state = Path(state_path).read_bytes()
    plain = Path(state_path + ".json").read_text()
    try:
        from crdtchat.updates import check_update
    except ImportError:  # the tree before the check
        check_update = None
    runs = {
        "open": lambda: Conversation.from_update(state, author="reader").current_thread(),
        "json": lambda: json.loads(plain),
    }
    if check_update is not None:
        runs["check"] = lambda: check_update(state)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat + 1):  # the first round warms up
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def child_join(url: str, secret: str, rooms: list[str], plain_path: str) -> dict[str, float]:
    import anyio

    from crdtchat.replica import Replica
    from crdtchat.tokens import mint_token

    plain = Path(plain_path).read_text()

    async def join(room: str) -> float:
        token = mint_token(secret, room, "reader", "bench", 3600)
        start = time.perf_counter()
        async with Replica(url, room, token, durable_acks=False) as replica:
            await replica.wait_until(lambda s: s.synced, timeout=120)
            elapsed = time.perf_counter() - start
        return elapsed

    def anchor() -> float:
        start = time.perf_counter()
        json.loads(plain)
        return time.perf_counter() - start

    async def main() -> dict[str, float]:
        cold = [await join(room) for room in rooms]  # each room once: loaded from SQLite
        warm = [await join(rooms[-1]) for _ in range(len(rooms))]
        return {
            "cold": statistics.median(cold),
            "warm": statistics.median(warm),
            "json": statistics.median(anchor() for _ in range(len(rooms))),
        }

    return anyio.run(main)


def run_child(tree: Path, *args: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def store_rooms(data: Path, rooms: list[str], state: bytes) -> None:
    from crdtchat.relay.store import _SCHEMA, DB_NAME

    data.mkdir()
    db = sqlite3.connect(data / DB_NAME)
    db.executescript(_SCHEMA)
    with db:
        db.executemany(
            "INSERT INTO snapshots (room, upto, data) VALUES (?, 0, ?)",
            [(room, state) for room in rooms],
        )
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="a checkout of the commit before the check")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--joins", type=int, default=3)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "open":
            result = child_open(rest[0], int(rest[1]))
        else:
            result = child_join(rest[0], rest[1], rest[2].split(","), rest[3])
        print(json.dumps(result))
        return
    if args.before is None:
        parser.error("--before is required")

    sys.path.insert(0, str(REPO))
    from benchmarks._support import SECRET, running_relay
    from benchmarks.document import build

    load_before = os.getloadavg()
    state, plain = build("chat")
    trees = {"before": args.before.resolve(), "after": REPO}
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        state_path = base / "state.bin"
        state_path.write_bytes(state)
        Path(f"{state_path}.json").write_text(json.dumps(plain))
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                rooms = [f"r{round_}-{i}" for i in range(args.joins)]
                data = base / f"{name}-{round_}"
                store_rooms(data, rooms, state)
                opened = run_child(tree, "open", str(state_path), str(args.repeat))
                with running_relay(data, src=tree) as relay:
                    joined = run_child(
                        tree, "join", relay.url, SECRET, ",".join(rooms), f"{state_path}.json"
                    )
                results[name].append({**opened, **joined})
    load_after = os.getloadavg()
    print(report(results, load_before, load_after, len(state)))


def report(
    results: dict[str, list[dict[str, Any]]],
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
    size: int,
) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    def ratio_to_anchor(name: str, key: str, anchor: str) -> float:
        return statistics.median(r[key] / r[anchor] for r in results[name])

    lines = [
        f"10,000 messages, {size / 1e6:.1f} MB; {len(results['after'])} rounds; load "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1-minute average)",
        "",
        "| | before, ms | after, ms | after / before | before / anchor | after / anchor "
        "| after / before, each to its anchor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [
        ("open from bytes (`Conversation.from_update`)", "open", "json"),
        ("replica join, cold room (loaded from SQLite)", "cold", "json"),
        ("replica join, room in memory", "warm", "json"),
    ]
    for label, key, anchor in rows:
        before = ratio_to_anchor("before", key, anchor)
        after = ratio_to_anchor("after", key, anchor)
        lines.append(
            f"| {label} | {median('before', key) * 1e3:.1f} | {median('after', key) * 1e3:.1f} "
            f"| {median('after', key) / median('before', key):.2f} "
            f"| {before:.2f} | {after:.2f} | {after / before:.2f} |"
        )
    lines.append(f"\n`check_update` alone (after): {median('after', 'check') * 1e3:.1f} ms;")
    lines.append(
        f"anchor (`json.loads` of the same messages, in each child): "
        f"{median('before', 'json') * 1e3:.1f} ms before, {median('after', 'json') * 1e3:.1f} "
        "ms after"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
