"""Interop with an unmodified Yjs peer: node with the npm package `yjs` reads what Python wrote,
writes under the same schema, and Python reads it back — and the reverse (design §2)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from crdtchat.document import Conversation
from crdtchat.schema import ToolCall, assistant_turn_id
from tests.support import JS
from tests.support.document import FILE, MODEL, Clock

SCRIPT = JS / "doc_interop.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not installed: the JS interop tests need it"
)


def run_js(*args: str | Path) -> Any:
    if not (JS / "node_modules" / "yjs").is_dir():
        pytest.fail(f"the npm packages are missing: run `cd {JS} && npm install`")
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=JS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout else None


def texts(report: dict) -> dict[str, str]:
    """message id → its content, checking on the way that every message is a Y.Map with a Y.Text."""
    found = {}
    for item in report["messages"]:
        assert item["type"] == "Y.Map"
        entries = item["entries"]
        assert entries["content"]["type"] == "Y.Text"
        found[entries["id"]["value"]] = entries["content"]["text"]
    return found


def test_js_reads_python_writes_and_python_reads_js_back(tmp_path: Path) -> None:
    clock = Clock()
    ann = Conversation.create(author="ann", title="From Python 😀", clock=clock)
    ann.set_settings(system="Be brief 𝄞", provider="openai", model="gpt-x", params={"top_p": 0.9})
    ann.set_tool(
        "weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}}
    )
    system = ann.append("system", "sys")
    # Built by code-point inserts on both sides of the emoji: yrs splits the text at UTF-8
    # offsets, and Yjs must still read it right.
    edited = ann.append("user", "a😀d𝄞", message_id="edit-me", files=[FILE])
    ann.insert_text(edited.id, 1, "b")
    ann.insert_text(edited.id, 3, "c")
    assert ann.message(edited.id).content == "ab😀cd𝄞"
    worker = Conversation.from_update(ann.encode_state(), author="worker", clock=clock)
    call = ToolCall(id="call-1", name="weather", arguments='{"city":"Oslo"}')
    worker.commit_turn(
        edited.id,
        assistant_turn_id(edited.id, 1),
        model=MODEL,
        status="complete",
        content="Let me check 😀",
        tool_calls=[call],
    )
    ann.apply_update(worker.update_since(ann.state_vector()))
    result = ann.append("tool", '{"temp": -3}', tool_call_id="call-1")
    ann.set_draft("draft 😀")
    ann.mark_read(result.id)

    written = tmp_path / "python.bin"
    written.write_bytes(ann.encode_state())
    from_js = tmp_path / "js.bin"
    report = run_js("read-append", written, from_js)

    roots = report["roots"]
    assert roots["canonical.meta"]["schema"] == {"type": "json", "value": 1}
    assert roots["canonical.meta"]["title"]["value"] == "From Python 😀"
    assert roots["canonical.settings"]["system"]["value"] == "Be brief 𝄞"
    assert roots["canonical.settings"]["params"]["value"] == {"top_p": 0.9}
    assert roots["canonical.tools"]["weather"]["value"]["parameters"]["type"] == "object"
    assert roots["transport.drafts"]["ann"] == {
        "type": "Y.Text",
        "text": "draft 😀",
        "utf16Length": 8,
    }
    assert roots["transport.read"]["ann"]["value"] == result.id
    assert texts(report) == {m.id: m.content for m in ann.all_messages()}
    by_id = {item["entries"]["id"]["value"]: item["entries"] for item in report["messages"]}
    reply = by_id[assistant_turn_id(edited.id, 1)]
    assert reply["tool_calls"]["value"] == [call.model_dump()]
    assert reply["model"]["value"] == MODEL.model_dump()
    assert by_id[edited.id]["files"]["value"] == [FILE.model_dump()]
    assert by_id[edited.id]["content"]["utf16Length"] == len("ab😀cd𝄞".encode("utf-16-le")) // 2
    assert by_id[system.id]["parent"]["value"] is None

    # Python applies the JS peer's incremental update to the live document.
    ann.apply_update(from_js.read_bytes())
    assert ann.problems() == []
    js_message = ann.message("js-1")
    assert (js_message.role, js_message.author, js_message.parent) == ("user", "js-peer", result.id)
    assert js_message.content == "from JS 😀 with 𝄞"
    assert isinstance(js_message.created_at, float)
    assert ann.message(edited.id).content == "ab😀[js]c𝄞"
    assert [m.id for m in ann.current_thread()][-2:] == [result.id, "js-1"]
    assert [w.message.id for w in ann.waiting_for_reply()] == ["js-1"]
    # The same on a replica that opens the merged state from scratch.
    fresh = Conversation.from_update(ann.encode_state(), author="x")
    assert fresh.message("js-1") == js_message
    assert fresh.message(edited.id).content == "ab😀[js]c𝄞"

    # And back once more: Python edits around the astral characters of JS-written text.
    js_device = Conversation.from_update(ann.encode_state(), author="js-peer")
    js_device.insert_text("js-1", len("from JS 😀"), "!")
    js_device.delete_text("js-1", len("from JS 😀! with "), 1)
    final = tmp_path / "final.bin"
    final.write_bytes(js_device.encode_state())
    assert texts(run_js("dump", final))["js-1"] == "from JS 😀! with "


def test_python_reads_js_writes_and_js_reads_python_back(tmp_path: Path) -> None:
    created = tmp_path / "js.bin"
    run_js("create", created)
    clock = Clock()
    worker = Conversation.from_update(created.read_bytes(), author="worker", clock=clock)
    assert worker.problems() == []
    assert worker.title == "Made in JS 😀"
    assert worker.meta["created_at"] == 1700000000.5
    assert worker.settings.system == "Answer in French."
    assert worker.settings.params == {"temperature": 0.5}
    assert worker.tools["lookup"].description == "Look up"
    assert worker.draft("js-peer") == "typing 😀"
    thread = worker.current_thread()
    assert [(m.id, m.role, m.parent) for m in thread] == [
        ("js-sys", "system", None),
        ("js-user", "user", "js-sys"),
    ]
    assert thread[1].content == "ab😀cd𝄞 é"
    assert thread[1].created_at == 1700000002.25
    assert thread[0].created_at == 1700000001.0  # JS wrote an integer; the reader takes it
    (waiting,) = worker.waiting_for_reply()
    assert waiting.message.id == "js-user"

    # Python answers through a stream, and the JS author's other device edits its text.
    vector = worker.state_vector()
    turn = waiting.turn_id
    worker.claim_lease("js-user", turn, holder="worker", ttl=30)
    worker.start_stream(turn, parent="js-user")
    worker.append_stream(turn, "Bonjour 😀")
    worker.commit_turn("js-user", turn, model=MODEL, status="complete")
    device = Conversation.from_update(worker.encode_state(), author="js-peer", clock=clock)
    device.insert_text("js-user", 3, "[py]")  # just after the emoji
    device.delete_text("js-user", len("ab😀[py]cd𝄞 "), 1)  # the "é"
    device.append("user", "merci 𝄞")
    update = tmp_path / "python.bin"
    update.write_bytes(device.update_since(vector))

    report = run_js("dump", created, update)
    contents = texts(report)
    assert contents["js-user"] == "ab😀[py]cd𝄞 "
    assert contents[turn] == "Bonjour 😀"
    assert list(contents)[-1] not in ("js-sys", "js-user", turn)
    assert contents[list(contents)[-1]] == "merci 𝄞"
    by_id = {item["entries"]["id"]["value"]: item["entries"] for item in report["messages"]}
    assert by_id[turn]["role"]["value"] == "assistant"
    assert by_id[turn]["parent"]["value"] == "js-user"
    assert by_id[turn]["status"]["value"] == "complete"
    assert report["roots"]["transport.streams"] == {}
    assert report["roots"]["transport.leases"] == {}
