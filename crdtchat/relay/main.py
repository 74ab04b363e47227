"""`crdtchat serve`: run the relay until SIGTERM or SIGINT, then shut down gracefully.

Shutdown order matters for "everything accepted is on disk": stop accepting and close every
connection (what a connection had accepted is queued to the store already, and is broadcast
once stored even after its sender left), then let every room flush and compact, then close the
store, whose thread commits whatever is still queued.

Options beyond design §6 (`--rate`, `--idle-unload`, ...) are read with defaults when the
`crdtchat` parser does not define them; `python -m crdtchat.relay.main` accepts all of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
from websockets.asyncio.server import serve

from crdtchat.relay.blobs import BlobStore
from crdtchat.relay.config import RelayConfig
from crdtchat.relay.connections import Relay
from crdtchat.relay.feed import WaitingFeed
from crdtchat.relay.heap import HeapTrimmer
from crdtchat.relay.http import HttpEndpoints, HttpLimits, connection_class
from crdtchat.relay.keepalive import keep_alive
from crdtchat.relay.metrics import Metrics
from crdtchat.relay.options import EXTRA_OPTIONS, add_extra_options
from crdtchat.relay.ratelimit import Subjects
from crdtchat.relay.room import RoomManager
from crdtchat.relay.store import Store, StoreError
from crdtchat.relay.webapp import WebApp
from crdtchat.tokens import SECRET_VARIABLE, TokenVerifier, load_trust_file

log = logging.getLogger("crdtchat.relay")
# The store thread needs the GIL several times per commit (sqlite3 releases it around each
# statement); with the default 5 ms switch interval a busy event loop made it wait that long
# each time, and every broadcast waits for a commit. See docs/performance.md "Relay".
SWITCH_INTERVAL = 0.0005


def config_from_args(args: argparse.Namespace, secret: str) -> RelayConfig:
    """The relay's settings; ValueError names what is wrong (e.g. in the trust file)."""
    trust = getattr(args, "trust", None)
    values: dict[str, object] = {
        "issuers": tuple(load_trust_file(trust)) if trust else (),
        "secret": secret,
        "host": args.host,
        "port": args.port,
        "data": Path(args.data),
        "max_frame": args.max_frame,
    }
    for dest, (field, _, _) in EXTRA_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None:
            values[field] = value
    known = {f.name for f in fields(RelayConfig)}
    return RelayConfig(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]


async def run_relay(
    config: RelayConfig,
    stop: anyio.Event,
    on_listening: Callable[[str, int, str], None] | None = None,
) -> None:
    """Serve until `stop` is set, then shut down in order."""
    nats = config.nats or os.environ.get("CRDTCHAT_NATS_URL")
    if nats:
        await _run_cluster_node(config, nats, stop, on_listening)
        return
    metrics = Metrics()
    blobs = BlobStore(config.data / "blobs", config.max_blob)
    await anyio.to_thread.run_sync(blobs.prepare)
    async with (
        Store(
            config.data, on_commit=metrics.store_committed, commit_delay=config.store_commit_delay
        ) as store,
        anyio.create_task_group() as tg,
    ):
        feed = WaitingFeed(store)
        rooms = RoomManager(store, metrics, config, feed)
        rooms.after_unload = HeapTrimmer(config.trim_interval).room_unloaded
        await tg.start(rooms.run)
        # /healthz answers 503 while the store cannot write (store.health says why)
        await _serve(config, stop, on_listening, tg, rooms, blobs, metrics, feed, store.health)


async def _run_cluster_node(
    config: RelayConfig,
    nats: str,
    stop: anyio.Event,
    on_listening: Callable[[str, int, str], None] | None,
) -> None:
    """Cluster mode (docs/cluster.md): rooms, feed and blobs in NATS JetStream; `--data` holds
    only temporary files."""
    from crdtchat.cluster.connection import parse_servers
    from crdtchat.cluster.names import Names
    from crdtchat.cluster.node import ClusterNode
    from crdtchat.cluster.quotas import QuotaExchange
    from crdtchat.cluster.relaynode import (
        ClusterRelayMetrics,
        ClusterRoomShell,
        ClusterStore,
        relay_feed_from_kv,
        relay_presence,
    )

    metrics = ClusterRelayMetrics()
    node = await ClusterNode.start(
        parse_servers(nats),
        data=config.data,
        max_blob_size=config.max_blob,
        replicas=config.nats_replicas,
        # Deployments (or tests) sharing one NATS account keep apart by prefix.
        names=Names(os.environ.get("CRDTCHAT_NATS_PREFIX", "crdtchat")),
    )
    metrics.cluster = node.metrics
    # Quotas per subject count every node's spending (design §7.4, docs/cluster.md).
    subjects = Subjects(config.subject_quotas(), shared=True)
    quotas = QuotaExchange(node.connection, node.node_id, subjects, node.presence)
    try:
        await quotas.start()
    except BaseException:
        await node.stop()
        raise
    store: Any = ClusterStore(node)  # the Store interface, on JetStream
    feed = WaitingFeed(store)
    rooms = RoomManager(store, metrics, config, feed, room_class=ClusterRoomShell)
    watching = anyio.CancelScope()

    async def watch_feed_and_presence() -> None:
        with watching:
            async with anyio.create_task_group() as inner:
                inner.start_soon(relay_feed_from_kv, node, feed)
                inner.start_soon(relay_presence, node, rooms)

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(rooms.run)
            tg.start_soon(watch_feed_and_presence)
            blobs: Any = node.blobs  # BlobStore's interface, in the object store
            # /healthz answers 503 while NATS is away (writes are not acknowledged then)
            await _serve(
                config,
                stop,
                on_listening,
                tg,
                rooms,
                blobs,
                metrics,
                feed,
                store.health,
                subjects,
            )
            watching.cancel()
    finally:
        await quotas.close()
        await node.stop()


