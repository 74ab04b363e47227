"""Where a cluster keeps things in NATS: stream, bucket and subject names, and room tokens.

A room name (design §3: 1-128 of `A-Za-z0-9._-`) may hold ".", which separates subject tokens in
NATS, so a room becomes one subject token by escaping: "_" and "." are written as "_" plus two
hex digits ("_5f", "_2e"), everything else as itself. The mapping is one-to-one and keeps the
token within NATS's safe characters (letters, digits, "-" and "_"), so KV keys built from it are
valid too.

Everything lives under one `prefix` ("crdtchat" by default): two deployments, or two tests, on
one NATS account do not see each other's rooms when their prefixes differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from crdtchat.errors import ConfigError
from crdtchat.schema import ROOM_NAME

_ESCAPED = {"_": "_5f", ".": "_2e"}
_UNESCAPED = {value: key for key, value in _ESCAPED.items()}
_TOKEN = re.compile(r"\A(?:[A-Za-z0-9-]|_5f|_2e)+\Z")
_PREFIX = re.compile(r"\A[A-Za-z0-9-]{1,32}\Z")


def room_token(room: str) -> str:
    """The subject token for a room name the relay accepts."""
    if not ROOM_NAME.fullmatch(room):
        raise ValueError(f"not a room name: {room!r}")
    # "_" first: the escapes it writes hold no "."; one pass per character per publish was
    # a measurable part of a node's publish (docs/cluster.md, fan-out)
    return room.replace("_", _ESCAPED["_"]).replace(".", _ESCAPED["."])


def room_from_token(token: str) -> str:
    """The room name back from `room_token`; ValueError for anything it cannot have made."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not a room token: {token!r}")
    return re.sub(r"_5f|_2e", lambda match: _UNESCAPED[match.group()], token)


@dataclass(frozen=True)
class Names:
    """The names of one deployment's stream, buckets and subjects."""

    prefix: str = "crdtchat"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigError("a NATS prefix is 1-32 of A-Za-z0-9-")

    @property
    def _upper(self) -> str:
        return self.prefix.upper().replace("-", "_")

    @property
    def stream(self) -> str:
        """The stream holding every room's log."""
        return f"{self._upper}_ROOMS"

    @property
    def room_subjects(self) -> str:
        return f"{self.prefix}.room.*"

    def room_subject(self, room: str) -> str:
        return f"{self.prefix}.room.{room_token(room)}"

    @property
    def waiting_bucket(self) -> str:
        """The KV bucket of rooms with a message waiting for a reply (the worker feed)."""
        return f"{self._upper}_WAITING"

    @property
    def blob_bucket(self) -> str:
        return f"{self._upper}_BLOBS"

    @property
    def blob_marker_bucket(self) -> str:
        """KV: which rooms hold which blob (design §7.5: a hash alone does not open a blob)."""
        return f"{self._upper}_BLOB_ROOMS"

    def presence_subject(self, room: str) -> str:
        return f"{self.prefix}.presence.{room_token(room)}"

    @property
    def presence_subjects(self) -> str:
        return f"{self.prefix}.presence.*"

    @property
    def heartbeat_subject(self) -> str:
        return f"{self.prefix}.nodes.heartbeat"

    @property
    def quota_subject(self) -> str:
        """Where nodes tell each other what subjects spent (crdtchat/cluster/quotas.py)."""
        return f"{self.prefix}.nodes.quotas"
