"""A JavaScript client joins a Python conversation.

Ada talks to the worker from Python. Then Jo joins from node with the unmodified `y-websocket`
WebsocketProvider and a plain Yjs document (the npm packages in tests/js/node_modules; install
them with `make js`): Jo's client reads the messages by their schema names
(`doc.getArray('canonical.messages')`), appends a question of its own, and waits for the
worker's reply. Python sees Jo's presence, Jo's question and the reply.

    python demos/js_client.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anyio
from _kit import MODEL, TIMEOUT, DemoFailed, Device, check, loopback, openai_env, run, say
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from crdtchat.schema import Message, assistant_turn_id
from crdtchat.stack import LocalStack

ROOM = "bilingual"
JS_DIR = Path(__file__).resolve().parent.parent / "tests" / "js"

# Run with `node --input-type=module` from tests/js, so that the imports resolve there.
# Arguments: relay URL, room, token, subject. Prints one JSON object per line.
JS_CLIENT = r"""
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const [url, room, token, sub] = process.argv.slice(1)
const doc = new Y.Doc()
const messages = doc.getArray('canonical.messages')
const provider = new WebsocketProvider(url, room, doc, {
  params: { token }, WebSocketPolyfill: WebSocket, disableBc: true
})
provider.awareness.setLocalState({ user: sub, device: 'node' })
const say = (object) => process.stdout.write(JSON.stringify(object) + '\n')
const listing = () => messages.toArray().map((m) => ({
  id: m.get('id'), role: m.get('role'), author: m.get('author'), text: String(m.get('content'))
}))
const find = (id) => messages.toArray().find((m) => m.get('id') === id)

provider.once('sync', () => {
  const before = listing()
  say({ event: 'read', messages: before })
  const id = crypto.randomUUID().replaceAll('-', '')
  doc.transact(() => {
    const m = new Y.Map()
    m.set('id', id)
    m.set('role', 'user')
    m.set('author', sub)
    m.set('parent', before.length ? before[before.length - 1].id : null)
    m.set('created_at', Date.now() / 1000)
    m.set('content', new Y.Text('hola, what did Ada ask you?'))
    messages.push([m])
  })
  say({ event: 'appended', id })
  const check = () => {
    const reply = find(`${id}~a1`)
    if (reply === undefined) return
    doc.off('update', check)
    say({ event: 'reply', author: reply.get('author'), text: String(reply.get('content')) })
    provider.destroy()
    setTimeout(() => process.exit(0), 50)
  }
  doc.on('update', check)
  check()
})
"""


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise DemoFailed("node is not installed; this demo runs a JavaScript client on node")
    modules = JS_DIR / "node_modules"
    if not all((modules / name).is_dir() for name in ("yjs", "y-websocket", "ws")):
        raise DemoFailed(f"{modules} lacks yjs, y-websocket or ws: install them with `make js`")
    return [node, "--input-type=module", "-e", JS_CLIENT, "--"]


async def next_event(lines: BufferedByteReceiveStream, process: Process) -> dict[str, Any]:
    try:
        with anyio.fail_after(TIMEOUT):
            line = await lines.receive_until(b"\n", 1 << 20)
    except TimeoutError:
        raise DemoFailed("the JS client said nothing in time") from None
    except (anyio.IncompleteRead, anyio.EndOfStream):
        raise DemoFailed(f"the JS client exited ({await process.wait()}); see node.log") from None
    event: dict[str, Any] = json.loads(line)
    return event


async def demo(tmp: Path) -> None:
    command = node_command()
    with (
        LocalStack(tmp / "stack") as stack,
        loopback("openai", stack.logs) as openai_url,
    ):
        stack.start_relay()
        stack.start_worker("worker-1", provider="openai", model=MODEL, env=openai_env(openai_url))
        say(f"relay on {stack.url}; worker-1 answers with {MODEL} (loopback OpenAI server)")

        async with Device(stack, ROOM, "ada", "python", tmp / "ada.sqlite") as ada:
            await ada.synced()
            conversation = ada.conversation
            question = conversation.append("user", "What is the capital of Portugal?")
            answer = await ada.reply_to(question)
            say(f"ada (Python) asked {question.content!r}; the worker replied {answer.content!r}")

            # What Python holds when Jo joins: Jo's client appends right after reading, so
            # by the time Python reads Jo's report its own document may hold Jo's message too.
            held = [[m.id, m.content] for m in conversation.all_messages()]
            # Jo is online only until the worker's reply reaches it: watched from now on, as
            # each change arrives, so a slow reader of Jo's output cannot miss the visit.
            jo_online = anyio.Event()

            def watch(topic: str, change: object) -> None:
                if any(p.get("user") == "jo" for p in ada.replica.peers.values()):
                    jo_online.set()

            watching = ada.replica.awareness.observe(watch)
            args = [stack.url, ROOM, stack.token(ROOM, "writer", "jo"), "jo"]
            with open(stack.logs / "node.log", "wb") as node_log:
                async with await anyio.open_process(
                    [*command, *args], cwd=JS_DIR, stderr=node_log
                ) as node:
                    assert node.stdout is not None
                    lines = BufferedByteReceiveStream(node.stdout)
                    try:
                        await talk_to(node, lines, ada, answer, held, jo_online)
                    finally:
                        ada.replica.awareness.unobserve(watching)
                        if node.returncode is None:  # it failed: do not wait for it forever
                            node.kill()
            say(f"ada (Python) sees the same reply; the thread has {len(conversation)} messages")


async def talk_to(
    node: Process,
    lines: BufferedByteReceiveStream,
    ada: Device,
    answer: Message,
    held: list[list[str]],
    jo_online: anyio.Event,
) -> None:
    """What the JS client prints, step by step, checked against what Python sees.

    `held`: [id, text] of every message Python held before the JS client started;
    `jo_online`: set once Python has seen Jo's presence."""
    conversation = ada.conversation
    say("jo joins from node with y-websocket's WebsocketProvider")

    read = await next_event(lines, node)
    check(read.get("event") == "read", f"unexpected {read}")
    for m in read["messages"]:
        say(f"  jo (JS) reads  {m['role']:9} by {m['author']}: {m['text']!r}")
    check(
        [[m["id"], m["text"]] for m in read["messages"]] == held,
        "the JS client read other messages than Python holds",
    )

    with anyio.move_on_after(TIMEOUT):
        await jo_online.wait()
    check(jo_online.is_set(), "python does not see jo online")
    say("ada sees jo online (device 'node') through awareness")

    appended = await next_event(lines, node)
    check(appended.get("event") == "appended", f"unexpected {appended}")
    jo_id = appended["id"]
    await ada.until(lambda: conversation.view.get(jo_id) is not None, "message from JS")
    from_js = conversation.message(jo_id)
    say(f"ada (Python) sees jo's message: {from_js.content!r}")
    check(from_js.author == "jo" and from_js.parent == answer.id, "bad message")

    replied = await next_event(lines, node)
    check(replied.get("event") == "reply", f"unexpected {replied}")
    say(f"jo (JS) sees the worker's reply: {replied['text']!r}")
    reply = await ada.reply_to(from_js)
    check(reply.content == replied["text"], "Python and JS see different replies")
    check(reply.id == assistant_turn_id(jo_id, 1), "unexpected reply id")
    check(reply.content.startswith("[turn 2]"), "the worker missed Ada's turn")
    with anyio.fail_after(TIMEOUT):
        code = await node.wait()
    check(code == 0, f"the JS client exited with status {code}")


if __name__ == "__main__":
    run(demo)
