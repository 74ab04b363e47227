"""Cost of the relay's per-update role check, side by side with a plain apply.

For each workload the same recorded updates are applied (a) to a pycrdt Doc with the schema's
roots and no observers, which is all a relay without permissions does, and (b) through
`server.livedoc.LiveDoc.apply`, which records the changes with deep observers, checks for
pending structs and unknown roots, and judges the changes by role; before any of that it
decodes the update and checks its shape against the room's structure index (reported on its
own too). A refused update also pays for rebuilding the document from its last good state,
which grows with the document; a loaded room pays once for indexing its state (off the loop).

Run: .venv/bin/python benchmarks/relay_permissions.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pycrdt import Array, Doc, Map, Text

from crdtchat import schema
from crdtchat.updates import decode_update
from server.livedoc import Accepted, LiveDoc, Refused, build_structure


def declare(doc: Doc) -> dict[str, Array | Map]:
    return {
        name: doc.get(name, type=Array if name == schema.MESSAGES else Map)
        for name in schema.ALL_ROOTS
    }


def message(msg_id: str, role: str, author: str, text: str) -> Map:
    return Map(
        {
            "id": msg_id,
            "role": role,
            "author": author,
            "parent": None,
            "created_at": 1.0,
            "content": Text(text),
        }
    )


def record(
    base: bytes, steps: int, step: Callable[[dict[str, Array | Map], int], None]
) -> list[bytes]:
    """Updates of `steps` transactions made on a replica of `base`."""
    doc: Doc = Doc()
    roots = declare(doc)
    if base:
        doc.apply_update(base)
    updates = []
    for index in range(steps):
        before = doc.get_state()
        with doc.transaction():
            step(roots, index)
        updates.append(doc.get_update(before))
    return updates


def plain_apply(base: bytes, updates: list[bytes]) -> float:
    doc: Doc = Doc()
    declare(doc)
    if base:
        doc.apply_update(base)
    start = time.perf_counter()
    for update in updates:
        doc.apply_update(update)
    return (time.perf_counter() - start) / len(updates)


def checked_apply(base: bytes, updates: list[bytes], role: str, sub: str) -> float:
    # The relay indexes a loaded room off the event loop before it takes writes: not timed.
    live = LiveDoc(base, structure=build_structure(base))
    start = time.perf_counter()
    for update in updates:
        outcome = live.apply(update, role, sub)
        assert isinstance(outcome, Accepted), outcome
    return (time.perf_counter() - start) / len(updates)


def structure_check(base: bytes, updates: list[bytes]) -> float:
    """The structure check alone (decode, resolve parents, judge, record): part of `checked`."""
    index = build_structure(base)
    start = time.perf_counter()
    for update in updates:
        index.commit(index.check(decode_update(update)))
    return (time.perf_counter() - start) / len(updates)


def index_build(base: bytes) -> float:
    start = time.perf_counter()
    build_structure(base)
    return time.perf_counter() - start


def refused_apply(base: bytes, update: bytes, role: str, sub: str, repeat: int) -> float:
    live = LiveDoc(base, structure=build_structure(base))
    start = time.perf_counter()
    for _ in range(repeat):
        assert isinstance(live.apply(update, role, sub), Refused)
    return (time.perf_counter() - start) / repeat


def conversation(messages: int) -> bytes:
    doc: Doc = Doc()
    roots = declare(doc)
    array = roots[schema.MESSAGES]
    assert isinstance(array, Array)
    for index in range(messages):
        role = "user" if index % 2 == 0 else "assistant"
        author = "alice" if role == "user" else "w1"
        array.append(message(f"m{index}", role, author, "lorem ipsum dolor sit amet " * 8))
    return doc.get_update()


def best_of(runs: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    steps = 300 if args.quick else 2000
    sizes = (0, 1000) if args.quick else (0, 1000, 10_000)
    runs = 3 if args.quick else 5

    print(f"python {sys.version.split()[0]}, {steps} updates per workload, best of {runs}")
    print()
    print(
        "| doc size (messages) | workload | plain apply µs/update | checked µs/update | overhead "
        "| of which structure check µs |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    refusal_rows = []
    for size in sizes:
        base = conversation(size) if size else b""

        def stream_step(roots: dict[str, Array | Map], index: int) -> None:
            streams = roots[schema.STREAMS]
            if index == 0:
                streams["t1"] = Map({"parent": "m0", "holder": "w1", "text": Text("")})
            else:
                text = streams["t1"]["text"]
                text += " token"

        def append_step(roots: dict[str, Array | Map], index: int) -> None:
            roots[schema.MESSAGES].append(message(f"new{index}", "user", "alice", "hello there"))

        def derived_step(roots: dict[str, Array | Map], index: int) -> None:
            roots[schema.DERIVED][f"e{index}"] = {
                "kind": "usage",
                "message_id": "m0",
                "prefix_hash": "0" * 64,
                "provider": "local",
                "api": "local",
                "model": "m",
                "data": {"input_tokens": index},
            }

        workloads = [
            ("worker streams a token", stream_step, "worker", "w1"),
            ("writer appends a user message", append_step, "writer", "alice"),
            ("worker writes a derived entry", derived_step, "worker", "w1"),
        ]
        for name, step, role, sub in workloads:
            updates = record(base, steps, step)
            plain = best_of(runs, lambda updates=updates, base=base: plain_apply(base, updates))
            checked = best_of(
                runs,
                lambda updates=updates, role=role, sub=sub, base=base: checked_apply(
                    base, updates, role, sub
                ),
            )
            structure = best_of(
                runs, lambda updates=updates, base=base: structure_check(base, updates)
            )
            print(
                f"| {size} | {name} | {plain * 1e6:.1f} | {checked * 1e6:.1f} | "
                f"{checked / plain:.1f}x (+{(checked - plain) * 1e6:.1f} µs) "
                f"| {structure * 1e6:.1f} |"
            )
        forged = record(
            base,
            1,
            lambda roots, i: roots[schema.MESSAGES].append(
                message("forged", "assistant", "alice", "not yours")
            ),
        )[0]
        repeat = 20 if size >= 10_000 else 200
        refused = refused_apply(base, forged, "writer", "alice", repeat)
        build = best_of(3, lambda base=base: index_build(base))
        refusal_rows.append((size, len(base), refused, build))
    print()
    print(
        "| doc size (messages) | encoded bytes | refused update (apply + rebuild) ms "
        "| structure index of the loaded room ms |"
    )
    print("|---:|---:|---:|---:|")
    for size, nbytes, refused, build in refusal_rows:
        print(f"| {size} | {nbytes} | {refused * 1e3:.2f} | {build * 1e3:.1f} |")


if __name__ == "__main__":
    main()
