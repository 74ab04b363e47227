"""Rooms waiting for a reply, in a JetStream KV bucket, so `/feed/waiting` on any node sees all.

One key per room (its subject token, crdtchat/cluster/names.py), value `"<seq> <0|1>"`: whether
the room has a message waiting for a reply (design §2, §5) as of the room's stream sequence
`seq`. Two nodes may write the same room's key at once, each from the update it published; the
write that names the later sequence must win, whatever the order the writes land in, so a write
is a compare-and-set on the key's revision and a write about an older sequence is dropped. A key
whose room stops waiting stays with flag 0 (a few bytes a room; deleting would lose the
sequence that orders the writes).

`watch()` gives every key's current value first, then each change, which is what the feed
sends: at once every waiting room, then every room that starts waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.errors import ClusterError
from crdtchat.cluster.names import room_from_token, room_token
from crdtchat.cluster.roomlog import retry_transient

_STREAM_NAME_IN_USE = 10058


@dataclass(frozen=True)
class FeedChange:
    room: str
    waiting: bool
    seq: int


def _decode(value: bytes | None) -> tuple[int, bool]:
    seq, flag = (value or b"0 0").split(b" ", 1)
    return int(seq), flag == b"1"


async def open_bucket(connection: ClusterConnection, bucket: str, description: str) -> KeyValue:
    """A KV bucket with the stream's replicas, created when missing (by any node first)."""
    js = connection.js
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = KeyValueConfig(
        bucket=bucket,
        description=description,
        history=1,
        replicas=connection.replicas,
        storage=StorageType.FILE,
    )
    try:
        return await js.create_key_value(config)
    except nats.js.errors.APIError as exc:
        if exc.err_code == _STREAM_NAME_IN_USE:  # another node created it meanwhile
            return await js.key_value(bucket)
        raise ClusterError(f"cannot create KV bucket {bucket}: {exc.description}") from exc


class WaitingFeed:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def connect(cls, connection: ClusterConnection) -> WaitingFeed:
        bucket = connection.names.waiting_bucket
        return cls(await open_bucket(connection, bucket, "crdtchat rooms waiting for a reply"))

    async def set_waiting(self, room: str, waiting: bool, *, seq: int) -> bool:
        """Record the room's state as of stream sequence `seq`; False if a later one is there."""
        key = room_token(room)
        value = f"{seq} {int(waiting)}".encode()
        for _ in range(100):  # each retry means another node wrote this key in between
            try:
                entry = await self.kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                try:
                    await self.kv.create(key, value)
                    return True
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            except nats.errors.Error as exc:
                raise ClusterError(f"feed: cannot read {room}: {exc}") from exc
            if _decode(entry.value)[0] >= seq:
                return False
            try:
                await self.kv.update(key, value, last=entry.revision)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except nats.errors.Error as exc:
                raise ClusterError(f"feed: cannot write {room}: {exc}") from exc
        raise ClusterError(f"feed: {room} kept changing under 100 writes")

    async def waiting_rooms(self) -> set[str]:
        """Every room waiting now, anywhere in the cluster."""
        rooms: set[str] = set()
        async for change in self.watch(initial_only=True):
            if change.waiting:
                rooms.add(change.room)
        return rooms

    async def watch(self, *, initial_only: bool = False) -> AsyncIterator[FeedChange]:
        """Every room's state now, then (unless `initial_only`) each change as it is written."""
        watcher = await retry_transient(self.kv.watchall, "feed: cannot watch the bucket")
        try:
            async for entry in watcher:
                if entry is None:  # the end of the current values
                    if initial_only:
                        return
                    continue
                if entry.operation is not None:  # deleted or purged by hand: not waiting
                    seq, waiting = 0, False
                else:
                    seq, waiting = _decode(entry.value)
                yield FeedChange(room=room_from_token(entry.key), waiting=waiting, seq=seq)
        finally:
            await watcher.stop()
