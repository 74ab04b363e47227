"""Uploading an attachment's bytes to the relay's blob store; the document keeps only a FileRef.

The bytes are addressed by their SHA-256, so an upload is idempotent and the reference in a
message can be checked by anyone who downloads the bytes. Blobs are scoped to rooms (design
§7.5): the bytes go to `/blobs/<room>/<sha256>` with the token that opens the room, and are
served to readers of that room once a message there references them.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx

from crdtchat import membership
from crdtchat.errors import StorageError
from crdtchat.relays import RelaySource, current_relay
from crdtchat.schema import FileRef

MAX_ATTACHMENT = 32 * 1024 * 1024


class AttachmentError(StorageError, RuntimeError):
    """The file could not be read or the relay did not store it; the text says which.
    Not `crdtchat.relay.blobs.HttpRefusal`, the relay's refusal of an upload."""


def http_base(relay_url: str) -> str:
    """`ws://host:port/...` → `http://host:port` (wss → https), as membership reads it, but a
    bad URL is an AttachmentError: the attachment code reports a storage problem, not a
    command's."""
    try:
        return membership.http_base(relay_url)
    except ValueError:
        raise AttachmentError(f"not a relay URL: {relay_url!r}") from None


def blob_url(relay_url: str, room: str, sha256: str) -> str:
    """Where the relay at `relay_url` keeps `sha256` for `room` (GET and PUT)."""
    return f"{http_base(relay_url)}/blobs/{quote(room, safe='')}/{sha256}"


class BlobUploader:
    """PUT /blobs/<room>/<sha256> on the relay, with the token that also opens the room.

    `relay` may be a function naming the replica's current relay: the bytes then go where the
    message that references them is stored."""

    def __init__(self, relay: RelaySource, room: str, token: str, *, timeout: float = 60.0) -> None:
        http_base(current_relay(relay))  # a bad URL fails here, not at the first attachment
        self.relay = relay
        self.room = room
        self.token = token
        self.timeout = timeout

    async def upload(self, path: Path) -> FileRef:
        data = await anyio.to_thread.run_sync(_read, path)
        digest = hashlib.sha256(data).hexdigest()
        url = blob_url(current_relay(self.relay), self.room, digest)
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.put(
                    url,
                    content=data,
                    headers={"Authorization": f"Bearer {self.token}"},
                )
        except httpx.HTTPError as error:
            raise AttachmentError(f"upload of {path.name} failed: {error}") from error
        if response.status_code not in (200, 201, 204):
            reason = response.text.strip().splitlines()[0] if response.text.strip() else ""
            raise AttachmentError(
                f"relay refused {path.name}: HTTP {response.status_code} {reason}".rstrip()
            )
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileRef(sha256=digest, name=path.name, mime=mime, size=len(data))


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_ATTACHMENT:
            raise AttachmentError(f"{path} is {size} bytes; the limit is {MAX_ATTACHMENT}")
        return path.read_bytes()
    except OSError as error:
        raise AttachmentError(f"cannot read {path}: {error.strerror or error}") from error
