"""Reading values that may be nested too deeply to read natively (design §7.1).

yrs renders a shared type as JSON (`str(map)`) by native recursion, one stack frame per level
of shared types inside shared types: a Map nested ~20,000 deep overflows the stack and the
process dies with SIGSEGV, which no `except` can catch. Our relay refuses such values, but a
document may hold one anyway (written before the limit, or synced through another relay). So a
reader walks the shared types of a value iteratively, with a bound, before it asks yrs for the
JSON: past `MAX_READ_DEPTH` the value is reported as a problem and skipped. Plain (`Any`)
values are bounded where updates are decoded (`crdtchat.updates.MAX_ANY_DEPTH`).
"""

from __future__ import annotations

import json
from typing import Any

from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment

from crdtchat.errors import RemoteProtocolError
from crdtchat.pycrdt_internals import RAW_CONTAINERS, BaseType, RawMap, raw_transaction, wrap

# Deeper than any value our relay accepts (its default limit is 32) and far below the depth at
# which native recursion overflows the stack (~10,000 levels on an 8 MiB stack).
MAX_READ_DEPTH = 64
# The walk's other bound: no message holds thousands of shared types, and pycrdt reads the
# items of an Array one by one, each in O(n), so a huge nested Array would cost O(n²) to walk.
MAX_READ_ENTRIES = 10_000


class TooDeep(RemoteProtocolError, ValueError):
    """A value whose shared types nest deeper than a reader is willing to read (a peer wrote
    what our relay refuses, design §7.1)."""


def _children(value: BaseType) -> list[Any]:
    if isinstance(value, Map):
        return [value[key] for key in value]
    if isinstance(value, Array):
        if len(value) > MAX_READ_ENTRIES:  # pycrdt reads an item by index in O(n)
            raise TooDeep(f"value with more than {MAX_READ_ENTRIES} entries in one Array")
        return list(value)
    if isinstance(value, XmlFragment | XmlElement):
        return list(value.children)
    return []  # Text (its string holds no types), XmlText, subdocuments


def check_depth(value: Any, max_depth: int = MAX_READ_DEPTH) -> None:
    """Raise TooDeep if shared types nest more than `max_depth` levels inside `value`.

    Iterative, and it stops at the first level past the bound, or past `MAX_READ_ENTRIES`
    shared types or entries of one Array, so its cost is bounded whatever the value holds.
    """
    if not isinstance(value, BaseType) or isinstance(value, Text):
        return
    with value.doc.transaction():
        stack: list[tuple[BaseType, int]] = [(value, 1)]
        seen = 0
        while stack:
            current, depth = stack.pop()
            for child in _children(current):
                if isinstance(child, BaseType) and not isinstance(child, Text):
                    if depth + 1 > max_depth:
                        raise TooDeep(f"value nested deeper than {max_depth} shared types")
                    seen += 1
                    if seen > MAX_READ_ENTRIES:
                        raise TooDeep(f"value holding more than {MAX_READ_ENTRIES} shared types")
                    stack.append((child, depth + 1))


def holds_types(value: Map, handle: Any = None) -> bool:
    """Whether any value of `value` is a shared type other than a Text (what a message Map
    holds): the cheap test before `check_depth`, with pycrdt's raw reads (no wrapping).
    `handle`: the raw transaction to read in, when the caller holds one (`raw_transaction`)."""
    raw = value.integrated
    if handle is None:
        with value.doc.transaction() as txn:
            return holds_types(value, raw_transaction(txn))
    return any(isinstance(raw.get(handle, key), RAW_CONTAINERS) for key in raw.keys(handle))


def read_json(value: Any, max_depth: int = MAX_READ_DEPTH) -> Any:
    """The JSON value of `value` as `str()` renders it, after `check_depth`."""
    if isinstance(value, Text):
        return str(value)
    if isinstance(value, BaseType):
        if not isinstance(value, Map) or holds_types(value):
            check_depth(value, max_depth)
        return json.loads(str(value))
    return value


