"""What every demo shares: a person's device, waiting on the document, failing with a reason.

The deployment itself (relay and worker subprocesses, tokens) is `crdtchat.stack.LocalStack`;
this module only adds the person's side and the demo's exit status: 0 when everything it
claims was seen, 1 with a one-line reason (and the tails of the process logs) otherwise.
"""

from __future__ import annotations

import os
import selectors
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import anyio

from crdtchat.document import Conversation
from crdtchat.replica import Replica
from crdtchat.schema import Message, assistant_turn_id
from crdtchat.stack import LocalStack, ManagedProcess
from crdtchat.worker.turn import Changes

MODEL = "gpt-4.1-mini"  # what the loopback OpenAI server is asked for; any name works there
TIMEOUT = 30.0  # seconds any single step may take before the demo gives up


class DemoFailed(Exception):
    """Something the demo shows did not happen; the message says what."""


def say(text: str = "") -> None:
    print(text, flush=True)


def check(condition: bool, reason: str) -> None:
    if not condition:
        raise DemoFailed(reason)


def openai_env(base_url: str) -> dict[str, str]:
    """A worker's environment for the loopback OpenAI server (the variables the SDKs read)."""
    return {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "demo-key"}


def anthropic_env(base_url: str) -> dict[str, str]:
    return {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "demo-key"}


@contextmanager
def loopback(vendor: str, logs: Path, *options: str) -> Iterator[str]:
    """`python -m crdtchat.loopback.<vendor>_server` on a free port; yields its base URL.

    A process of its own, like a real provider: when a worker is killed mid-reply, the
    server's broken pipe ends up in its log, not in the demo's output.
    """
    server = ManagedProcess(
        f"{vendor}-loopback",
        [sys.executable, "-m", f"crdtchat.loopback.{vendor}_server", "--port", "0", *options],
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        logs / f"{vendor}-loopback.log",
    )
    server.start(capture_stdout=True)
    try:
        assert server.proc is not None and server.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(server.proc.stdout, selectors.EVENT_READ)
            ready = selector.select(TIMEOUT)
        line = server.proc.stdout.readline() if ready else ""
        variable, _, url = line.strip().partition("=")
        check(variable.endswith("_BASE_URL") and bool(url), f"the {vendor} loopback did not start")
        yield url
    finally:
        server.stop()


class Device:
    """One device of a person: a Conversation kept in a Replica with its own SQLite file.

    `changes` wakes on every change of the messages, streams and derived entries, so the demo
    waits for what it wants to see instead of sleeping.
    """

    def __init__(self, stack: LocalStack, room: str, person: str, device: str, store: Path) -> None:
        self.name = device
        self.conversation = Conversation(author=person)
        self.changes = Changes()
        self.conversation.view.on_change(self.changes.notify)
        self.conversation.streams.observe_deep(self.changes.notify)
        self.conversation.derived.observe(self.changes.notify)
        self.conversation.settings_map.observe(self.changes.notify)
        self.replica = Replica(
            stack.url,
            room,
            stack.token(room, "writer", person),
            doc=self.conversation.doc,
            store_path=store,
            presence={"user": person, "device": device},
        )

    async def __aenter__(self) -> Self:
        await self.replica.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.replica.__aexit__(exc_type, exc, tb)

    async def synced(self) -> None:
        try:
            await self.replica.wait_until(lambda status: status.synced, timeout=TIMEOUT)
        except TimeoutError:
            raise DemoFailed(f"{self.name} did not sync with the relay") from None

    async def durable(self) -> None:
        """Until the relay has acknowledged every edit of this device as stored."""
        try:
            await self.replica.wait_until(lambda status: status.durable, timeout=TIMEOUT)
        except TimeoutError:
            raise DemoFailed(f"{self.name}: the relay did not store its edits") from None

    async def saved(self) -> None:
        """Until every edit is written to this device's own SQLite file."""
        await self.replica.wait_until(lambda status: status.unsaved == 0, timeout=TIMEOUT)

    async def until(
        self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT
    ) -> None:
        try:
            with anyio.fail_after(timeout):
                while not condition():
                    await self.changes.wait()
        except TimeoutError:
            raise DemoFailed(f"{self.name}: no {what} within {timeout:.0f} s") from None

    async def until_peer(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> None:
        """Until someone else in the room announces a presence that `predicate` accepts."""
        try:
            await self.replica.wait_for_peers(
                lambda peers: any(predicate(p) for p in peers.values()), timeout=TIMEOUT
            )
        except TimeoutError:
            raise DemoFailed(f"{self.name} does not see {what}") from None

    async def reply_to(self, question: Message, timeout: float = TIMEOUT) -> Message:
        """The committed first answer to `question`, once this device has it."""
        turn_id = assistant_turn_id(question.id, 1)
        await self.until(
            lambda: self.conversation.view.get(turn_id) is not None,
            f"reply to {question.content!r}",
            timeout,
        )
        return self.conversation.message(turn_id)


def logs_under(root: Path) -> Iterator[Path]:
    return iter(sorted(root.rglob("*.log")))


def _demo_failure(error: BaseException) -> DemoFailed | None:
    if isinstance(error, DemoFailed):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _demo_failure(inner)
            if found is not None:
                return found
    return None


def run(demo: Callable[[Path], Awaitable[Any]]) -> NoReturn:
    """Run `demo(tmp_dir)` on a fresh temporary directory; exit 0, or 1 with the reason."""
    with tempfile.TemporaryDirectory(prefix="crdtchat-demo-") as tmp:
        try:
            anyio.run(demo, Path(tmp))
        except Exception as error:  # any failure: say why, show the logs, exit 1
            failure = _demo_failure(error)
            if failure is None:
                traceback.print_exc()
            for log in logs_under(Path(tmp)):
                lines = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- last lines of {log.name}:", *lines, sep="\n", file=sys.stderr)
            reason = failure if failure is not None else f"{type(error).__name__}: {error}"
            print(f"FAILED: {reason}", file=sys.stderr)
            sys.exit(1)
    say("OK")
    sys.exit(0)
