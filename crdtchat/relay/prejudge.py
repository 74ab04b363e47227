"""Refusing a write before it is applied, from the structure index alone (design §7.4).

A refusal found after applying costs a rebuild of the room's document (O(document), ~45 ms at
10,000 messages), so refused writes were a way to spend the relay's CPU. Many refusals need
only to know *where* an update's items land, which `crdtchat.structure` has already worked out
to check their shape (it records the root of every shared type, `Plan.roots`): a reader may
add nothing at all; no role may add items to a root it may not write, or where it may only
delete; nobody may delete clocks the room does not have, or a live item the role may not
touch (any, for a reader; one in a root the role may not write; a canonical message). Those
are refused here, before applying, for the price of the structure check.

What still needs applying (and a rebuild when refused), because it depends on content: messages
(schema, author, role, fixed keys, ids, edits and deletions inside others' messages), drafts
and read marks under another's key, requests in another's name, and items in types the index
cannot place.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping

from crdtchat import schema
from crdtchat.rights import RIGHTS, Access
from crdtchat.structure import Parent, Plan, StructureIndex, _Class, _Where


def _root_of(index: StructureIndex, plan: Plan, parent: Parent) -> str | None:
    """The root a parent type lives under, as the index recorded it when items first landed in
    it (None if it holds nothing the index knows of)."""
    if isinstance(parent, str):
        return parent
    shape = index._shapes.get(parent) or plan.shapes.get(parent)
    return None if shape is None else shape[1]


def refuse_before_applying(role: str, index: StructureIndex, plan: Plan) -> str | None:
    """The reason to refuse an update from `role` that adds `plan`, if it is plain already.

    The reasons are the ones `crdtchat.relay.permissions` gives for the same write after applying.
    """
    if not plan.runs:
        return None  # nothing new: deletions at most, which need applying
    rights = RIGHTS.get(role)
    if rights is None:
        return f"unknown role {role!r}"
    rules = rights.roots
    if not rules:
        return f"a {role} may not change the document"  # even a GC range moves its clock
    for root in sorted(plan.roots):
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
    rights = RIGHTS.get(role)
    if rights is None:
        return f"unknown role {role!r}"
    rules = rights.roots
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
                reason = _deletion_reason(role, rules, _root_of(index, plan, where.parent), where)
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
    role: str, rules: Mapping[str, Access], root: str | None, where: _Where
) -> str | None:
    """Why `role` may not delete a live item at `where`, when that does not depend on content."""
    if not rules:
        return f"a {role} may not change the document"
    if root is None or root not in schema.ALL_ROOTS:
        return None
    access = rules.get(root)
    if access is None:
        return f"a {role} may not write {root}"
    if access is Access.MESSAGES and where.parent == schema.MESSAGES:
        return "canonical messages cannot be deleted"
    return None
