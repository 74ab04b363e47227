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

from crdtchat import schema
from crdtchat.structure import Parent, Plan, StructureIndex, _Class, _Where
from server.permissions import RULES, Access


def roots_of_new_items(index: StructureIndex, plan: Plan) -> set[str | None]:
    """The root of every live item `plan` adds (None where the index cannot tell).

    A nested type's root is found by walking up holders, each step a bisection in the index
    or in the plan; every type met on the way is remembered, so a deep chain is walked once.
    """
    starts = {client: [run[0] for run in runs] for client, runs in plan.runs.items()}
    cache: dict[Parent, str | None] = {}

    def where_new(item: tuple[int, int]) -> _Where | None:
        client, clock = item
        runs = plan.runs.get(client)
        if not runs:
            return None
        at = bisect_right(starts[client], clock) - 1
        if at < 0 or clock >= runs[at][1]:
            return None
        return runs[at][2]

    def root_of(parent: Parent) -> str | None:
        chain: list[Parent] = []
        found: str | None = None
        while True:
            if isinstance(parent, str):
                found = parent
                break
            if parent in cache:
                found = cache[parent]
                break
            chain.append(parent)
            where = index._known(parent) or where_new(parent)
            if where is None or where.parent is None:
                break
            parent = where.parent
        for link in chain:
            cache[link] = found
        return found

    roots: set[str | None] = set()
    for runs in plan.runs.values():
        for _start, _end, where in runs:
            if where.cls is _Class.ITEM and where.parent is not None:
                roots.add(root_of(where.parent))
    return roots


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
