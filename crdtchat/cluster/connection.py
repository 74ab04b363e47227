"""Connecting a node to NATS and making sure the stream and buckets it needs exist.

`--nats` (or `CRDTCHAT_NATS_URL`) lists the servers, comma-separated; the client reconnects for
ever, across every listed server, and the connection state goes into `ClusterMetrics`.

Replicas: a stream created with `--nats-replicas N` has N; without it, 3, or fewer when the
cluster has fewer JetStream servers. JetStream says so when it is asked for more replicas than
it has servers (no suitable peers, insufficient resources, not clustered), so the node asks for
3, then 2, then 1, and logs what it got. A stream that exists already keeps its replicas (a
node never changes what another node created); the figure is logged either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from crdtchat.cluster.errors import ClusterError
from crdtchat.cluster.metrics import ClusterMetrics
from crdtchat.cluster.names import Names
from crdtchat.errors import ConfigError

log = logging.getLogger("crdtchat.cluster")

NATS_URL_ENV = "CRDTCHAT_NATS_URL"
DEFAULT_REPLICAS = 3
# JetStream's answers to "more replicas than servers": no suitable peers for placement,
# insufficient resources, replicas > 1 not supported in non-clustered mode.
_TOO_FEW_SERVERS = {10005, 10023, 10074}
_STREAM_NAME_IN_USE = 10058
# Retries of one publish are recognised for this long (Nats-Msg-Id); longer than any client's
# reconnect-and-resend.
DUPLICATE_WINDOW = 120.0
# Every node follows every room it has loaded with an ordered consumer of its own, so the
# stream's consumers are (nodes x rooms loaded on each). nats-server caps a stream that sets no
# limit at 1,000 consumers (its `default_max_consumers`, seen in /jsz): a cluster would stop
# opening rooms at 1,000 rooms loaded in all. The cap is set explicitly instead (measured in
# docs/cluster.md: about 40 KiB of NATS memory and a few ms to create per consumer).
MAX_CONSUMERS = 100_000


def parse_servers(value: str | None) -> list[str]:
    """`nats://h1:4222,nats://h2:4222` (or `CRDTCHAT_NATS_URL`) as a list; ConfigError if none."""
    text = value if value is not None else os.environ.get(NATS_URL_ENV, "")
    servers = [part.strip() for part in text.split(",") if part.strip()]
    if not servers:
        raise ConfigError(f"no NATS server: --nats URL[,URL...] or {NATS_URL_ENV}")
    for server in servers:
        if "://" not in server:
            raise ConfigError(f"a NATS server is a URL such as nats://host:4222, not {server!r}")
    return servers


@dataclass
class ClusterConnection:
    """One node's NATS connection, its JetStream context, names and figures."""

    nc: NATS
    names: Names
    replicas: int
    metrics: ClusterMetrics = field(default_factory=ClusterMetrics)
    # Called once when the connection is closed for good (not on a reconnect): followers wake
    # their readers, which nats-py's callback subscriptions would otherwise leave waiting.
    on_close: set[Callable[[], None]] = field(default_factory=set)

    @cached_property
    def js(self) -> JetStreamContext:
        """One JetStream context for the connection (it holds nothing but the client); made
        once, not per publish."""
        return self.nc.jetstream()

    @property
    def max_payload(self) -> int:
        """The largest message the servers take (their `max_payload`), bytes."""
        return self.nc.max_payload

    async def close(self) -> None:
        """Drain (let in-flight replies land) and close; while NATS is away there is nothing to
        drain, and nats-py refuses a drain while reconnecting, so close at once."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except (nats.errors.ConnectionReconnectingError, nats.errors.ConnectionClosedError):
            await self.nc.close()


async def connect(
    servers: list[str],
    *,
    names: Names | None = None,
    replicas: int | None = None,
    node_name: str | None = None,
    metrics: ClusterMetrics | None = None,
    connect_timeout: float = 5.0,
    **options: Any,
) -> ClusterConnection:
    """Connect (credentials and TLS go through `options`, as nats-py takes them) and set up."""
    names = names or Names()
    metrics = metrics or ClusterMetrics()

    async def disconnected() -> None:
        if nc.is_closed or nc.is_draining:  # our own close
            return
        metrics.connection_changed(False)
        log.warning("lost the connection to NATS")

    async def reconnected() -> None:
        metrics.connection_changed(True)
        log.info("connected to NATS again")

    async def error(exc: Exception) -> None:
        metrics.last_error = f"{type(exc).__name__}: {exc}"

    on_close: set[Callable[[], None]] = set()

    async def closed() -> None:
        for wake in list(on_close):
            wake()

    try:
        nc = await nats.connect(
            servers=servers,
            name=node_name,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            closed_cb=closed,
            **options,
        )
    except (OSError, nats.errors.Error) as exc:
        raise ClusterError(f"cannot connect to NATS at {','.join(servers)}: {exc}") from exc
    metrics.connection_changed(True)
    try:
        got = await ensure_stream(nc.jetstream(), names, replicas)
    except BaseException:
        await nc.close()
        raise
    return ClusterConnection(nc=nc, names=names, replicas=got, metrics=metrics, on_close=on_close)


async def ensure_stream(js: JetStreamContext, names: Names, replicas: int | None) -> int:
    """The room stream, created if missing; returns its replicas."""
    try:
        info = await js.stream_info(names.stream)
    except nats.js.errors.NotFoundError:
        pass
    else:
        got = info.config.num_replicas or 1
        log.info("stream %s exists with %d replicas", names.stream, got)
        return got
    for count in [replicas] if replicas else range(DEFAULT_REPLICAS, 0, -1):
        try:
            await js.add_stream(room_stream_config(names, count))
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STREAM_NAME_IN_USE:  # another node created it meanwhile
                return await ensure_stream(js, names, replicas)
            if exc.err_code in _TOO_FEW_SERVERS and not replicas:
                log.info(
                    "stream %s: %d replicas refused (%s)", names.stream, count, exc.description
                )
                continue
            raise ClusterError(f"cannot create stream {names.stream}: {exc.description}") from exc
        log.info("stream %s created with %d replicas", names.stream, count)
        return count
    raise ClusterError(f"cannot create stream {names.stream} with any number of replicas")


def room_stream_config(names: Names, replicas: int) -> StreamConfig:
    """Every room's log: one subject per room, file storage, roll-ups allowed (compaction)."""
    return StreamConfig(
        name=names.stream,
        description="crdtchat room logs: a snapshot (roll-up) and the updates after it",
        subjects=[names.room_subjects],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        allow_rollup_hdrs=True,
        deny_delete=True,
        duplicate_window=DUPLICATE_WINDOW,
        max_consumers=MAX_CONSUMERS,
    )
