"""Which shared type every item lives in, so that an update can be judged before it is applied.

pycrdt 0.14 (yrs) trusts an update's shape: an item whose content kind its parent type cannot
hold, such as a string inside an Array, is integrated, and reading that Array afterwards loops
forever. One peer could freeze the relay and every Python replica that way. Yjs's own types
never write such items, so they are refused before `apply_update`, which needs to know each
new item's parent: written in the item, or (usually) inherited from the item its origin points
at, which may be anywhere in the document. `StructureIndex` keeps, per client, the clock ranges
of the document with the parent of each, compactly (a run of items in one parent is one
range), and judges an update against it: `check` resolves every new item's parent the way yrs
does and returns a `Plan`; `commit` records the plan once the update has been applied.

What each parent may hold (sequence items / items under a key):
Text, XmlText: string, embed, format, type / Array, XmlFragment, XmlElement: any, binary, type,
subdocument / Map, XmlHook: nothing in sequence. Under a key (Map, XmlElement, XmlText,
XmlHook): any, binary, type, subdocument. Deleted items fit anywhere. The deprecated JSON
content is refused (yrs and Yjs decode it differently), as are yrs-only weak links.

The index also bounds the shape of what is stored (design §7.1, `ShapeLimits`): how deeply
shared types nest (yrs renders a value as JSON, and pycrdt converts it, by native recursion: a
Map nested 20,000 deep overflows the stack and kills the process), how many entries one nested
Map or Array receives, and how large one item's content is. It records, per shared type, its
depth and the root it lives under, so that a write can be judged by its root before it is
applied, even when its parent type has been deleted (`Plan.roots`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from crdtchat.errors import RemoteProtocolError
from crdtchat.updates import (
    ANY,
    ARRAY,
    BINARY,
    CONTENT_NAMES,
    DELETED,
    DOC,
    EMBED,
    FORMAT,
    GC,
    JSON,
    MAP,
    SKIP,
    STRING,
    TEXT,
    TYPE,
    TYPE_NAMES,
    XML_ELEMENT,
    XML_FRAGMENT,
    XML_HOOK,
    XML_TEXT,
    DecodedUpdate,
    Id,
    Struct,
)

Parent = str | Id  # a root name, or the id of the item holding the parent type

_SEQUENCE_KINDS: dict[int, frozenset[int]] = {
    TEXT: frozenset({STRING, EMBED, FORMAT, TYPE, DELETED}),
    XML_TEXT: frozenset({STRING, EMBED, FORMAT, TYPE, DELETED}),
    ARRAY: frozenset({ANY, BINARY, TYPE, DOC, DELETED}),
    XML_FRAGMENT: frozenset({ANY, BINARY, TYPE, DOC, DELETED}),
    XML_ELEMENT: frozenset({ANY, BINARY, TYPE, DOC, DELETED}),
    MAP: frozenset({DELETED}),
    XML_HOOK: frozenset({DELETED}),
}
_KEYED_KINDS = frozenset({ANY, BINARY, TYPE, DOC, DELETED})
_KEYED_PARENTS = frozenset({MAP, XML_ELEMENT, XML_TEXT, XML_HOOK})
_ALLOWED: dict[tuple[int, bool], frozenset[int]] = {
    **{(parent, False): kinds for parent, kinds in _SEQUENCE_KINDS.items()},
    **{(parent, True): _KEYED_KINDS for parent in _KEYED_PARENTS},
}
_EVERYTHING = frozenset(CONTENT_NAMES) - {JSON}


class StructureError(RemoteProtocolError, ValueError):
    """An update with an item its parent cannot hold: a protocol violation."""


class MissingDependency(RemoteProtocolError, ValueError):
    """An update that builds on changes the document does not have yet."""


class ShapeError(StructureError):
    """An update whose values exceed the shape limits (design §7.1): nesting, entries, size."""


@dataclass(frozen=True, slots=True)
class ShapeLimits:
    """Bounds on what one document may hold (design §7.1); None: not bounded.

    `depth`: shared types inside shared types below a root (a message Map in the messages
    array is 1, its content Text 2; a stream Map and its Text likewise). `entries`: entries
    ever written into one nested Map or Array (a key overwritten counts again; roots are not
    bounded here: they grow with the conversation). `value_bytes`: the encoded size of one
    item's content (a run of text, a JSON value, a binary).
    """

    depth: int | None = 32
    entries: int | None = 10_000
    value_bytes: int | None = 1024 * 1024


NO_LIMITS = ShapeLimits(None, None, None)


class _Class(Enum):
    ITEM = "item"
    DELETED = "deleted"
    GC = "gc"


class _Where(NamedTuple):
    parent: Parent | None  # None: the item is garbage-collected on arrival (no live parent)
    keyed: bool
    cls: _Class
    root: str | None = None  # the root it lives under, also when its parent type is gone


_GONE = _Where(None, False, _Class.GC)
_UNSET: str = "\x00unset"  # a root name no document can have (a sentinel for a cache)


@dataclass(slots=True)
class Plan:
    """What a checked update adds: per client, new (start clock, where) runs; new types."""

    runs: dict[int, list[tuple[int, int, _Where]]] = field(default_factory=dict)
    types: dict[Id, int] = field(default_factory=dict)
    shapes: dict[Id, tuple[int, str | None]] = field(default_factory=dict)  # depth, root
    entries: dict[Id, int] = field(default_factory=dict)  # new entries per nested Map/Array
    roots: set[str] = field(default_factory=set)  # roots that new items land in


_CLASS_OF = {kind: _Class.ITEM for kind in CONTENT_NAMES} | {
    GC: _Class.GC,
    SKIP: _Class.GC,
    DELETED: _Class.DELETED,
}


def _class_of(struct: Struct) -> _Class:
    return _CLASS_OF.get(struct.kind, _Class.ITEM)


class StructureIndex:
    """The parent of every item of one document, by id; fed every update it accepts."""

    def __init__(self, root_types: Mapping[str, int], limits: ShapeLimits = NO_LIMITS) -> None:
        self.root_types = dict(root_types)  # roots not listed are not judged here
        self.limits = limits
        self._starts: dict[int, list[int]] = {}
        self._where: dict[int, list[_Where]] = {}
        self._ends: dict[int, int] = {}
        self._types: dict[Id, int] = {}
        self._shapes: dict[Id, tuple[int, str | None]] = {}
        self._entries: dict[Id, int] = {}
        self.deepest = 0  # the deepest shared type recorded, judged or not

    def too_deep(self) -> bool:
        """Whether the document holds a shared type deeper than the limit (one recorded
        without judging: a stored state from before the limit, for instance)."""
        depth = self.limits.depth
        return depth is not None and self.deepest > depth

    @property
    def ranges(self) -> int:
        """How many ranges the index holds (its size)."""
        return sum(len(starts) for starts in self._starts.values())

    def state_vector(self) -> dict[int, int]:
        """Per client, the clocks the index covers: the document's state vector."""
        return {client: end for client, end in self._ends.items() if end}

    def _known(self, item: Id) -> _Where | None:
        client, clock = item
        if clock >= self._ends.get(client, 0):
            return None
        starts = self._starts[client]
        return self._where[client][bisect_right(starts, clock) - 1]

    def check(self, update: DecodedUpdate, *, judge: bool = True) -> Plan:
        """Resolve the parent of every new item of `update` and judge its content.

        Raises StructureError for an item its parent cannot hold, MissingDependency when the
        update builds on what the index has not seen. Nothing is recorded until `commit`.
        `judge=False` only records (for a state that was judged when it came in).
        """
        return _Checker(self, update, judge).run()

    def commit(self, plan: Plan) -> None:
        for client, runs in plan.runs.items():
            starts = self._starts.setdefault(client, [])
            wheres = self._where.setdefault(client, [])
            for start, end, where in runs:
                extends_last = wheres and wheres[-1] == where and self._ends.get(client) == start
                if not extends_last:
                    starts.append(start)
                    wheres.append(where)
                self._ends[client] = end
        self._types.update(plan.types)
        self._shapes.update(plan.shapes)
        entries = self._entries
        for parent, count in plan.entries.items():
            entries[parent] = entries.get(parent, 0) + count
        for depth, _ in plan.shapes.values():
            if depth > self.deepest:
                self.deepest = depth

    def text_continued(self, client: int, clock: int) -> tuple[_Where, str] | None:
        """Where a string item at `client:clock`, whose origin is `client:clock - 1` and
        that names no parent, lands, with its root, when that is a Text the index knows:
        the clock continues the client's last known run, an item in a Text. None otherwise.

        What `check` would find for the same item (its fast path for a struct continuing
        its client's last item): a string in a Text is allowed, adds no type and no entry of
        a Map or Array, so only the value's size is left to judge (the caller's).
        """
        if self._ends.get(client) != clock:
            return None
        last = self._where[client][-1]
        parent = last.parent
        if type(parent) is not tuple or last.keyed or self._types.get(parent) != TEXT:
            return None
        shape = self._shapes.get(parent)
        if shape is None or shape[1] is None:
            return None
        return _Where(parent, False, _Class.ITEM), shape[1]

    def extend(self, client: int, end: int, where: _Where) -> None:
        """Record an item that `text_continued` placed, up to clock `end` (what `commit`
        does with its plan)."""
        wheres = self._where[client]
        if wheres[-1] != where:
            self._starts[client].append(self._ends[client])
            wheres.append(where)
        self._ends[client] = end

    def add(self, update: DecodedUpdate, *, judge: bool = True) -> None:
        """Check and record `update` in one step (e.g. a stored state, when loading)."""
        self.commit(self.check(update, judge=judge))


