"""The replica's own SQLite file: what goes in comes back after a restart, pending included."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pycrdt import Array, Doc, Map, Text

from crdtchat.local_store import (
    AppendLocal,
    AppendRemote,
    AsyncLocalStore,
    LocalStore,
    LocalStoreError,
    MarkDurable,
)
from tests.support import REPO


def _edits(count: int, *, text: str = "x") -> tuple[Doc, list[bytes]]:
    """A document and the update of each of its `count` transactions."""
    doc: Doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    messages = doc.get("canonical.messages", type=Array)
    for i in range(count):
        messages.append(Map({"id": f"m{i}", "content": Text(f"{text}{i}")}))
    return doc, updates


def _loaded(update: bytes) -> Doc:
    doc: Doc = Doc()
    doc.apply_update(update)
    return doc


def _contents(doc: Doc) -> list[str]:
    return [str(m["content"]) for m in doc.get("canonical.messages", type=Array)]


def test_empty_store_loads_nothing(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "r.db") as store:
        state = store.load()
    assert state.update == b""
    assert state.pending == ()
    assert state.next_local_id == 1


def test_local_and_remote_updates_survive_reopen_with_pending(tmp_path: Path) -> None:
    _, local_updates = _edits(3, text="mine")
    _, remote_updates = _edits(2, text="theirs")
    path = tmp_path / "r.db"
    with LocalStore(path) as store:
        store.write([AppendLocal(1, local_updates[0]), AppendRemote(remote_updates[0])])
        store.write([AppendLocal(2, local_updates[1]), AppendLocal(3, local_updates[2])])
        store.write([AppendRemote(remote_updates[1]), MarkDurable((1, 2))])
    with LocalStore(path) as store:
        state = store.load()
    assert state.pending == (3,)
    assert state.next_local_id == 4
    doc = _loaded(state.update)
    assert sorted(_contents(doc)) == ["mine0", "mine1", "mine2", "theirs0", "theirs1"]


def test_mark_durable_removes_exactly_those_ids_and_is_idempotent(tmp_path: Path) -> None:
    _, updates = _edits(5)
    with LocalStore(tmp_path / "r.db") as store:
        store.write([AppendLocal(i + 1, u) for i, u in enumerate(updates)])
        store.write([MarkDurable((1, 3)), MarkDurable((2, 3))])
        assert store.load().pending == (4, 5)
        store.write([MarkDurable((4, 5, 6))])
        assert store.load().pending == ()
        assert store.load().next_local_id == 6


def test_compaction_keeps_content_and_pending_and_drops_history(tmp_path: Path) -> None:
    doc, updates = _edits(30)
    messages = doc.get("canonical.messages", type=Array)
    deleted: list[bytes] = []
    subscription = doc.observe(lambda event: deleted.append(event.update))
    del messages[0:25]  # deleted content must not stay in the snapshot
    doc.unobserve(subscription)
    path = tmp_path / "r.db"
    with LocalStore(path, compact_every=10) as store:
        ops = [AppendLocal(i + 1, u) for i, u in enumerate([*updates, *deleted])]
        assert len(deleted) >= 1
        for start in range(0, len(ops), 4):
            store.write(ops[start : start + 4])
        assert store.log_rows < 10
        store.compact()
        assert store.log_rows == 1
        store.write([MarkDurable(tuple(range(1, 21)))])
    with LocalStore(path) as store:
        state = store.load()
    assert state.pending == tuple(range(21, len(ops) + 1))
    assert state.log_rows == 1
    assert _contents(_loaded(state.update)) == _contents(doc)
    history = b"".join(updates)
    assert len(state.update) < len(history) / 2


def test_a_failing_batch_leaves_nothing_behind(tmp_path: Path) -> None:
    _, updates = _edits(2)
    with LocalStore(tmp_path / "r.db") as store:
        store.write([AppendLocal(1, updates[0])])
        with pytest.raises(TypeError):
            store.write([AppendLocal(2, updates[1]), "not an op"])  # type: ignore[list-item]
        state = store.load()
    assert state.pending == (1,)
    assert state.log_rows == 1
    assert state.next_local_id == 2


def test_a_file_that_is_not_a_store_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are my notes, not a database" * 100)
    with pytest.raises(LocalStoreError, match="not a usable replica store"):
        LocalStore(path)
    assert path.read_bytes() == b"these are my notes, not a database" * 100


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    LocalStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    with pytest.raises(LocalStoreError, match="schema 99"):
        LocalStore(path)


def test_compact_every_must_be_sensible(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalStore(tmp_path / "r.db", compact_every=1)


def test_a_write_that_returned_survives_sigkill(tmp_path: Path) -> None:
    """The writer process dies right after a batch returned: the batch is in the file."""
    path = tmp_path / "r.db"
    script = textwrap.dedent(
        f"""
        import sys
        from pycrdt import Doc, Text
        from crdtchat.local_store import AppendLocal, LocalStore
        store = LocalStore({str(path)!r})
        doc = Doc()
        updates = []
        doc.observe(lambda e: updates.append(e.update))
        text = doc.get("t", type=Text)
        for i in range(50):
            text += f"{{i}},"
            store.write([AppendLocal(i + 1, updates[-1])])
        print("written", flush=True)
        sys.stdin.read()  # wait to be killed
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"written\n"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with LocalStore(path) as store:
        state = store.load()
    assert state.pending == tuple(range(1, 51))
    doc = _loaded(state.update)
    assert str(doc.get("t", type=Text)) == "".join(f"{i}," for i in range(50))


@pytest.mark.anyio
async def test_async_store_runs_off_the_loop_in_order(tmp_path: Path) -> None:
    _, updates = _edits(20)
    store = await AsyncLocalStore.open(tmp_path / "r.db", compact_every=7)
    try:
        for i, update in enumerate(updates):
            await store.write([AppendLocal(i + 1, update), MarkDurable((i,))])
        state = await store.load()
    finally:
        await store.close()
    assert state.pending == (20,)
    assert _contents(_loaded(state.update)) == [f"x{i}" for i in range(20)]
    assert state.log_rows < 7
