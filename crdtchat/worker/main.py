"""`crdtchat worker`: the LLM worker peer for every room with a message waiting for a reply."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import os
import socket

import anyio

from crdtchat.errors import CommandError
from crdtchat.providers.base import ProviderError
from crdtchat.relays import RelayURLError, relay_urls
from crdtchat.tokens import TokenError, read_claims_unverified
from crdtchat.worker.feed import FeedRefused
from crdtchat.worker.room import ProviderPool, RoomSettings
from crdtchat.worker.service import WorkerConfig, run_worker
from crdtchat.worker.turn import TurnSettings

log = logging.getLogger("crdtchat.worker")

TOKEN_VARIABLE = "CRDTCHAT_TOKEN"
# Allocations between young-generation collections: ten times CPython's default (see tune_gc).
YOUNG_COLLECTION_THRESHOLD = 7_000


def worker_config(
    relays: str, token: str, *, lease_ttl: float = 30.0, idle_after: float = 30.0
) -> WorkerConfig:
    """Checks what can be checked locally, so a bad set-up fails at once with a reason.

    `relays` is `--relay`: one base URL or several, comma-separated (design §6)."""
    try:
        urls = relay_urls(relays)
    except RelayURLError as error:
        raise CommandError(f"--relay: {error}") from error
    if not token:
        raise CommandError(f"{TOKEN_VARIABLE} is not set (mint one with `crdtchat token`)")
    try:
        claims = read_claims_unverified(token)
    except TokenError as error:
        raise CommandError(f"{TOKEN_VARIABLE}: {error}") from error
    if claims.role != "worker" or claims.room != "*":
        held = "an identity token" if claims.identity else f"{claims.role} for {claims.room!r}"
        raise CommandError(
            f"{TOKEN_VARIABLE} must be a worker token for every room (--role worker --room '*'),"
            f" not {held}"
        )
    return WorkerConfig(
        relays=urls,
        token=token,
        identity=claims.sub,
        device=f"worker@{socket.gethostname()}",
        room=RoomSettings(idle_after=idle_after, turn=TurnSettings(lease_ttl=lease_ttl)),
    )


def tune_gc() -> None:
    """Fewer collector pauses in a process that streams many replies at once.

    A full collection traverses every live object (each open room's document, replica and
    connections) and stalls every stream at once: gc callbacks in concurrent_replies.py
    --limit 200 saw pauses of hundreds of ms. Objects get there by being alive when a young
    collection runs; collecting the young generation a tenth as often promotes a tenth as many
    in-flight ones (futures, frames, events), so full collections come less often. What
    start-up built is never garbage: frozen, no collection traverses it.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def loop_options() -> dict[str, bool]:
    """uvloop when it is installed, as the relay does (crdtchat/relay/main.py).

    The worker is mostly event loop: per streamed reply it reads the provider's SSE stream and
    writes websocket frames, and per flush wakes a few tasks. With 200 replies at once the
    standard loop's transports, handles and selector were a fifth of its CPU
    (benchmarks/concurrent_replies.py, docs/performance.md); libuv's do the same in C.
    """
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


async def serve(config: WorkerConfig, providers: ProviderPool) -> None:
    """`run_worker`, after saying which event loop runs it."""
    loop = type(asyncio.get_running_loop())
    log.info("worker %s: event loop %s.%s", config.identity, loop.__module__, loop.__qualname__)
    await run_worker(config, providers)


def worker_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.lease_ttl <= 0 or args.idle_after <= 0:
        raise CommandError("--lease-ttl and --idle-after must be positive")
    config = worker_config(
        args.relay,
        os.environ.get(TOKEN_VARIABLE, ""),
        lease_ttl=args.lease_ttl,
        idle_after=args.idle_after,
    )
    try:
        providers = ProviderPool(args.provider, args.model)
        providers.check_default()
    except ProviderError as error:
        raise CommandError(str(error)) from error
    tune_gc()
    try:
        anyio.run(serve, config, providers, backend_options=loop_options())
    except FeedRefused as error:
        raise CommandError(str(error)) from error
    return 0