async def _serve(
    config: RelayConfig,
    stop: anyio.Event,
    on_listening: Callable[[str, int, str], None] | None,
    tg: anyio.abc.TaskGroup,
    rooms: RoomManager,
    blobs: BlobStore,
    metrics: Metrics,
    feed: WaitingFeed,
    health: Callable[[], str | None],
    subjects: Subjects | None = None,
) -> None:
    """Accept connections until `stop`, then close them; the rooms flush after `rooms.close`.
    `subjects`: the per-subject quotas (a cluster node's are shared with the other nodes)."""
    limits = HttpLimits(
        uploads_per_subject=config.blob_uploads_per_subject,
        uploads_total=config.blob_uploads_total,
        downloads_per_subject=config.blob_downloads_per_subject,
        downloads_total=config.blob_downloads_total,
        stall_timeout=config.blob_stall_timeout,
        open_timeout=config.open_timeout,
    )
    verifier = TokenVerifier(config.secret, config.issuers)
    endpoints = HttpEndpoints(verifier, blobs, metrics, rooms, limits, health)
    tls = tls_context(config)
    web = WebApp(verifier, secure=tls is not None)
    relay = Relay(config, rooms, endpoints, metrics, feed, verifier, web, subjects)
    try:
        async with serve(
            relay.handle,
            config.host,
            config.port,
            process_request=relay.process_request,
            create_connection=connection_class(endpoints),
            max_size=config.max_frame,
            backlog=config.listen_backlog,
            ping_interval=None,  # one keepalive loop for all (crdtchat/relay/keepalive.py)
            ping_timeout=None,
            open_timeout=None,  # RelayConnection applies it to websocket handshakes only
            compression=None,
            server_header="crdtchat-relay",
            ssl=tls,
        ) as server:
            host, port = server.sockets[0].getsockname()[:2]
            if on_listening is not None:
                on_listening(host, port, "wss" if tls is not None else "ws")
            tg.start_soon(keep_alive, server, config.ping_interval, stop)
            await stop.wait()
            log.info("shutting down")
            endpoints.close()
            server.close(code=1001, reason="relay shutting down")
    finally:
        rooms.close()


def tls_context(config: RelayConfig) -> ssl.SSLContext | None:
    """The server's TLS context when `--tls-cert` and `--tls-key` are given, else None.

    A phone on the network must not send its token in clear, and a service worker (the web
    client's offline shell) needs HTTPS anywhere but on localhost.
    """
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot load --tls-cert/--tls-key: {error}") from None
    return context


def serve_command(args: argparse.Namespace) -> int:
    """`crdtchat serve`: exit 0 after a graceful shutdown, 1 with a reason on failure."""
    secret = os.environ.get(SECRET_VARIABLE, "")
    if not secret:
        print(f"crdtchat serve: {SECRET_VARIABLE} is not set", file=sys.stderr)
        return 1
    try:
        config = config_from_args(args, secret)
        tls_context(config)
    except ValueError as error:
        print(f"crdtchat serve: {error}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)

    def announce(host: str, port: int, scheme: str) -> None:
        print(f"crdtchat relay listening on {scheme}://{host}:{port}", flush=True)
        page = "https" if scheme == "wss" else "http"
        print(f"web client at {page}://{host}:{port}/", flush=True)

    async def main() -> None:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("received %s", signal.Signals(signum).name)
                        stop.set()
                        return

            tg.start_soon(watch_signals)
            await run_relay(config, stop, announce)
            tg.cancel_scope.cancel()

    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        anyio.run(
            main, backend_options={"use_uvloop": importlib.util.find_spec("uvloop") is not None}
        )
    except BaseException as error:
        leaf = _single_leaf(error)
        if isinstance(leaf, OSError | StoreError):
            print(f"crdtchat serve: {leaf}", file=sys.stderr)
            return 1
        raise
    return 0


def _single_leaf(error: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups, or the group itself."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crdtchat.relay.main", description="crdtchat relay"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--data", default="./crdtchat-data")
    parser.add_argument("--max-frame", type=int, default=8 * 1024 * 1024)
    add_extra_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return serve_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
