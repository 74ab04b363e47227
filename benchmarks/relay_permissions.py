"""Cost of the relay's per-update role check, side by side with a plain apply.

For each workload the same recorded updates are applied (a) to a pycrdt Doc with the schema's
roots and no observers, which is all a relay without permissions does, and (b) through
`crdtchat.relay.livedoc.LiveDoc.apply`, which records the changes with deep observers, checks for
pending structs and unknown roots, and judges the changes by role; before any of that it
decodes the update and checks its shape against the room's structure index (reported on its
own too). A refusal that depends on content also pays for rebuilding the document from its
last good state, which grows with the document; one that the structure index can judge (design
§7.4: a reader's write, a write into a root the role may not write) is made before applying.
The refusal table times the same recorded updates refused (role without the right) and
accepted (role with it), beside a plain apply of them. A loaded room pays once for indexing
its state (off the loop), and once, before its first write that may add a message, for
reading the ids of its messages (on the loop; design §7.2): both timed on their own, beside
loading the room's document as the anchor.

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
from crdtchat.relay.livedoc import Accepted, LiveDoc, Refused, build_structure
from crdtchat.updates import decode_update


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


def record_apart(
    base: bytes, count: int, step: Callable[[dict[str, Array | Map], int], None]
) -> list[bytes]:
    """`count` updates each made on its own replica of `base`: none builds on another, so
    each stays new to a document that refused the ones before it."""
    return [
        record(base, 1, lambda roots, _i, index=index: step(roots, index))[0]
        for index in range(count)
    ]


def plain_apply(base: bytes, updates: list[bytes]) -> float:
    doc: Doc = Doc()
    declare(doc)
    if base:
        doc.apply_update(base)
    start = time.perf_counter()
    for update in updates:
        doc.apply_update(update)
    return (time.perf_counter() - start) / len(updates)


def loaded_room(base: bytes) -> LiveDoc:
    """A room as it is once loaded and written to: not timed (timed on their own below)."""
    # The relay indexes a loaded room off the event loop before it takes writes.
    live = LiveDoc(base, structure=build_structure(base))
    # at the room's first write that may add a message
    live.ids.load(live.messages, live.shape_checked())
    return live


def checked_apply(base: bytes, updates: list[bytes], role: str, sub: str) -> float:
    live = loaded_room(base)
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


def document_load(base: bytes) -> float:
    """The anchor: loading the room's live document (the relay does it on the loop)."""
    start = time.perf_counter()
    LiveDoc(base)
    return time.perf_counter() - start


def ids_load(base: bytes) -> float:
    """As the relay reads them: the structure index (built off the loop) vouches for shape."""
    live = LiveDoc(base, structure=build_structure(base))
    start = time.perf_counter()
    live.ids.load(live.messages, live.shape_checked())
    return time.perf_counter() - start


def refused_apply(base: bytes, updates: list[bytes], role: str, sub: str) -> float:
    """Each update refused in turn (the document stays as it was, so each is new to it)."""
    live = loaded_room(base)
    start = time.perf_counter()
    for update in updates:
        outcome = live.apply(update, role, sub)
        assert isinstance(outcome, Refused), outcome
    return (time.perf_counter() - start) / len(updates)


def conversation(messages: int) -> bytes:
    doc: Doc = Doc()
    roots = declare(doc)
    array = roots[schema.MESSAGES]
    assert isinstance(array, Array)
    for index in range(100):
        roots[schema.SETTINGS][f"k{index}"] = index  # for the deletion rows
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
    refusal_rows: list[tuple[int, str, float, float, float]] = []
    build_rows: list[tuple[int, int, float, float, float]] = []
    for size in sizes:
        base = conversation(size)  # 100 settings keys, `size` messages

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

        def forged_step(roots: dict[str, Array | Map], index: int) -> None:
            roots[schema.MESSAGES].append(message(f"f{index}", "assistant", "alice", "not yours"))

        def delete_setting_step(roots: dict[str, Array | Map], index: int) -> None:
            del roots[schema.SETTINGS][f"k{index % 100}"]

        # (update, refused as, accepted as): the same bytes both ways.
        refusals = [
            ("user message, by a reader", append_step, ("reader", "r"), ("writer", "alice")),
            ("derived entry, by a writer", derived_step, ("writer", "alice"), ("worker", "w1")),
            (
                "settings key deleted, by a worker",
                delete_setting_step,
                ("worker", "w1"),
                ("writer", "alice"),
            ),
            (
                "assistant message, by a writer",
                forged_step,
                ("writer", "alice"),
                ("worker", "alice"),
            ),
        ]
        count = 20 if size >= 10_000 else 100
        for name, step, (bad_role, bad_sub), (role, sub) in refusals:
            updates = record_apart(base, count, step)
            plain = best_of(runs, lambda updates=updates, base=base: plain_apply(base, updates))
            refused = best_of(
                runs,
                lambda u=updates, r=bad_role, s=bad_sub, b=base: refused_apply(b, u, r, s),
            )
            accepted = best_of(
                runs, lambda u=updates, r=role, s=sub, b=base: checked_apply(b, u, r, s)
            )
            refusal_rows.append((size, name, plain, refused, accepted))
        build = best_of(3, lambda base=base: index_build(base))
        loading = best_of(3, lambda base=base: document_load(base))
        ids = best_of(3, lambda base=base: ids_load(base))
        build_rows.append((size, len(base), build, loading, ids))
    print()
    print(
        "| doc size (messages) | update | plain apply µs | refused µs | accepted µs "
        "| refused / accepted | refused / plain |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size, name, plain, refused, accepted in refusal_rows:
        print(
            f"| {size} | {name} | {plain * 1e6:.1f} | {refused * 1e6:.1f} | "
            f"{accepted * 1e6:.1f} | {refused / accepted:.2f} | {refused / plain:.1f}x |"
        )
    print()
    print(
        "| doc size (messages) | encoded bytes | structure index of the loaded room ms "
        "| document load ms (anchor) | message ids ms | ids / document load |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for size, nbytes, build, loading, ids in build_rows:
        ratio = f"{ids / loading:.2f}" if size else "-"
        print(
            f"| {size} | {nbytes} | {build * 1e3:.1f} | {loading * 1e3:.1f} | {ids * 1e3:.1f} "
            f"| {ratio} |"
        )


if __name__ == "__main__":
    main()
