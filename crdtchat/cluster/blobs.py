"""Blobs in the JetStream object store, so any node serves any blob (design §7.5).

The same shape as crdtchat/relay/blobs.py's `BlobStore`: `begin(room, sha256)` gives an upload
that streams into a temporary file (under the node's `--data`, which holds only what may be
lost) while it is hashed and counted against `max_size`; `finish()` checks the hash and only
then puts the bytes in the object store under their SHA-256, unless they are there already.
Bytes are stored once whatever the number of rooms; a room may serve a blob only if someone who
may write the room uploaded it there, which a per-room marker records (a KV bucket, key
`<room token>.<sha256>`), so knowing a hash is not enough to read another room's file.
`open()` copies the object into a temporary file and returns it, as the local store returns its
file: the HTTP layer streams it and closes it, and nothing holds a whole blob in memory.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread
import nats.errors
import nats.js.errors
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.errors import ClusterError
from crdtchat.cluster.feed import open_bucket
from crdtchat.cluster.names import room_token
from crdtchat.relay.blobs import HashedUpload, check_name

_STREAM_NAME_IN_USE = 10058


class ClusterBlobStore:
    def __init__(
        self, objects: ObjectStore, markers: KeyValue, max_size: int, temp: Path | None = None
    ) -> None:
        self.objects = objects
        self.markers = markers
        self.max_size = max_size
        self.temp = temp
        # Transfers' disk work gets threads of its own, as in the local store (http.py uses it).
        self.threads = anyio.CapacityLimiter(8)

    @classmethod
    async def connect(
        cls, connection: ClusterConnection, max_size: int, temp: Path | None = None
    ) -> ClusterBlobStore:
        names = connection.names
        js = connection.js
        try:
            objects = await js.object_store(names.blob_bucket)
        except nats.js.errors.NotFoundError:
            config = ObjectStoreConfig(
                description="crdtchat blobs by SHA-256",
                replicas=connection.replicas,
                storage=StorageType.FILE,
            )
            try:
                objects = await js.create_object_store(names.blob_bucket, config=config)
            except nats.js.errors.APIError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise ClusterError(f"cannot create the blob store: {exc.description}") from exc
                objects = await js.object_store(names.blob_bucket)
        markers = await open_bucket(
            connection, names.blob_marker_bucket, "crdtchat: which rooms hold which blob"
        )
        if temp is not None:
            temp.mkdir(parents=True, exist_ok=True)
        return cls(objects, markers, max_size, temp)

    @staticmethod
    def marker_key(room: str, sha256: str) -> str:
        return f"{room_token(room)}.{check_name(sha256)}"

    async def begin(self, room: str, sha256: str) -> ClusterUpload:
        check_name(sha256)
        return ClusterUpload(self, room, sha256)

    async def has(self, room: str, sha256: str) -> bool:
        """Whether `room` may serve `sha256` (someone uploaded it to this room)."""
        try:
            await self.markers.get(self.marker_key(room, sha256))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return False
        except nats.errors.Error as exc:
            raise ClusterError(f"blobs: cannot read the marker of {sha256}: {exc}") from exc
        return True

    async def open(self, room: str, sha256: str) -> BinaryIO | None:
        """The bytes of `sha256` in a temporary file if `room` may serve them, else None."""
        if not await self.has(room, sha256):
            return None
        file = tempfile.TemporaryFile(dir=self.temp)  # noqa: SIM115 - the caller closes it
        try:
            await self.objects.get(sha256, writeinto=file)
        except nats.js.errors.NotFoundError:
            file.close()
            return None
        except BaseException as exc:
            file.close()
            if isinstance(exc, nats.errors.Error):
                raise ClusterError(f"blobs: cannot read {sha256}: {exc}") from exc
            raise
        file.seek(0)
        return file  # type: ignore[return-value]


class ClusterUpload(HashedUpload):
    """One upload in progress to the object store, through an anonymous temporary file."""

    def __init__(self, store: ClusterBlobStore, room: str, sha256: str) -> None:
        file = tempfile.TemporaryFile(dir=store.temp)  # noqa: SIM115  # closed by finish/discard
        super().__init__(room, sha256, store.max_size, file)  # type: ignore[arg-type]
        self.store = store

    async def write(self, chunks: Sequence[bytes]) -> None:
        await anyio.to_thread.run_sync(self._write, chunks)

    async def finish(self) -> None:
        """Verify the hash, store the bytes (once) and mark them as this room's."""
        self._check_hash()
        assert self._file is not None
        file, self._file = self._file, None
        store = self.store
        try:
            try:
                info = await store.objects.get_info(self.sha256)
                stored = not info.deleted and info.size == self.size
            except nats.js.errors.NotFoundError:
                stored = False
            if not stored:
                file.seek(0)
                await store.objects.put(self.sha256, file)
            await store.markers.put(store.marker_key(self.room, self.sha256), b"")
        except nats.errors.Error as exc:
            raise ClusterError(f"blobs: cannot store {self.sha256}: {exc}") from exc
        finally:
            file.close()

    def discard(self) -> None:
        """Drop the temporary file (an upload refused, cut or abandoned)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
