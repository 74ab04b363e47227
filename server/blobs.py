"""Content-addressed file bytes for file references (`files: [{sha256, ...}]`).

A blob is stored under its SHA-256 after the upload is hashed and found equal to the name it
was sent under, written to a temporary file, fsynced and renamed into place: a blob on disk is
always complete and always matches its name. Disk work runs in worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

import anyio.to_thread

from crdtchat.errors import StorageError

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class BlobError(StorageError, ValueError):
    """An upload that must not be stored; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BlobStore:
    def __init__(self, directory: Path, max_size: int) -> None:
        self.directory = Path(directory)
        self.max_size = max_size

    def path_for(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise BlobError(400, "a blob name is 64 lowercase hex digits (its SHA-256)")
        return self.directory / sha256[:2] / sha256

    async def get(self, sha256: str) -> bytes | None:
        path = self.path_for(sha256)
        return await anyio.to_thread.run_sync(_read_or_none, path)

    async def put(self, sha256: str, data: bytes) -> bool:
        """Store `data` as `sha256`; True if it was new. Raises BlobError on a bad upload."""
        path = self.path_for(sha256)
        if len(data) > self.max_size:
            raise BlobError(413, f"blob larger than {self.max_size} bytes")
        return await anyio.to_thread.run_sync(_verify_and_write, path, sha256, data)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _verify_and_write(path: Path, sha256: str, data: bytes) -> bool:
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise BlobError(400, f"body hashes to {actual}, not {sha256}")
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True
