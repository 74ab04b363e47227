"""Blobs on a real relay subprocess: streamed to disk and from it, bounded, and scoped to rooms.

Design §7.5. Two relays: one whose stall timeout is long enough to hold stalled transfers open
while the test looks at them (memory, concurrency limits, a room served throughout), and one
whose stall timeout is short enough to watch a stalled upload being cut.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support.relay import RelayProcess, message_map, raw_client, running_relay, token

MIB = 1024 * 1024
STALLED = 8 * MIB  # body bytes each stalled transfer has sent (or was sent) before it stops
PER_SUBJECT = 2
TOTAL = 6


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """Stalled transfers stay open here for the whole test that makes them."""
    args = [
        "--max-blob",
        str(16 * MIB),
        "--blob-uploads-per-subject",
        str(PER_SUBJECT),
        "--blob-uploads-total",
        str(TOTAL),
        "--blob-downloads-per-subject",
        str(TOTAL),
        "--blob-downloads-total",
        str(TOTAL),
        "--blob-stall-timeout",
        "120",
    ]
    with running_relay(tmp_path_factory.mktemp("blobs") / "data", args) as process:
        yield process


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """Cuts a transfer after 2 s without a byte."""
    args = ["--max-blob", str(MIB), "--blob-stall-timeout", "2"]
    with running_relay(tmp_path_factory.mktemp("quick") / "data", args) as process:
        yield process


def blob_url(relay: RelayProcess, room: str, sha: str, tok: str | None = None) -> str:
    suffix = f"?token={tok}" if tok else ""
    return f"{relay.http_url}/blobs/{room}/{sha}{suffix}"


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temp_files(relay: RelayProcess) -> list[Path]:
    directory = relay.data / "blobs" / "tmp"
    return list(directory.iterdir()) if directory.exists() else []


def rss(relay: RelayProcess) -> int:
    assert relay.proc is not None
    for line in Path(f"/proc/{relay.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll a condition of the relay's files or memory, which signal nothing."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_response(sock: socket.socket) -> bytes:
    """Everything the relay sends until it closes the connection."""
    sock.settimeout(60)
    response = b""
    while chunk := sock.recv(65536):
        response += chunk
    return response


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def start_upload(
    relay: RelayProcess, room: str, tok: str, length: int, body: bytes
) -> socket.socket:
    """A PUT announcing `length` body bytes that sends only `body`, then stalls."""
    sock = socket.create_connection((relay.host, relay.port), timeout=60)
    head = (
        f"PUT /blobs/{room}/{'a' * 64}?token={tok} HTTP/1.1\r\n"
        f"Host: x\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


async def upload_and_reference(
    relay: RelayProcess, room: str, data: bytes, msg_id: str, *, sub: str = "alice"
) -> str:
    """Upload `data` to `room` and append a message there that references it."""
    sha = sha_of(data)
    put = httpx.put(
        blob_url(relay, room, sha, token(room, "writer", sub)), content=data, timeout=60
    )
    assert put.status_code == 201, put.text
    await reference(relay, room, sha, msg_id, sub=sub)
    return sha


async def reference(relay: RelayProcess, room: str, sha: str, msg_id: str, *, sub: str) -> None:
    async with raw_client(relay.url(room, token(room, "writer", sub), ack=True)) as client:
        message = message_map(msg_id, "user", sub, "see the file")

        def append(_doc: object) -> None:
            client.messages.append(message)
            message["files"] = [{"sha256": sha, "name": "f", "mime": "text/plain", "size": 1}]

        await client.push(append)
        await client.wait_acked()
        assert not client.denied, client.denied


async def room_still_serves(relay: RelayProcess, room: str, text: str) -> None:
    """A write in `room` is stored and reaches another peer."""
    async with (
        raw_client(relay.url(room, token(room, "writer", "zoe"), ack=True)) as writer,
        raw_client(relay.url(room, token(room, "reader", "yan"))) as reader,
    ):
        await writer.push(
            lambda _doc: writer.messages.append(message_map(text, "user", "zoe", text))
        )
        await writer.wait_acked(timeout=30)
        await reader.wait_for(lambda: text in reader.texts(), timeout=30)


# -- streaming and limits -------------------------------------------------------------------


@pytest.mark.anyio
async def test_stalled_transfers_hold_no_memory_and_transfers_are_bounded(
    relay: RelayProcess,
) -> None:
    big = os.urandom(STALLED)
    big_sha = await upload_and_reference(relay, "stream-1", big, "m-big")
    warm = httpx.get(blob_url(relay, "stream-1", big_sha, token("stream-1", "reader")), timeout=60)
    assert warm.content == big  # streamed out whole, and every code path has run once
    await room_still_serves(relay, "served-1", "before")
    before = rss(relay)
    with ExitStack() as stack:
        # Six uploads that stop after 8 MiB of a 9 MiB body: streamed to disk, not held.
        subjects = [f"s{i // PER_SUBJECT}" for i in range(TOTAL)]
        for sub in subjects:
            sock = start_upload(
                relay, "stream-1", token("stream-1", "writer", sub), STALLED + 1, big
            )
            stack.enter_context(sock)

        def received() -> bool:
            return sum(f.stat().st_size for f in temp_files(relay)) >= TOTAL * STALLED

        def grew() -> bool:
            return rss(relay) - before >= TOTAL * STALLED // 2

        wait_until(lambda: received() or grew(), "the stalled bodies to arrive")
        # Six downloads of the 8 MiB blob whose clients read nothing after the head.
        for _ in range(TOTAL):
            sock = socket.create_connection((relay.host, relay.port), timeout=60)
            stack.enter_context(sock)
            sock.sendall(
                f"GET /blobs/stream-1/{big_sha}?token={token('stream-1', 'reader')} HTTP/1.1\r\n"
                "Host: x\r\n\r\n".encode()
            )
            assert recv_exactly(sock, 12) == b"HTTP/1.1 200"
        await room_still_serves(relay, "served-1", "during")
        growth = rss(relay) - before
        sent = 2 * TOTAL * STALLED
        assert growth < sent // 2, f"relay grew {growth / MIB:.0f} MiB for {sent / MIB:.0f} MiB"
        assert len(temp_files(relay)) == TOTAL

        # Every slot is taken: one more from a subject with two uploads (429), or from anyone
        # else (503). Both are answered at once, before the body.
        refused = httpx.put(
            blob_url(relay, "stream-1", sha_of(b"x"), token("stream-1", "writer", "s0")),
            content=b"x",
            timeout=60,
        )
        assert refused.status_code == 429, refused.text
        assert "2 uploads of 's0' are in progress" in refused.text
        assert refused.headers["retry-after"] == "1"
        busy = httpx.put(
            blob_url(relay, "stream-1", sha_of(b"x"), token("stream-1", "writer", "newcomer")),
            content=b"x",
            timeout=60,
        )
        assert busy.status_code == 503, busy.text
        assert "receiving 6 uploads already" in busy.text
        # Downloads likewise: six of alice's are stalled.
        url = blob_url(relay, "stream-1", big_sha, token("stream-1", "reader", "alice"))
        refused = httpx.get(url, timeout=60)
        assert refused.status_code == 429, refused.text
        assert "6 downloads of 'alice' are in progress" in refused.text
        busy = httpx.get(blob_url(relay, "stream-1", big_sha, token("stream-1", "reader", "bob")))
        assert busy.status_code == 503, busy.text
        assert "sending 6 downloads already" in busy.text
    # The clients went away: every incomplete upload's temporary file is gone, the slots are
    # free again, and the room was served throughout.
    wait_until(lambda: not temp_files(relay), "the temporary files to be removed")
    again = httpx.put(
        blob_url(relay, "stream-1", sha_of(b"x"), token("stream-1", "writer", "s0")),
        content=b"x",
        timeout=60,
    )
    assert again.status_code == 201, again.text
    await room_still_serves(relay, "served-1", "after")
    assert not (relay.data / "blobs" / "aa" / ("a" * 64)).exists()


def test_a_stalled_upload_is_cut_and_leaves_no_file(quick: RelayProcess) -> None:
    tok = token("stall-1", "writer")
    with start_upload(quick, "stall-1", tok, 1000, b"x" * 500) as sock:
        wait_until(lambda: bool(temp_files(quick)), "the upload to start")
        response = read_response(sock)  # the relay answers and closes: no sleep here
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert b"no bytes for 2 s" in response
    assert not temp_files(quick)
    assert "HTTP request refused (408)" in quick.log()


def test_a_stalled_request_head_is_cut(quick: RelayProcess) -> None:
    with socket.create_connection((quick.host, quick.port), timeout=60) as sock:
        sock.sendall(b"PUT /blobs/")
        assert read_response(sock).startswith(b"HTTP/1.1 408")


# -- scoping to rooms -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_blobs_are_read_only_through_rooms_that_hold_them(quick: RelayProcess) -> None:
    secret = b"room A's file\n"
    sha = await upload_and_reference(quick, "room-a", secret, "a1")

    def get(room: str, role: str = "reader", sub: str = "bob", name: str = sha) -> httpx.Response:
        return httpx.get(blob_url(quick, room, name, token(room, role, sub)), timeout=60)

    assert get("room-a").content == secret
    assert get("room-a", "worker", "w").status_code == 200
    worker_everywhere = token("*", "worker", "w")
    assert httpx.get(blob_url(quick, "room-a", sha, worker_everywhere)).content == secret

    missing = get("room-b", name=sha_of(b"never uploaded"))
    assert missing.status_code == 404
    # A reader of room B: the same answer as for a blob that does not exist at all.
    not_yours = get("room-b")
    assert (not_yours.status_code, not_yours.text) == (missing.status_code, missing.text)
    # A token for room B does not open room A's URL (that says nothing about the blob).
    wrong_room = httpx.get(blob_url(quick, "room-a", sha, token("room-b", "reader")))
    assert wrong_room.status_code == 403
    assert "wrong room" in wrong_room.text

    # A writer of room B who knows the hash references it there: still not served, the bytes
    # were never uploaded to room B.
    await reference(quick, "room-b", sha, "b1", sub="mallory")
    referenced_only = get("room-b")
    assert (referenced_only.status_code, referenced_only.text) == (404, missing.text)
    # Whoever uploads the bytes to room B has them anyway; then room B serves them too. The
    # answer is the one a new blob gets, so an upload does not tell that another room has it.
    put = httpx.put(
        blob_url(quick, "room-b", sha, token("room-b", "writer", "mallory")), content=secret
    )
    assert (put.status_code, put.text) == (201, "stored\n")
    assert get("room-b").content == secret

    # Uploaded to room A but referenced by no message there: not served.
    loose = b"uploaded, never referenced"
    put = httpx.put(blob_url(quick, "room-a", sha_of(loose), token("room-a")), content=loose)
    assert (put.status_code, put.text) == (201, "stored\n")  # new bytes: the same answer
    unreferenced = get("room-a", name=sha_of(loose))
    missing_in_a = get("room-a", name=sha_of(b"never uploaded"))
    assert (unreferenced.status_code, unreferenced.text) == (404, missing_in_a.text)


def test_upload_refusals(quick: RelayProcess) -> None:
    data = b"file bytes"
    sha = sha_of(data)
    writer = token("r", "writer", "alice")
    cases = [
        (httpx.put(blob_url(quick, "r", sha), content=data), 401, "token is required"),
        (httpx.put(blob_url(quick, "r", sha, "v1.bad.token"), content=data), 401, "token refused"),
        (
            httpx.put(blob_url(quick, "r", sha, token("r", "reader", "bob")), content=data),
            403,
            "reader token may not upload",
        ),
        (
            httpx.put(blob_url(quick, "r", sha, token("other", "writer", "bob")), content=data),
            403,
            "wrong room",
        ),
        (httpx.put(blob_url(quick, "r", "0" * 64, writer), content=data), 400, "body hashes to"),
        (httpx.put(blob_url(quick, "r", "NOTHEX", writer), content=data), 400, "64 lowercase hex"),
        (httpx.put(blob_url(quick, "r%20x", sha, writer), content=data), 400, "a room name"),
        (
            httpx.put(blob_url(quick, "r", "0" * 64, writer), content=b"x" * (MIB + 1)),
            413,
            "larger than",
        ),
        (
            httpx.put(f"{quick.http_url}/blobs/{sha}?token={writer}", content=data),
            404,
            "blob URLs are /blobs/<room>/<sha256>",
        ),
        (httpx.get(f"{quick.http_url}/blobs/{sha}?token={writer}"), 404, "blob URLs are"),
        (httpx.get(blob_url(quick, "r", sha)), 401, "token is required"),
    ]
    for response, status, text in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert text in response.text
    assert not (quick.data / "blobs" / "00" / ("0" * 64)).exists()
    assert not temp_files(quick)


def test_chunked_upload_is_refused(quick: RelayProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"abc"

    response = httpx.put(blob_url(quick, "r", "2" * 64, token("r")), content=chunks())
    assert response.status_code == 411


def test_expect_continue_upload(quick: RelayProcess) -> None:
    data = b"continue me"
    request = (
        f"PUT /blobs/r/{sha_of(data)}?token={token('r', 'worker', 'w')} HTTP/1.1\r\n"
        f"Host: x\r\nContent-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection((quick.host, quick.port), timeout=60) as sock:
        sock.sendall(request)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(data)
        assert read_response(sock).startswith(b"HTTP/1.1 201")
    assert (quick.data / "blobs" / sha_of(data)[:2] / sha_of(data)).read_bytes() == data


@pytest.mark.anyio
async def test_blobs_stored_before_rooms_stay_readable_where_referenced(tmp_path: Path) -> None:
    """A data directory from before blobs were scoped: nothing stored is lost."""
    old = b"uploaded by an older relay\n"
    sha = sha_of(old)
    blobs = tmp_path / "data" / "blobs"
    (blobs / sha[:2]).mkdir(parents=True)
    (blobs / sha[:2] / sha).write_bytes(old)
    (blobs / "tmp").mkdir()
    (blobs / "tmp" / "killed-mid-upload").write_bytes(b"partial")  # as after a SIGKILL
    with running_relay(tmp_path / "data") as relay:
        assert not temp_files(relay)
        await reference(relay, "had-it", sha, "m1", sub="alice")
        got = httpx.get(blob_url(relay, "had-it", sha, token("had-it", "reader")), timeout=60)
        assert got.content == old
        elsewhere = httpx.get(blob_url(relay, "never", sha, token("never", "reader")), timeout=60)
        assert elsewhere.status_code == 404


def test_shutdown_cuts_a_stalled_upload(tmp_path: Path) -> None:
    """SIGTERM does not wait for a client that stopped sending (the stall timeout is 120 s)."""
    with running_relay(tmp_path / "data", ["--blob-stall-timeout", "120"]) as relay:
        with start_upload(relay, "bye", token("bye"), 2000, b"x" * 1000):
            wait_until(lambda: bool(temp_files(relay)), "the upload to start")
            assert relay.terminate(timeout=30) == 0
        assert not temp_files(relay)
