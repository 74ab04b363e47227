"""The web page reads a person's list document exactly as `ConversationList` does (design §2).

The page's reader (web/src/listdoc.js, run in node on a yjs document built from the same
update) and the Python one must agree on which entries count, their fields and their order,
on a list document that honest devices and a hostile writer both touched.
"""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

from pycrdt import Map

from crdtchat import schema
from crdtchat.conversations import ConversationList
from tests.support import JS


def js_entries(update: bytes) -> dict[str, Any]:
    line = json.dumps({"update": base64.b64encode(update).decode()}) + "\n"
    done = subprocess.run(
        ["node", str(JS / "web_list.mjs")],
        cwd=JS,
        input=line,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(done.stdout))


def python_entries(rooms: ConversationList) -> dict[str, Any]:
    """What `ConversationList` reads, in the shape listdoc.js returns."""
    return {
        "all": [
            {
                "room": e.room,
                "addedAt": e.added_at,
                "title": e.title,
                "pinned": e.pinned,
                "archived": e.archived,
                "read": e.read,
            }
            for e in rooms.entries(archived=None)
        ],
        "current": [e.room for e in rooms.entries()],
    }


def test_a_hostile_list_document_reads_the_same() -> None:
    from pycrdt import Doc

    rooms = ConversationList(Doc())
    rooms.add("older", "Older")
    rooms.add("newer")
    rooms.add("pinned-one", "Pinned")
    rooms.pin("pinned-one")
    rooms.add("hidden")
    rooms.archive("hidden")
    rooms.mark_read("newer", "m1")
    root = {name: rooms.doc.get(name, type=Map) for name in schema.LIST_ROOTS}
    with rooms.doc.transaction():  # what a buggy or hostile device could write
        root[schema.LIST_ROOMS]["bad room"] = {"added_at": 5.0}
        root[schema.LIST_ROOMS]["trailing\n"] = {"added_at": 5.0}
        root[schema.LIST_ROOMS]["no-stamp"] = {"added_at": "yesterday"}
        root[schema.LIST_ROOMS]["not-a-map"] = ["added_at", 3]
        root[schema.LIST_ROOMS]["same-a"] = {"added_at": 7.0}
        root[schema.LIST_ROOMS]["same-b"] = {"added_at": 7}
        root[schema.LIST_ROOMS]["bool-stamp"] = {"added_at": True}
        root[schema.LIST_TITLES]["no-stamp"] = 42
        root[schema.LIST_PINNED]["same-a"] = "yes"
        root[schema.LIST_PINNED]["same-b"] = True
        root[schema.LIST_ARCHIVED]["older"] = 1
        root[schema.LIST_READ]["older"] = 9
        root[schema.LIST_TITLES]["not-in-list"] = "ghost"
    expected = python_entries(rooms)
    assert len(expected["all"]) == 9 and "hidden" not in expected["current"]  # as hostile as meant
    assert js_entries(rooms.doc.get_update()) == expected
