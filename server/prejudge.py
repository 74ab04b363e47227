"""Refusing a write before it is applied, from the structure index alone (design §7.4).

A refusal found after applying costs a rebuild of the room's document (O(document), ~45 ms at
10,000 messages), so refused writes were a way to spend the relay's CPU. Many refusals need
only to know *where* an update's new items land, which `crdtchat.structure` has already
worked out to check their shape: a reader may add nothing at all, and no role may put a live
item into a root it may not write, or into a root where it may only delete. Those are refused
here, before applying, for the price of the structure check.

What still needs applying (and a rebuild when refused), because it depends on content or on
which items a deletion hits: messages (schema, author, role, fixed keys, ids), drafts and read
marks under another's key, requests in another's name, deletions (a reader's, or into roots
the role may not touch), deleted-content items (they change nothing visible), and updates
whose new items sit in types the index cannot place.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable

from crdtchat import schema
from crdtchat.structure import Parent, Plan, StructureIndex, _Class, _Where
from server.permissions import RULES, Access


class _Roots:
    """The root each parent type lives in, found by walking up holders (each step a bisection
    in the index, or in the plan for types the update itself adds). Every type met on the way
    is remembered, so a deep chain is walked once; None where the index cannot tell."""

    def __init__(self, index: StructureIndex, plan: Plan) -> None:
        self.index = index
        self.plan = plan
        self.starts = {client: [run[0] for run in runs] for client, runs in plan.runs.items()}
        self.cache: dict[Parent, str | None] = {}

    def _where_new(self, item: tuple[int, int]) -> _Where | None:
        client, clock = item
        runs = self.plan.runs.get(client)
        if not runs:
            return None
        at = bisect_right(self.starts[client], clock) - 1
        if at < 0 or clock >= runs[at][1]:
            return None
        return runs[at][2]

    def of(self, parent: Parent) -> str | None:
        chain: list[Parent] = []
        found: str | None = None
        while True:
            if isinstance(parent, str):
                found = parent
                break
            if parent in self.cache:
                found = self.cache[parent]
                break
            chain.append(parent)
            where = self.index._known(parent) or self._where_new(parent)
            if where is None or where.parent is None:
                break
            parent = where.parent
        for link in chain:
            self.cache[link] = found
        return found


def roots_of_new_items(index: StructureIndex, plan: Plan) -> set[str | None]:
    """The root of every live item `plan` adds (None where the index cannot tell)."""
    roots = _Roots(index, plan)
    found: set[str | None] = set()
    for runs in plan.runs.values():
        for _start, _end, where in runs:
            if where.cls is _Class.ITEM and where.parent is not None:
                found.add(roots.of(where.parent))
    return found


def refuse_before_applying(role: str, index: StructureIndex, plan: Plan) -> str | None:
    """The reason to refuse an update from `role` that adds `plan`, if it is plain already.

    The reasons are the ones `server.permissions` gives for the same write after applying.
    """
    if not plan.runs:
        return None  # nothing new: deletions at most, which need applying
    rules = RULES.get(role)
    if rules is None:
        return f"unknown role {role!r}"
    if not rules:
        return f"a {role} may not change the document"  # even a GC range moves its clock
    for root in sorted(r for r in roots_of_new_items(index, plan) if r is not None):
        if root not in schema.ALL_ROOTS:
            return "update writes a root that is not part of the schema"
        access = rules.get(root)
        if access is None:
            return f"a {role} may not write {root}"
        if access is Access.DELETE_ONLY:
            return f"a {role} may only delete entries of {root}"
    return None


DeleteSet = dict[int, list[tuple[int, int]]]  # client -> (clock, length) ranges


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether `ranges` (sorted by clock) cover every clock of [start, end)."""
    for clock, length in ranges:
        if clock > start:
            return False
        if clock + length > start:
            start = clock + length
            if start >= end:
                return True
    return start >= end


def refuse_deletions_before_applying(
    role: str,
    index: StructureIndex,
    plan: Plan,
    deletes: DeleteSet,
    deleted: Callable[[], DeleteSet],
) -> str | None:
    """The reason to refuse an update for its delete set, if the index can tell already.

    Deleting clocks the room does not have is refused as it is after applying ("sync first").
    Deleting a live item that the role may not touch (any item, for a reader; an item of a root
    the role may not write; a canonical message itself) is refused if the item is not deleted
    already: a stock Yjs client's sync step 2 carries every deletion it knows, and re-stating
    one changes nothing. `deleted()` gives the room's delete set; it is asked for only when
    such a deletion is found, so accepted updates never pay for it (in clock order per
    client). Deletions that depend on
    content (text inside a message: whose message it is; another subject's draft) still need
    applying.
    """
    if not deletes:
        return None
    ends = index._ends
    planned = {client: runs[-1][1] for client, runs in plan.runs.items() if runs}
    for client, ranges in deletes.items():
        known = max(ends.get(client, 0), planned.get(client, 0))
        for clock, length in ranges:
            if clock + length > known:
                return "update deletes changes the relay does not have (sync first)"
    rules = RULES.get(role)
    if rules is None:
        return f"unknown role {role!r}"
    roots = _Roots(index, plan)
    suspects: list[tuple[int, int, int, str]] = []  # client, start, end, reason
    for client, ranges in deletes.items():
        starts = index._starts.get(client)
        if not starts:
            continue
        wheres = index._where[client]
        client_end = ends[client]
        for clock, length in ranges:
            end = min(clock + length, client_end)
            at = max(0, bisect_right(starts, clock) - 1)
            while at < len(starts) and starts[at] < end:
                run_end = starts[at + 1] if at + 1 < len(starts) else client_end
                where = wheres[at]
                low, high = max(clock, starts[at]), min(end, run_end)
                at += 1
                if high <= low or where.parent is None or where.cls is not _Class.ITEM:
                    continue
                reason = _deletion_reason(role, rules, where, roots)
                if reason is not None:
                    suspects.append((client, low, high, reason))
    if not suspects:
        return None
    gone = deleted()
    for client, low, high, reason in suspects:
        if not _covered(gone.get(client, []), low, high):
            return reason
    return None


def _deletion_reason(
    role: str,
    rules: dict[str, Access],
    where: _Where,
    roots: _Roots,
) -> str | None:
    """Why `role` may not delete a live item at `where`, when that does not depend on content."""
    if not rules:
        return f"a {role} may not change the document"
    parent = where.parent
    assert parent is not None
    root = roots.of(parent)
    if root is None or root not in schema.ALL_ROOTS:
        return None
    access = rules.get(root)
    if access is None:
        return f"a {role} may not write {root}"
    if access is Access.MESSAGES and parent == schema.MESSAGES:
        return "canonical messages cannot be deleted"
    return None
