"""A JSON value nested far too deep, arriving as a whole document (design §7.1).

Below ~100,000 levels yrs applies such a value but rendering it overflows the native stack;
past that `apply_update` itself does. Either way the process dies with SIGSEGV, so each case
runs in its own process and asserts that the process survives and names the problem. The
updates are written byte by byte: pycrdt may crash building the value itself.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from crdtchat.local_store import AppendRemote, LocalStore, UnsafeStoreError
from crdtchat.relay.store import _SCHEMA as STORE_SCHEMA
from crdtchat.relay.store import DB_NAME
from crdtchat.wire import write_var_string as string
from crdtchat.wire import write_var_uint as uint
from tests.support.relay import REPO, RelayProcess, raw_client, token

DEPTHS = [30_000, 150_000]  # rendering crashes / applying crashes
ANY = 8
CLIENT = 9
PROBLEM = "value nested deeper than 64"


def deep_update(depth: int) -> bytes:
    """One item in `canonical.settings` under key `deep`: an Any array nested `depth` deep."""
    value = b"\x75\x01" * depth + b"\x7f"  # array of one element … undefined
    item = bytes([ANY | 0x20]) + uint(1) + string("canonical.settings") + string("deep")
    item += uint(1) + value
    return uint(1) + uint(1) + uint(CLIENT) + uint(0) + item + b"\x00"


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def survived(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# Reading every part a reader renders: what crashed with SIGSEGV before the check.
READ = """
def read(doc):
    from crdtchat.document import Conversation
    conversation = Conversation(doc, author="me")
    print("READ", conversation.settings, conversation.problems())
"""

FROM_UPDATE = (
    READ
    + """
import sys
from pathlib import Path
from crdtchat.document import Conversation
from crdtchat.errors import ConversationError
try:
    conversation = Conversation.from_update(Path(sys.argv[1]).read_bytes(), author="me")
except ConversationError as error:
    print("REFUSED", error)
else:
    read(conversation.doc)
"""
)


@pytest.mark.parametrize("depth", DEPTHS)
def test_conversation_from_update_refuses_it(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "doc.bin"
    path.write_bytes(deep_update(depth))
    out = survived(run(FROM_UPDATE, str(path)))
    assert "REFUSED" in out and PROBLEM in out


SYNC_STEP_2 = (
    READ
    + """
import sys
from pathlib import Path
import anyio
import websockets
from crdtchat.replica import Replica
from crdtchat.wire import SyncStep1, SyncStep2, encode_frame

DATA = Path(sys.argv[1]).read_bytes()

async def fake_relay(ws):
    await ws.send(encode_frame([SyncStep1(b"\\x00"), SyncStep2(DATA)]))
    async for _ in ws:
        pass