def read_map(root: Map, max_depth: int = MAX_READ_DEPTH) -> tuple[dict[str, Any], dict[str, str]]:
    """Every entry of `root` as JSON, and the entries too deep to read (key -> why).

    The common case, a map with no nested shared types, costs one `str()` as before: values
    are fetched once to look at their types, and only nested types are walked.
    """
    with root.doc.transaction():
        nested: list[str] = []
        for key in root:
            value = root[key]
            if isinstance(value, BaseType) and not isinstance(value, Text):
                nested.append(key)
        if not nested:
            return json.loads(str(root)), {}
        good: dict[str, Any] = {}
        bad: dict[str, str] = {}
        for key in root:
            try:
                good[key] = read_json(root[key], max_depth)
            except TooDeep as error:
                bad[key] = str(error)
    # Rendered by yrs, as `str(root)` would have: pycrdt returns numbers as floats (3.0) where
    # yrs's JSON writes integral ones as integers (3), and readers must agree on every path.
    scratch = Doc()
    copy = scratch.get("copy", type=Map)
    try:
        with scratch.transaction():
            for key, value in good.items():
                copy[key] = _insertable(value)
    except TypeError:  # a value pycrdt cannot write back: as pycrdt returned it
        return good, bad
    return json.loads(str(copy)), bad


def _insertable(value: Any) -> Any:
    """`value` with its binaries as the lists of byte values yrs renders them as (pycrdt cannot
    insert bytes into a Map); plain values are bounded in depth where updates are decoded."""
    if isinstance(value, bytes | bytearray):
        return list(value)
    if isinstance(value, dict):
        return {key: _insertable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_insertable(item) for item in value]
    return value


def items_of(array: Array, name: str) -> tuple[list[Any], Doc]:
    """Every item of the root array `name`, in O(n): pycrdt reads an item by index by walking the
    array from its start, so the items are taken from the event of applying the whole
    document to a scratch copy (returned too: the items live as long as it does)."""
    scratch = Doc()
    target = scratch.get(name, type=Array)
    items: list[Any] = []

    def collect(event: Any) -> None:
        for op in event.delta:  # raw values: see `check_items`
            items.extend(op.get("insert", ()))

    subscription = target.integrated.observe(collect)
    scratch.apply_update(array.doc.get_update())
    subscription.drop()
    return items, scratch


def check_items(items: list[Any], doc: Doc, max_depth: int = MAX_READ_DEPTH) -> None:
    """`check_depth` of every item of an array of `doc`, given raw (as an event's delta lists
    them, unwrapped: wrapping 10,000 Maps costs more than checking them), in one transaction.
    A message Map holding nothing but plain values and Texts is recognised by its raw reads."""
    with doc.transaction() as txn:
        handle = raw_transaction(txn)
        for raw in items:
            if type(raw) is RawMap:
                if any(isinstance(raw.get(handle, k), RAW_CONTAINERS) for k in raw.keys(handle)):
                    check_depth(wrap(raw, doc), max_depth)
            elif isinstance(raw, RAW_CONTAINERS):
                check_depth(wrap(raw, doc), max_depth)


def array_json(array: Array, name: str, *, shape_checked: bool = False) -> list[Any]:
    """The JSON of every item of the root array `name`, as `json.loads(str(array))` gives it, with
    None for an item nested too deeply to read. `shape_checked`: the caller knows none is
    (the relay's structure index says so), so it is one `str()`."""
    if shape_checked or len(array) == 0:
        return json.loads(str(array))
    items, scratch = items_of(array, name)
    try:
        check_items(items, scratch)
    except TooDeep:
        result = []
        for item in items:
            try:
                result.append(read_json(wrap(item, scratch)))
            except TooDeep:
                result.append(None)
        del scratch
        return result
    return json.loads(str(array))
