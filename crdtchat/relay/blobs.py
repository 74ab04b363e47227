"""Content-addressed file bytes for file references (`files: [{sha256, ...}]`), per room.

Layout under the blob directory (design §7.5):

- `<aa>/<sha256>`: the bytes, stored once whatever the number of rooms that hold them. A file
  there is always complete and always hashes to its name: an upload is streamed to `tmp/`,
  hashed while it is written, fsynced and renamed into place only if the hash matches.
- `rooms/=<room>/<sha256>`: empty markers, "someone who may write <room> uploaded these bytes to
  it". A room may serve a blob only if it has the marker, so knowing a hash is not enough to
  read a file of another room by referencing it.
- `legacy/<sha256>`: markers for blobs stored before blobs were scoped to rooms (written once,
  when `rooms/` does not exist yet); any room that references them may serve them.
- `tmp/`: uploads in progress. What is left there after a crash is incomplete and is removed
  when the relay starts.

Disk work runs in worker threads; nothing holds a whole blob in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread

from crdtchat.errors import StorageError

# fullmatch, and \Z rather than "$", which matches before a final newline too.
SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")


class HttpRefusal(StorageError, ValueError):
    """A plain-HTTP request the relay refuses (a blob, a membership change, a room), answered
    with `status` and `reason`. Here rather than in http.py because the blob store, which
    http.py imports, refuses uploads with it too."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


def check_name(sha256: str) -> str:
    if not SHA256_HEX.fullmatch(sha256):
        raise HttpRefusal(400, "a blob name is 64 lowercase hex digits (its SHA-256)")
    return sha256


class BlobStore:
    def __init__(self, directory: Path, max_size: int) -> None:
        self.directory = Path(directory)
        self.max_size = max_size
        self.temp = self.directory / "tmp"
        self.rooms = self.directory / "rooms"
        self.legacy = self.directory / "legacy"
        # Blob disk work gets threads of its own: many transfers must not make a room that is
        # loading wait for anyio's shared pool.
        self.threads = anyio.CapacityLimiter(8)

    def path_for(self, sha256: str) -> Path:
        check_name(sha256)
        return self.directory / sha256[:2] / sha256

    def marker_for(self, room: str, sha256: str) -> Path:
        # "=" keeps room names such as ".." from being read as paths.
        return self.rooms / f"={room}" / check_name(sha256)

    def prepare(self) -> None:
        """At start-up: drop incomplete uploads, mark blobs stored before rooms were scoped."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.temp.exists():
            for leftover in self.temp.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        self.temp.mkdir(exist_ok=True)
        if self.rooms.exists():
            return
        self.legacy.mkdir(exist_ok=True)
        for shard in self.directory.iterdir():
            if len(shard.name) == 2 and shard.is_dir():
                for blob in shard.iterdir():
                    if SHA256_HEX.fullmatch(blob.name):
                        (self.legacy / blob.name).touch()
        _fsync_directory(self.legacy)
        self.rooms.mkdir()
        _fsync_directory(self.directory)

    async def begin(self, room: str, sha256: str) -> Upload:
        """A new upload of `sha256` to `room`, streaming into a temporary file."""
        self.path_for(sha256)
        return await anyio.to_thread.run_sync(Upload, self, room, sha256, limiter=self.threads)

    async def open(self, room: str, sha256: str) -> BinaryIO | None:
        """The bytes of `sha256` if `room` may serve them (uploaded to it, or legacy), else None."""
        return await anyio.to_thread.run_sync(self._open, room, sha256, limiter=self.threads)

    def _open(self, room: str, sha256: str) -> BinaryIO | None:
        if not (self.marker_for(room, sha256).exists() or (self.legacy / sha256).exists()):
            return None
        try:  # the caller streams the file and closes it
            return open(self.path_for(sha256), "rb")
        except FileNotFoundError:
            return None


class HashedUpload:
    """What every blob upload (this store's, the cluster's) does with the bytes as they come:
    count them against `max_size`, hash them and write them to a temporary `file`; where they
    go once they match `sha256` is the store's own."""

    def __init__(self, room: str, sha256: str, max_size: int, file: BinaryIO) -> None:
        self.room = room
        self.sha256 = sha256
        self.max_size = max_size
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = file  # closed by finish() or discard(), whichever ends it

    def _write(self, chunks: Sequence[bytes]) -> None:
        assert self._file is not None
        for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.max_size:
                raise HttpRefusal(413, f"blob larger than {self.max_size} bytes")
            self._hash.update(chunk)
            self._file.write(chunk)

    def _check_hash(self) -> None:
        assert self._file is not None
        actual = self._hash.hexdigest()
        if actual != self.sha256:
            raise HttpRefusal(400, f"body hashes to {actual}, not {self.sha256}")


class Upload(HashedUpload):
    """One upload in progress to the blob directory, through a file in `tmp/`."""

    def __init__(self, store: BlobStore, room: str, sha256: str) -> None:
        fd, name = tempfile.mkstemp(dir=store.temp, prefix=f"{sha256[:16]}-")
        super().__init__(room, sha256, store.max_size, os.fdopen(fd, "wb"))
        self.store = store
        self.temp_path = Path(name)

    async def write(self, chunks: Sequence[bytes]) -> None:
        await anyio.to_thread.run_sync(self._write, chunks, limiter=self.store.threads)

    async def finish(self) -> None:
        """Verify the hash and move the bytes into place; HttpRefusal if they are not `sha256`."""
        await anyio.to_thread.run_sync(self._finish, limiter=self.store.threads)

    def _finish(self) -> None:
        self._check_hash()
        assert self._file is not None
        path = self.store.path_for(self.sha256)
        file, self._file = self._file, None
        with file:
            file.flush()
            os.fsync(file.fileno())
        # Replaced even when the same bytes are there already (from this room or another): the
        # same work either way, so the time an upload takes does not tell that either.
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, path)
        _fsync_directory(path.parent)
        marker = self.store.marker_for(self.room, self.sha256)
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            _fsync_directory(marker.parent)

    def discard(self) -> None:
        """Drop the temporary file (an upload refused, cut or abandoned)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()


def _fsync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