class _Checker:
    """One `StructureIndex.check`: the update's new structs, resolved one by one."""

    def __init__(self, index: StructureIndex, update: DecodedUpdate, judge: bool) -> None:
        self.index = index
        self.judge = judge
        self.new: dict[int, list[Struct]] = {}
        self.new_starts: dict[int, list[int]] = {}
        self.resolved: dict[Id, _Where] = {}
        self.plan = Plan()
        for client, runs in update.structs.items():
            cursor = index._ends.get(client, 0)
            fresh: list[Struct] = []
            for struct in runs:
                if struct.end <= cursor:
                    continue  # already known
                if struct.clock > cursor or struct.kind == SKIP:
                    raise MissingDependency(
                        f"update skips clocks {cursor}..{struct.clock} of client {client}"
                    )
                fresh.append(struct)
                cursor = struct.end
            if fresh:
                self.new[client] = fresh
                self.new_starts[client] = [struct.clock for struct in fresh]

    def run(self) -> Plan:
        plan = self.plan = Plan()
        known_end = self.index._ends
        resolved = self.resolved
        judge = self.judge
        new_types = plan.types
        known_types = self.index._types
        limits = self.index.limits
        max_bytes = limits.value_bytes if judge else None
        max_depth = limits.depth if judge else None
        max_entries = limits.entries if judge else None
        known_entries = self.index._entries
        entries = plan.entries
        roots = plan.roots
        root_at: dict[Parent, str | None] = {}
        type_at: dict[Parent, int | None] = {}
        shapes = plan.shapes
        known_shapes = self.index._shapes
        allowed_at: dict[tuple[Parent, bool], frozenset[int]] = {}
        for client, fresh in self.new.items():
            runs = plan.runs.setdefault(client, [])
            known = known_end.get(client, 0)
            last: _Where | None = None
            last_end = -1
            if known:
                # A struct continuing the client's last known item (the next flush of a
                # stream, the next keystroke) takes that item's parent, as `_try` would find
                # through its origin: the fast path below, across updates.
                last, last_end = self.index._where[client][-1], known
            for struct in fresh:
                kind, clock, parent = struct.kind, struct.clock, struct.parent
                # Fast paths for the common shapes: an entry of a root or of a known type, and an
                # item whose origin is the end of the struct before it (typing, streaming).
                if type(parent) is str or parent in new_types or parent in known_types:
                    where = _Where(parent, struct.parent_sub is not None, _CLASS_OF[kind])
                elif (
                    parent is None
                    and last is not None
                    and last.parent is not None
                    and last_end == clock
                    and struct.origin == (client, clock - 1)
                ):
                    where = _Where(last.parent, last.keyed, _CLASS_OF[kind])
                else:
                    where = self._resolve(struct)
                resolved[(client, clock)] = where
                end = clock + struct.length
                start = clock if clock >= known else known
                if start > clock:  # overlaps what is known: yrs keeps the known part
                    before = self.index._known((client, start - 1))
                    if before is not None and before.parent != where.parent:
                        raise StructureError(
                            f"item {client}:{clock} puts known clocks in another parent"
                        )
                at = where.parent
                if judge:  # the roots written to, judged by role (a loaded state is not)
                    if at is None:
                        root = where.root
                    else:
                        root = root_at.get(at, _UNSET)
                        if root is _UNSET:
                            root = root_at[at] = at if type(at) is str else self._shape_of(at)[1]
                    if root is not None and where.cls is not _Class.GC:
                        roots.add(root)
                if judge and at is not None:
                    allowed = allowed_at.get(where[:2])
                    if allowed is None:
                        allowed = allowed_at[where[:2]] = self._allowed(where)
                    if kind not in allowed:
                        self._refuse(struct, where)
                if max_bytes is not None and struct.span[1] - struct.span[0] > max_bytes:
                    size = struct.span[1] - struct.span[0]
                    raise ShapeError(f"a value of {size} bytes (limit {max_bytes})")
                if type(at) is tuple and where.cls is _Class.ITEM:
                    parent_type = type_at.get(at, -1)
                    if parent_type == -1:
                        parent_type = type_at[at] = self._type_of(at)
                    if parent_type in (MAP, ARRAY):
                        count = entries.get(at, 0) + (1 if where.keyed else struct.length)
                        entries[at] = count
                        if max_entries is not None and count > max_entries - known_entries.get(
                            at, 0
                        ):
                            raise ShapeError(
                                f"over {max_entries} entries in one nested Map or Array"
                            )
                runs.append((start, end, where))
                if kind == TYPE:
                    if judge and struct.type_ref not in _SEQUENCE_KINDS:
                        self._refuse(struct, where)
                    plan.types[(client, clock)] = struct.type_ref  # type: ignore[assignment]
                    # the common cases inline: a type in a root, or in a type already placed
                    if type(at) is str:
                        shape = shapes[(client, clock)] = (1, at)
                    else:
                        above = shapes.get(at) or known_shapes.get(at) if at is not None else None
                        if above is not None:
                            shape = shapes[(client, clock)] = (above[0] + 1, above[1])
                        else:
                            shape = self._shape_of((client, clock))
                    depth = shape[0]
                    if max_depth is not None and depth > max_depth:
                        raise ShapeError(
                            f"shared types nested {depth} deep in {shape[1]} (limit {max_depth})"
                        )
                last, last_end = where, end
        return plan

    def _shape_of(self, type_id: Id) -> tuple[int, str | None]:
        """(depth, root) of the shared type held by item `type_id`: known, or new in this
        update, resolved up its chain of parents without recursion (chains can be long)."""
        shapes = self.plan.shapes
        known = self.index._shapes
        chain: list[Id] = []
        seen: set[Id] = set()
        current: Parent | None = type_id
        while True:
            if current is None:
                base: tuple[int, str | None] = (0, None)
                break
            if type(current) is str:
                base = (0, current)
                break
            shape = shapes.get(current) or known.get(current)  # type: ignore[arg-type]
            if shape is not None:
                base = shape
                break
            if current in seen:
                raise StructureError(f"item {current[0]}:{current[1]}: parents form a cycle")
            seen.add(current)  # type: ignore[arg-type]
            holder = self._find_new(current)  # type: ignore[arg-type]
            if holder is None or holder.kind != TYPE or holder.clock != current[1]:
                base = (0, None)  # not a type here: nothing can live in it
                break
            chain.append(current)  # type: ignore[arg-type]
            where = self.resolved.get((holder.client, holder.clock)) or self._resolve(holder)
            current = where.parent
            if current is None:
                base = (0, where.root)
                break
        depth, root = base
        for item in reversed(chain):
            depth += 1
            shapes[item] = (depth, root)
        return shapes.get(type_id) or known.get(type_id) or base

    # -- parents ----------------------------------------------------------------------------

    def _find_new(self, item: Id) -> Struct | None:
        client, clock = item
        starts = self.new_starts.get(client)
        if not starts:
            return None
        struct = self.new[client][bisect_right(starts, clock) - 1] if clock >= starts[0] else None
        if struct is None or clock >= struct.end:
            return None
        return struct

    def _resolve(self, struct: Struct) -> _Where:
        """The parent of `struct`, as yrs derives it.

        Iterative: in a whole-document update an item's origin is often a struct further on
        (clients are written in descending id order), and such chains can be thousands long.
        """
        stack = [struct]
        on_stack = {(struct.client, struct.clock)}
        while stack:
            top = stack[-1]
            outcome = self._try(top)
            if isinstance(outcome, Struct):
                key = (outcome.client, outcome.clock)
                if key in on_stack:
                    raise StructureError(f"item {top.client}:{top.clock}: origins form a cycle")
                stack.append(outcome)
                on_stack.add(key)
            else:
                key = (top.client, top.clock)
                self.resolved[key] = outcome
                stack.pop()
                on_stack.discard(key)
        return self.resolved[(struct.client, struct.clock)]

    def _try(self, struct: Struct) -> _Where | Struct:
        """Where `struct` lives, or a new struct whose place must be known first.

        Like yrs: an explicit parent wins; else the parent (and key-ness) of the origin's
        item, else of the right origin's item; an item with neither is dropped on arrival.
        """
        resolved = self.resolved.get((struct.client, struct.clock))
        if resolved is not None:
            return resolved
        if struct.kind in (GC, SKIP):
            return _GONE
        if struct.parent is not None:
            return self._explicit(struct)
        for origin in (struct.origin, struct.right_origin):
            if origin is None:
                continue
            where = self.index._known(origin)
            if where is None:
                other = self._find_new(origin)
                if other is None:
                    raise MissingDependency(
                        f"update refers to {origin[0]}:{origin[1]}, which is not here"
                    )
                where = self.resolved.get((other.client, other.clock))
                if where is None:
                    if other.kind in (GC, SKIP):
                        continue
                    return other
            if where.parent is None:
                continue  # a GC'd or dropped item: yrs looks at the other side
            return _Where(where.parent, where.keyed, _class_of(struct))
        return _Where(None, False, _class_of(struct))

    def _explicit(self, struct: Struct) -> _Where:
        parent = struct.parent
        keyed = struct.parent_sub is not None
        cls = _class_of(struct)
        if isinstance(parent, str):
            return _Where(parent, keyed, cls)
        assert parent is not None
        if parent in self.index._types:
            return _Where(parent, keyed, cls)
        known = self.index._known(parent)
        if known is not None:
            if known.cls is not _Class.ITEM:  # a deleted type: yrs drops the item
                holder_root = known.root
                if known.parent is not None:
                    holder_root = (
                        known.parent
                        if isinstance(known.parent, str)
                        else self._shape_of(known.parent)[1]
                    )
                return _Where(None, keyed, cls, holder_root)
            raise StructureError(
                f"item {struct.client}:{struct.clock} names {parent[0]}:{parent[1]} as its "
                "parent, which is not a shared type"
            )
        holder = self._find_new(parent)
        if holder is None:
            raise MissingDependency(f"update refers to {parent[0]}:{parent[1]}, which is not here")
        if holder.kind == TYPE and holder.clock == parent[1]:
            return _Where(parent, keyed, cls)
        if holder.kind in (GC, SKIP, DELETED):
            return _Where(None, keyed, cls)
        raise StructureError(
            f"item {struct.client}:{struct.clock} names {parent[0]}:{parent[1]} as its parent, "
            "which is not a shared type"
        )

    # -- content ----------------------------------------------------------------------------

    def _type_of(self, parent: Parent) -> int | None:
        if isinstance(parent, str):
            return self.index.root_types.get(parent)
        type_ref = self.index._types.get(parent)
        if type_ref is None:
            holder = self._find_new(parent)
            type_ref = holder.type_ref if holder is not None else None
        return type_ref

    def _allowed(self, where: _Where) -> frozenset[int]:
        """The content kinds an item at `where` may hold (all, for roots outside the schema)."""
        assert where.parent is not None
        parent_type = self._type_of(where.parent)
        if parent_type is None:
            return _EVERYTHING
        return _ALLOWED.get((parent_type, where.keyed), frozenset())

    def _refuse(self, struct: Struct, where: _Where) -> None:
        kind = struct.kind
        name = CONTENT_NAMES.get(kind, str(kind))
        at = f"item {struct.client}:{struct.clock}"
        if kind == TYPE and struct.type_ref not in _SEQUENCE_KINDS:
            raise StructureError(f"{at} creates a type Yjs does not have ({struct.type_ref})")
        if kind not in _KEYED_KINDS | _SEQUENCE_KINDS[TEXT]:
            raise StructureError(f"{at} holds {name} content, which Yjs no longer writes")
        assert where.parent is not None
        parent_type = self._type_of(where.parent)
        type_name = TYPE_NAMES.get(parent_type, str(parent_type))  # type: ignore[arg-type]
        type_name = ("an " if type_name[0] in "AEIOU" else "a ") + type_name
        if where.keyed and parent_type not in _KEYED_PARENTS:
            raise StructureError(f"{at} is a keyed entry inside {type_name}")
        if where.keyed:
            raise StructureError(f"{at} puts {name} content under a key of {type_name}")
        raise StructureError(f"{at} puts {name} content inside {type_name}")