async def main():
    async with websockets.serve(fake_relay, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with Replica(f"ws://127.0.0.1:{port}", "room", "tok") as replica:
            status = await replica.wait_until(
                lambda s: s.remote_error is not None or s.synced, timeout=60
            )
            read(replica.doc)
            print("STATUS", status.remote_error)

anyio.run(main)
"""
)


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_replica_refuses_it_in_a_sync_step_2(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "doc.bin"
    path.write_bytes(deep_update(depth))
    out = survived(run(SYNC_STEP_2, str(path)))
    assert "STATUS the relay sent an update pycrdt cannot apply" in out and PROBLEM in out
    assert "'deep'" not in out  # nothing of it was applied


LOCAL_STORE = (
    READ
    + """
import sys
import anyio
from crdtchat.local_store import UnsafeStoreError
from crdtchat.replica import Replica

async def main():
    try:
        async with Replica("ws://127.0.0.1:9", "room", "tok", store_path=sys.argv[1]) as replica:
            read(replica.doc)
    except UnsafeStoreError as error:
        print("REFUSED", error)

anyio.run(main)
"""
)


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_replica_refuses_a_local_store_holding_it(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "replica.sqlite3"
    with LocalStore(path) as store:  # a checked row, then one as an older version wrote it
        store.write([AppendRemote(b"\x00\x00")])
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT INTO updates (data) VALUES (?)", (deep_update(depth),))
    db.close()
    out = survived(run(LOCAL_STORE, str(path)))
    assert "REFUSED" in out and PROBLEM in out and "stored update 2" in out
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM updates").fetchone()[0] == 2  # left as it was
    db.close()


def store_room(data: Path, room: str, update: bytes) -> None:
    """A room as a relay from before the decoder's cap stored it."""
    db = sqlite3.connect(data / DB_NAME)
    db.executescript(STORE_SCHEMA)
    with db:
        db.execute("INSERT INTO snapshots (room, upto, data) VALUES (?, 0, ?)", (room, update))
    db.close()


@pytest.mark.parametrize("depth", DEPTHS)
def test_the_relay_does_not_load_a_stored_room_holding_it(tmp_path: Path, depth: int) -> None:
    data = tmp_path / "relay"
    data.mkdir()
    store_room(data, "deep", deep_update(depth))
    db = sqlite3.connect(data / DB_NAME)
    with db:  # checked up to seq 1; an older relay appended seq 2 since
        db.execute("INSERT INTO snapshots (room, upto, data) VALUES ('half', 1, x'0000')")
        db.execute("INSERT INTO checked (room, upto) VALUES ('half', 1)")
        db.execute(
            "INSERT INTO updates (room, seq, data) VALUES ('half', 2, ?)", (deep_update(depth),)
        )
    db.close()
    relay = RelayProcess(data).start()
    try:

        async def scenario() -> None:
            async with raw_client(relay.url("deep", token("deep")), hello=False) as client:
                code, reason = await client.wait_closed(timeout=60)
            assert code == 1011 and reason is not None and "cannot be loaded" in reason
            async with raw_client(relay.url("half", token("half")), hello=False) as client:
                code, reason = await client.wait_closed(timeout=60)
            assert code == 1011 and reason is not None and "update 2 cannot be loaded" in reason
            async with raw_client(relay.url("other", token("other"))) as client:
                assert client.synced  # another room loads and syncs as ever

        asyncio.run(scenario())
        assert relay.proc is not None and relay.proc.poll() is None, relay.log()
        assert PROBLEM in relay.log()
    finally:
        relay.stop()


# -- in process: values just past the cap are refused before anything applies them


def test_check_update_refuses_what_decode_update_refuses() -> None:
    from pycrdt import Doc, Map, Text

    from crdtchat.updates import UpdateFormatError, check_update, decode_update

    doc = Doc()
    with doc.transaction():
        doc["canonical.settings"] = settings = Map()
        settings["model"] = {"nested": [1, 2.5, "three", None, True, {"k": b"x"}]}
        doc["t"] = Text("héllo 😀")
    good = doc.get_update()
    check_update(good)
    for end in range(len(good)):  # every truncation, and trailing bytes
        for data in (good[:end], good + b"\x00"):
            try:
                decode_update(data)
            except UpdateFormatError:
                with pytest.raises(UpdateFormatError):
                    check_update(data)
            else:
                check_update(data)
    with pytest.raises(UpdateFormatError, match=PROBLEM):
        check_update(deep_update(65))
    check_update(deep_update(64))


def test_a_local_store_checks_only_what_no_checked_path_wrote(tmp_path: Path) -> None:
    path = tmp_path / "replica.sqlite3"
    with LocalStore(path) as store:
        store.write([AppendRemote(deep_update(10)), AppendRemote(b"\x00\x00")])
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'checked_through'").fetchone() == (2,)
    with db:  # a file as a version before the check wrote it: no mark, and a row past it
        db.execute("DELETE FROM meta WHERE key = 'checked_through'")
        db.execute("INSERT INTO updates (data) VALUES (?)", (deep_update(100),))
    with LocalStore(path) as store, pytest.raises(UnsafeStoreError, match="stored update 3"):
        store.load()
    assert db.execute("SELECT count(*) FROM updates").fetchone() == (3,)
    with db:
        db.execute("DELETE FROM updates WHERE id = 3")
    with LocalStore(path) as store:
        assert store.load().log_rows == 2  # checked now, and recorded
    assert db.execute("SELECT value FROM meta WHERE key = 'checked_through'").fetchone() == (2,)
    db.close()
