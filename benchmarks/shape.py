"""What bounding the shape of values costs (design §7.1), side by side in one process.

Readers: opening 10,000 messages with the shape check (`Conversation.from_update`, which takes
the messages from the array event and checks them with raw reads) against the same open
without it (`shape_checked=True`, one `str()` as before), and against `json.loads` of the same
messages as the anchor; and the check alone on a view's first content (`open_entries` against
`parse_all(str(array))`).

Relay: the structure check of recorded updates and the index of a loaded 10,000-message room,
with this commit's `crdtchat.structure` (which also records depth, root and entries per type
and judges the limits) against a baseline `structure.py` from another commit, loaded from a
file, so both run on the same updates in the same process.

Run: .venv/bin/python benchmarks/shape.py --baseline-structure <(git show REV:crdtchat/structure.py)
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from document import build  # the same 10,000-message documents as benchmarks/document.py
from pycrdt import Array, Doc, Map, Text

from crdtchat import schema
from crdtchat.document import Conversation
from crdtchat.relay.livedoc import ROOT_TYPES
from crdtchat.structure import ShapeLimits, StructureIndex
from crdtchat.updates import decode_update
from crdtchat.view import open_entries, parse_all


def interleaved(runs: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds of each run, taking turns after a warm-up (load bursts hit all alike)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def reader_rows(repeat: int) -> list[str]:
    rows = []
    for mix, label in (("chat", "realistic chat"), ("short", "all 60-char lines")):
        rows.extend(reader_rows_of(mix, label, repeat))
    return rows


def reader_rows_of(mix: str, label: str, repeat: int) -> list[str]:
    rows = []
    if True:
        state, plain = build(mix)
        plain_json = json.dumps(plain)

        def checked() -> None:
            conversation = Conversation.from_update(state, author="r")
            assert len(conversation.current_thread()) == len(plain)
            conversation.close()

        def unchecked() -> None:
            doc = Doc()
            doc.apply_update(state)
            conversation = Conversation(doc, author="r", shape_checked=True)
            assert len(conversation.current_thread()) == len(plain)
            conversation.close()

        doc = Doc()
        doc.apply_update(state)
        array = doc.get(schema.MESSAGES, type=Array)
        items: list[Any] = []
        # the items as the view's first-content event lists them
        scratch = Doc()
        target = scratch.get(schema.MESSAGES, type=Array)

        def collect(event: Any) -> None:
            for op in event.delta:  # raw, as the view takes them
                items.extend(op.get("insert", ()))

        subscription = target.integrated.observe(collect)
        scratch.apply_update(state)
        subscription.drop()
        scratch_array = scratch.get(schema.MESSAGES, type=Array)

        times = interleaved(
            {
                "checked": checked,
                "unchecked": unchecked,
                "json": lambda: json.loads(plain_json),
                "view checked": lambda: open_entries(scratch_array, items),
                "view unchecked": lambda: parse_all(str(array)),
            },
            repeat,
        )
        anchor = times["json"]
        rows.append(
            f"| ({label}) open 10,000 messages + current thread | "
            f"{times['checked'] * 1e3:.0f} ms ({times['checked'] / anchor:.1f}x) | "
            f"{times['unchecked'] * 1e3:.0f} ms ({times['unchecked'] / anchor:.1f}x) | "
            f"{anchor * 1e3:.1f} ms | {times['checked'] / times['unchecked']:.2f} |"
        )
        rows.append(
            f"| ({label}) read the view's first content (10,000 items) | "
            f"{times['view checked'] * 1e3:.0f} ms ({times['view checked'] / anchor:.1f}x) | "
            f"{times['view unchecked'] * 1e3:.0f} ms ({times['view unchecked'] / anchor:.1f}x) | "
            f"{anchor * 1e3:.1f} ms | {times['view checked'] / times['view unchecked']:.2f} |"
        )
    return rows


def recorded_updates(count: int) -> tuple[bytes, list[bytes]]:
    """A 1,000-message room and `count` updates of the frequent kinds after it: a streamed
    token, a user message, a derived entry, in turn."""
    doc = Doc()
    roots = {
        name: doc.get(name, type=Array if name == schema.MESSAGES else Map)
        for name in schema.ALL_ROOTS
    }
    messages = roots[schema.MESSAGES]
    with doc.transaction():
        for n in range(1000):
            messages.append(
                Map({"id": f"m{n}", "role": "user", "author": "a", "content": Text("x" * 40)})
            )
        roots[schema.STREAMS]["t"] = stream = Map({"text": Text("")})
    base = doc.get_update()
    text = stream["text"]
    updates = []
    for n in range(count):
        before = doc.get_state()
        kind = n % 3
        if kind == 0:
            text += "token "
        elif kind == 1:
            messages.append(
                Map({"id": f"u{n}", "role": "user", "author": "a", "content": Text("hello")})
            )
        else:
            roots[schema.DERIVED][f"d{n}"] = {"kind": "usage", "message_id": "m1", "n": n}
        updates.append(doc.get_update(before))
    return base, updates


def relay_rows(baseline: Any, repeat: int) -> list[str]:
    base, updates = recorded_updates(3000)
    decoded = [decode_update(update) for update in updates]
    big_state, _ = build("chat")
    big = decode_update(big_state)

    def feed(make: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            index = make()
            index.add(decode_update(base), judge=False)
            for update in decoded:
                index.commit(index.check(update))

        return run

    def load(make: Callable[[], Any]) -> Callable[[], None]:
        return lambda: make().add(big, judge=False)

    new = lambda: StructureIndex(ROOT_TYPES, ShapeLimits())  # noqa: E731
    old = lambda: baseline.StructureIndex(ROOT_TYPES)  # noqa: E731
    times = interleaved(
        {
            "new check": feed(new),
            "old check": feed(old),
            "new load": load(new),
            "old load": load(old),
        },
        repeat,
    )
    per = len(decoded)
    return [
        "| structure check per update (stream token, user message, derived entry in turn) | "
        f"{(times['new check']) / per * 1e6:.1f} µs | {(times['old check']) / per * 1e6:.1f} µs | "
        f"{times['new check'] / times['old check']:.2f} |",
        "| index of a loaded 10,000-message room (realistic chat) | "
        f"{times['new load'] * 1e3:.0f} ms | {times['old load'] * 1e3:.0f} ms | "
        f"{times['new load'] / times['old load']:.2f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--baseline-structure", type=Path, help="crdtchat/structure.py of the commit to compare"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    print("| readers | with the shape check | without | json.loads (anchor) | with / without |")
    print("|---|---:|---:|---:|---:|")
    for row in reader_rows(args.repeat):
        print(row)
    if args.baseline_structure is not None:
        loader = importlib.machinery.SourceFileLoader(
            "baseline_structure", str(args.baseline_structure)
        )
        spec = importlib.util.spec_from_loader("baseline_structure", loader)
        assert spec is not None and spec.loader is not None
        baseline = importlib.util.module_from_spec(spec)
        sys.modules["baseline_structure"] = baseline  # dataclasses look their module up
        spec.loader.exec_module(baseline)
        print()
        print("| relay | this commit | baseline | this / baseline |")
        print("|---|---:|---:|---:|")
        for row in relay_rows(baseline, args.repeat):
            print(row)
    print(
        f"\nload average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"2 cores; Python {sys.version.split()[0]}"
    )


if __name__ == "__main__":
    main()
