"""An unmodified JS client (npm `y-websocket` WebsocketProvider on node) and Python replicas
sync one conversation through the relay, both ways, and see each other's presence.

The JS side is tests/js/relay_peer.mjs; its npm packages are installed into tests/js/node_modules
with `npm ci` (from tests/js/package-lock.json) when they are missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from pycrdt import Array, Doc, Text

from crdtchat.replica import Backoff, Replica
from crdtchat.tokens import read_claims_unverified
from tests.support import JS
from tests.support.relay import RelayProcess, message_map, raw_client, running_relay, token
from tests.support.replica import wait_doc

SCRIPT = JS / "relay_peer.mjs"
NODE = shutil.which("node")
NPM = shutil.which("npm")
ROOM = "interop-room"

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """Install the pinned npm packages once if they are not there yet."""
    modules = JS / "node_modules"
    needed = ("yjs", "y-websocket", "ws")
    if not all((modules / name).is_dir() for name in needed):
        if NPM is None:
            pytest.fail("npm is needed to install tests/js/node_modules")
        done = subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stderr}"
    return modules


@pytest.fixture
def relay(tmp_path: Path) -> Any:
    with running_relay(tmp_path / "relay-data") as process:
        yield process


class JsPeer:
    """Line-oriented JSON commands to relay_peer.mjs; asynchronous events are kept apart."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._stdout = BufferedByteReceiveStream(process.stdout)
        self.events: list[dict[str, Any]] = []

    async def _line(self) -> dict[str, Any]:
        raw = await self._stdout.receive_until(b"\n", 16 * 1024 * 1024)
        return json.loads(raw)

    async def request(self, timeout: float = 20.0, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send((json.dumps(command) + "\n").encode())
        with anyio.fail_after(timeout):
            while True:
                line = await self._line()
                if "error" in line:
                    raise AssertionError(f"JS peer failed on {command}: {line['error']}")
                if "ok" in line:
                    assert line["ok"] == command["cmd"]
                    return line
                self.events.append(line)

    async def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                for event in self.events:
                    if event.get("event") == name:
                        return event
                self.events.append(await self._line())


@asynccontextmanager
async def js_peer(relay: RelayProcess, sub: str, device: str) -> AsyncIterator[JsPeer]:
    assert NODE is not None
    url = f"ws://{relay.host}:{relay.port}"
    command = [NODE, str(SCRIPT), url, ROOM, token(ROOM, "writer", sub), sub, device]
    async with await anyio.open_process(command, cwd=JS) as process:
        peer = JsPeer(process)
        try:
            yield peer
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()


def messages(doc: Doc) -> Array:
    return doc.get("canonical.messages", type=Array)


def text_of(doc: Doc, message_id: str) -> str | None:
    for m in messages(doc):
        if m["id"] == message_id:
            return str(m["content"])
    return None


@pytest.mark.anyio
async def test_js_client_and_python_replicas_sync_both_ways_with_presence(
    relay: RelayProcess, node_modules: Path, tmp_path: Path
) -> None:
    fast = Backoff(initial=0.05, maximum=0.5)
    ada_text = "hello from Python ✓ 🦊"
    jo_text = "hola desde node 𝄞"
    url = f"ws://{relay.host}:{relay.port}"
    async with Replica(
        url,
        ROOM,
        token(ROOM, "writer", "ada"),
        store_path=tmp_path / "ada.db",
        presence={"user": "ada", "device": "laptop"},
        backoff=fast,
    ) as ada:
        await ada.wait_until(lambda s: s.synced, timeout=20)
        messages(ada.doc).append(message_map("p1", "user", "ada", ada_text))
        await ada.wait_until(lambda s: s.durable, timeout=20)

        async with js_peer(relay, "jo", "node") as jo:
            await jo.wait_event("synced")
            # Python -> JS: the message, exactly, as a Y.Map with a Y.Text.
            seen = await jo.request(cmd="wait_messages", contents={"p1": ada_text})
            assert seen["contents"]["p1"] == {"author": "ada", "role": "user", "text": ada_text}

            # JS -> Python.
            await jo.request(cmd="append", id="j1", text=jo_text)
            await wait_doc(ada.doc, lambda: text_of(ada.doc, "j1") == jo_text)
            j1 = next(m for m in messages(ada.doc) if m["id"] == "j1")
            assert j1["author"] == "jo" and isinstance(j1["content"], Text)

            # Text edits both ways, each on the editor's own message (design §4).
            p1_content = next(m for m in messages(ada.doc) if m["id"] == "p1")["content"]
            p1_content += " — edited in Python"
            await jo.request(cmd="wait_messages", contents={"p1": ada_text + " — edited in Python"})
            await jo.request(cmd="append_text", id="j1", text=" — edited in node 😀")
            await wait_doc(
                ada.doc, lambda: text_of(ada.doc, "j1") == jo_text + " — edited in node 😀"
            )

            # Presence both ways.
            peers = await jo.request(cmd="wait_peer", match={"user": "ada", "device": "laptop"})
            assert any(p["clientID"] == ada.client_id for p in peers["peers"])
            await ada.wait_for_peers(
                lambda ps: any(s == {"user": "jo", "device": "node"} for s in ps.values()),
                timeout=20,
            )
            ada.set_presence(typing=True)
            await jo.request(cmd="wait_peer", match={"user": "ada", "typing": True})

            # A second Python replica joining now gets everything, from the relay alone.
            async with Replica(url, ROOM, token(ROOM, "reader", "eve"), durable_acks=False) as eve:
                await eve.wait_until(lambda s: s.synced, timeout=20)
                assert text_of(eve.doc, "j1") == jo_text + " — edited in node 😀"
                assert text_of(eve.doc, "p1") == ada_text + " — edited in Python"

            await ada.wait_until(lambda s: s.durable, timeout=20)
            await jo.request(cmd="close")
        # The JS client left: its presence is gone for Python.
        await ada.wait_for_peers(
            lambda ps: not any(s.get("user") == "jo" for s in ps.values()), timeout=20
        )

    async with raw_client(relay.url(ROOM, token(ROOM, "reader", "eve"))) as observer:
        assert sorted(observer.texts()) == sorted(
            [ada_text + " — edited in Python", jo_text + " — edited in node 😀"]
        )


@pytest.mark.anyio
async def test_js_sees_typing_presence_of_a_persons_other_device(
    relay: RelayProcess, node_modules: Path
) -> None:
    """Presence is per device: the JS client sees both of ada's devices, and their changes."""
    url = f"ws://{relay.host}:{relay.port}"
    async with Replica(
        url,
        ROOM,
        token(ROOM, "writer", "ada"),
        presence={"user": "ada", "device": "phone", "typing": False},
    ) as phone:
        async with js_peer(relay, "ada", "browser") as browser:
            await browser.wait_event("synced")
            await browser.request(cmd="wait_peer", match={"user": "ada", "device": "phone"})
            await phone.wait_for_peers(
                lambda ps: any(s.get("device") == "browser" for s in ps.values()), timeout=20
            )
            assert [s["device"] for s in phone.other_devices().values()] == ["browser"]
            phone.set_presence(typing=True)
            await browser.request(cmd="wait_peer", match={"device": "phone", "typing": True})
            await browser.request(cmd="close")
        # The browser left: the phone no longer lists it among ada's devices.
        await phone.wait_for_peers(lambda ps: not ps, timeout=20)
        assert phone.other_devices() == {}


@pytest.mark.anyio
async def test_web_client_refreshes_its_token_in_band(
    relay: RelayProcess, node_modules: Path
) -> None:
    """Extension 102 as design §3 specifies it for a web client (tests/js/refresh_peer.mjs): the
    connection outlives the token it was opened with."""
    assert NODE is not None
    room = "js-refresh"
    short = token(room, "reader", "web", ttl=2)
    fresh = token(room, "reader", "web", ttl=600)
    url = f"ws://{relay.host}:{relay.port}"
    command = [NODE, str(JS / "refresh_peer.mjs"), url, room, short, fresh, "late"]
    async with await anyio.open_process(command, cwd=JS) as process:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)

        async def line() -> dict[str, Any]:
            with anyio.fail_after(30):
                return json.loads(await lines.receive_until(b"\n", 65536))

        try:
            assert await line() == {
                "answer": {"accepted": True, "exp": read_claims_unverified(fresh).exp}
            }
            # Past the first token's expiry (no event marks it), a new message still arrives.
            await anyio.sleep(max(0.0, read_claims_unverified(short).exp + 1.5 - time.time()))
            writer_url = relay.url(room, token(room, "writer", "writer"), ack=True)
            async with raw_client(writer_url) as writer:
                await writer.push(
                    lambda doc: writer.messages.append(message_map("late", "user", "writer", "x"))
                )
                assert await line() == {"got": "late"}
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
