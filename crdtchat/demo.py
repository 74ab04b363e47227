"""`crdtchat demo`: a relay on SQLite, a worker on the local model, and a chat, in one command.

The relay and the worker are child processes (the same commands a deployment runs); the chat
runs in this process. With a terminal it is the Textual client; without one (a pipe, CI) it
reads one message per line from stdin, prints each reply as it streams, and exits at EOF.
Ctrl-C or leaving the chat stops everything.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import anyio

from crdtchat.document import Conversation
from crdtchat.errors import CommandError
from crdtchat.replica import Replica
from crdtchat.schema import assistant_turn_id
from crdtchat.stack import SECRET_FILE, LocalStack
from crdtchat.worker.turn import Changes

ROOM = "demo"
PERSON = "you"
DEFAULT_PROMPT = "Hello! In one sentence, what is a CRDT?"
REPLY_TIMEOUT = 300.0


def web_link(stack: LocalStack) -> str:
    """The demo conversation in the web client, the token in the fragment (never sent)."""
    token = stack.token(ROOM, "writer", PERSON)
    return f"http://{stack.host}:{stack.port}/c/{ROOM}#token={token}"


def explain(stack: LocalStack, data: Path) -> str:
    secret_file = data / SECRET_FILE
    web_link_text = web_link(stack)
    return f"""\
crdtchat demo
  relay   {stack.url}  (SQLite in {data / "relay"}, log {stack.logs / "relay.log"})
  worker  demo-worker, local model SmolLM2-135M-Instruct (log {stack.logs / "demo-worker.log"})
  chat    room {ROOM!r} as {PERSON!r}, in this terminal

Join from a second terminal, as another device of {PERSON!r}:
  export CRDTCHAT_SECRET=$(cat {shlex.quote(str(secret_file))})
  export CRDTCHAT_TOKEN=$(crdtchat token --room {ROOM} --role writer --sub {PERSON})
  crdtchat chat {ROOM} --relay {stack.url} --device laptop
(use another --sub to join as someone else). Or open it in a browser, as another device:
  {web_link_text}
Ctrl-C stops the relay and the worker too.
"""


async def chat_headless(relay_url: str, token: str, lines: list[str]) -> int:
    """Send each line, print the reply as it streams; 0 if every reply completed."""
    conversation = Conversation(author=PERSON, role="writer")
    changes = Changes()
    conversation.view.on_change(changes.notify)
    conversation.streams.observe_deep(changes.notify)
    failures = 0
    async with Replica(relay_url, ROOM, token, doc=conversation.doc) as replica:
        await replica.wait_until(lambda status: status.synced, timeout=30)
        for line in lines:
            question = conversation.append("user", line)
            print(f"{PERSON}> {line}", flush=True)
            turn_id = assistant_turn_id(question.id, 1)
            shown = ""
            print("assistant> ", end="", flush=True)
            with anyio.fail_after(REPLY_TIMEOUT):
                while (answer := conversation.view.get(turn_id)) is None:
                    streamed = conversation.stream_text(turn_id) or ""
                    if streamed.startswith(shown) and len(streamed) > len(shown):
                        print(streamed[len(shown) :], end="", flush=True)
                        shown = streamed
                    await changes.wait()
            if answer.content.startswith(shown):
                print(answer.content[len(shown) :], flush=True)
            else:  # the worker restarted the reply: show it whole
                print(f"\n{answer.content}", flush=True)
            if answer.status == "incomplete":  # cut at max_tokens: an answer, not a failure
                print("[incomplete: cut at the token limit]", flush=True)
            elif answer.status != "complete":
                failures += 1
                print(f"[{answer.status}: {answer.error or 'no reason given'}]", flush=True)
        await replica.wait_until(lambda status: status.durable, timeout=30)
    return 1 if failures else 0


def demo_command(args: argparse.Namespace) -> int:
    data = Path(os.environ.get("CRDTCHAT_DEMO_DATA", "./crdtchat-data")).resolve()
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    lines = [] if interactive else [line.strip() for line in sys.stdin if line.strip()]
    with LocalStack(data, port=int(os.environ.get("CRDTCHAT_DEMO_PORT", "8765"))) as stack:
        try:
            stack.start_relay()
        except RuntimeError:
            stack.port = 0  # 8765 taken: any free port will do for a demo
            stack.start_relay()
        stack.start_worker("demo-worker", provider="local")
        print(explain(stack, data), flush=True)
        token = stack.token(ROOM, "writer", PERSON)
        if not interactive:
            try:
                return anyio.run(chat_headless, stack.url, token, lines or [DEFAULT_PROMPT])
            except TimeoutError as error:
                raise CommandError(f"no reply within {REPLY_TIMEOUT:.0f} s: {error}") from None
        from crdtchat.tui.main import chat_command

        os.environ["CRDTCHAT_TOKEN"] = token
        return chat_command(argparse.Namespace(room=ROOM, relay=stack.url, device="demo-terminal"))
