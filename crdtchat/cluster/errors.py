"""The cluster's exceptions, under `StorageError`: NATS is where a cluster node stores rooms."""

from __future__ import annotations

from crdtchat.errors import StorageError


class ClusterError(StorageError):
    """NATS could not do what was asked (unreachable, refused, too slow); nothing was promised."""


class SequenceConflict(ClusterError):
    """A conditional publish found the subject moved on: another node wrote first.

    Not a failure: the node catches up to `last_seq` (when JetStream said it) and judges again.
    """

    def __init__(self, room: str, expected: int, last_seq: int | None) -> None:
        super().__init__(f"room {room}: expected last sequence {expected}, stream has {last_seq}")
        self.room = room
        self.expected = expected
        self.last_seq = last_seq
