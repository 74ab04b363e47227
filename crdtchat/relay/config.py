"""Relay settings, with the defaults `crdtchat serve` uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crdtchat.relay.ratelimit import SubjectQuotas
from crdtchat.structure import ShapeLimits
from crdtchat.tokens import Issuer

MIB = 1024 * 1024


@dataclass(frozen=True)
class RelayConfig:
    secret: str
    issuers: tuple[Issuer, ...] = ()  # identity providers trusted besides the secret (§4)
    host: str = "127.0.0.1"
    port: int = 8765
    data: Path = Path("./crdtchat-data")
    max_frame: int = 8 * MIB  # websockets max_size: larger frames close the connection (1009)
    rate_messages: float = 500.0  # per connection: sustained wire messages per second ...
    rate_burst: float = 5000.0  # ... and how many may come at once
    rate_bytes: float = 64 * MIB  # per connection: sustained bytes per second (burst: 2 frames)
    idle_unload: float = 60.0  # seconds a room without connections stays in memory
    max_rooms: int = 10_000  # rooms loaded at once; then idle ones are unloaded early (§7.6)
    trim_interval: float = 60.0  # give freed memory back after a room unload, at most this often
    compact_updates: int = 1000  # compact a room's log after this many updates ...
    compact_min_bytes: int = 256 * 1024  # ... or this many bytes, or its snapshot's size
    max_blob: int = 64 * MIB
    blob_uploads_per_subject: int = 4  # uploads in progress at once per token subject (429)
    blob_uploads_total: int = 32  # ... and in all (503)
    blob_downloads_per_subject: int = 8  # downloads in progress at once per token subject (429)
    blob_downloads_total: int = 64  # ... and in all (503)
    blob_stall_timeout: float = 30.0  # a blob transfer with no byte moving this long is cut
    max_in_flight: int = 1024  # updates of one connection waiting for their commit
    # Under load (the last commit held several writes) the store waits this long for more
    # writes before committing: fewer commits, each an fsync (crdtchat.relay.store).
    store_commit_delay: float = 0.002
    max_write_buffer: int = 64 * MIB  # a connection that lags this far behind is closed
    ping_interval: float = 30.0
    # Connections the kernel queues before the relay accepts them. asyncio's default of 100
    # overflows when a worker opens hundreds of rooms at once: the excess SYNs are dropped
    # and retried a second later (issue 16). The kernel caps it at net.core.somaxconn.
    listen_backlog: int = 4096
    open_timeout: float = 60.0  # a websocket handshake (blob transfers: blob_stall_timeout)
    # The shape of stored values (design §7.1); 0 turns a bound off.
    max_depth: int = 32  # shared types nested below a root (a message's content Text is 2)
    max_entries: int = 10_000  # entries ever written into one nested Map or Array
    max_value_bytes: int = 1 * MIB  # the encoded size of one item's content
    # Awareness, per connection (design §7.3).
    awareness_clients: int = 8  # client ids one connection may hold at once
    awareness_state_bytes: int = 16 * 1024  # largest awareness state (JSON), bytes
    awareness_depth: int = 32  # deepest nesting of an awareness state's JSON
    awareness_rate: float = 20.0  # awareness messages per second, sustained ...
    awareness_burst: float = 100.0  # ... and at once
    # Per subject, across all of its connections (design §7.4).
    subject_connections: int = 128  # open connections at once
    refusal_rate: float = 1.0  # refused writes per second, sustained ...
    refusal_burst: float = 30.0  # ... and at once
    quota_rooms: float = 100.0  # rooms created per quota_interval
    quota_bytes: float = 128 * MIB  # bytes of accepted updates per quota_interval
    quota_interval: float = 3600.0  # seconds over which the two quotas above refill
    max_document: int = 64 * MIB  # a room's document (snapshot + log) may not grow past this
    tls_cert: str | None = None  # PEM files: with both, the relay serves wss:// and https://
    tls_key: str | None = None
    # Cluster mode (docs/cluster.md): rooms, feed and blobs in NATS JetStream at these servers
    # (comma-separated; also CRDTCHAT_NATS_URL), the stream's replicas when this node creates it.
    nats: str | None = None
    nats_replicas: int | None = None

    def subject_quotas(self) -> SubjectQuotas:
        return SubjectQuotas(
            connections=self.subject_connections,
            refusal_rate=self.refusal_rate,
            refusal_burst=self.refusal_burst,
            rooms=self.quota_rooms,
            write_bytes=self.quota_bytes,
            interval=self.quota_interval,
        )

    @property
    def shape_limits(self) -> ShapeLimits:
        return ShapeLimits(
            self.max_depth or None, self.max_entries or None, self.max_value_bytes or None
        )
