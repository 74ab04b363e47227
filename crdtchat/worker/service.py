"""The worker as a network peer: rooms from the relay's feed, one replica per busy room.

Each room gets its own task and replica for as long as it has work, then is closed; a
notification that arrives while a room is being served makes it look again once it is done,
so no request can slip between "idle" and "closed". A room that fails (whatever a peer put in
it) is logged and skipped: one room never stops the worker from serving the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import anyio

from crdtchat.document import Conversation
from crdtchat.providers.hosted import reused_connections
from crdtchat.relays import starting_at
from crdtchat.replica import Replica
from crdtchat.worker.feed import waiting_rooms
from crdtchat.worker.room import ProviderPool, RoomSettings, serve_room

log = logging.getLogger(__name__)

# After another worker's lease would have expired: the margin for its last renewal to arrive.
LEASE_GRACE = 0.5


@dataclass(frozen=True)
class WorkerConfig:
    relays: tuple[str, ...]  # base URLs, checked (`crdtchat.relays.relay_urls`), tried in turn
    token: str
    identity: str  # the token's subject: the author of every turn this worker writes
    device: str = "worker"
    room: RoomSettings = field(default_factory=RoomSettings)
    durable_timeout: float = 30.0


async def serve_remote_room(
    room: str,
    config: WorkerConfig,
    providers: ProviderPool,
    on_foreign_leases: Callable[[float], None] | None = None,
) -> int:
    """Serve one room through a replica until idle; returns the turns committed."""
    # Closed when the room is done: a worker opens conversations all day (issue 12).
    with Conversation(author=config.identity, role="worker") as conversation:
        # The room's provider calls (each turn, then its title) reuse one connection.
        async with reused_connections():
            return await _serve_with_replica(
                conversation, room, config, providers, on_foreign_leases
            )


async def _serve_with_replica(
    conversation: Conversation,
    room: str,
    config: WorkerConfig,
    providers: ProviderPool,
    on_foreign_leases: Callable[[float], None] | None,
) -> int:
    async with Replica(
        config.relays,
        room,
        config.token,
        doc=conversation.doc,
        presence={"user": config.identity, "device": config.device, "role": "worker"},
        on_denied=lambda reason: log.error("room %s refused a write: %s", room, reason),
    ) as replica:
        await replica.wait_until(lambda status: status.synced)

        async def lease_is_stored() -> None:
            # The relay orders writes: once it has stored our lease, any lease it stored
            # before ours has reached us too, and claim_lease's re-check sees who holds it.
            await replica.wait_until(lambda status: status.durable)

        committed = await serve_room(
            conversation,
            providers,
            room=room,
            settings=config.room,
            on_claimed=lease_is_stored,
            on_foreign_leases=on_foreign_leases,
        )
        with anyio.move_on_after(config.durable_timeout):
            await replica.wait_until(lambda status: status.durable)
        if not replica.status.durable:
            log.error("room %s: closing with %d writes not stored", room, replica.status.pending)
    return committed


async def run_worker(config: WorkerConfig, providers: ProviderPool) -> None:
    """Serve every room the relay says is waiting, until cancelled.

    A room's replica tries the relay the feed is connected to first: it answered last.
    """
    open_rooms: set[str] = set()
    look_again: set[str] = set()
    relays = config.relays

    def feed_connected(relay: str) -> None:
        nonlocal relays
        relays = starting_at(config.relays, relay)

    async with anyio.create_task_group() as rooms:

        async def serve(room: str) -> None:
            try:
                while True:
                    look_again.discard(room)
                    recheck: list[float] = []
                    try:
                        await serve_remote_room(
                            room, replace(config, relays=relays), providers, recheck.append
                        )
                    except (OSError, TimeoutError) as error:
                        log.warning("room %s: %s", room, error)
                    except Exception:
                        log.exception("room %s failed; skipped until it waits again", room)
                        return
                    if recheck:
                        # Another worker is answering: do not hold the room open (and receive
                        # every token it streams); come back when its lease would expire, to
                        # take over if it died. A feed notice meanwhile changes nothing.
                        await anyio.sleep(recheck[0] + LEASE_GRACE)
                        continue
                    if room not in look_again:
                        return
            finally:
                open_rooms.discard(room)

        async for room in waiting_rooms(config.relays, config.token, on_connected=feed_connected):
            if room in open_rooms:
                look_again.add(room)
                continue
            open_rooms.add(room)
            rooms.start_soon(serve, room)
