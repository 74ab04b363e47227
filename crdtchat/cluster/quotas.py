"""Per-subject quotas counted across relay nodes (design §7.4; docs/cluster.md, "Quotas").

A subject connected to three nodes must not get three times its quota, so every node tells the
others what each subject spent on it, and charges what they tell to its own buckets: each node
judges against the sum of all nodes' spending. What is told travels on one plain NATS subject
(`<prefix>.nodes.quotas`, core NATS: at most once, never stored in the stream), like presence:

- spending (bytes written, rooms created, refused writes; net of the refunds of withdrawn
  writes) is batched per subject and published `interval` (250 ms) after the first spend of a
  batch, or at once when one subject's untold spending passes 1/16 of its byte or room quota;
  a node with nothing to tell sleeps until it spends (waking once a second to look for silent
  nodes and for a reconnection). So another node learns of a
  spend at most one interval (plus a network hop) after it: the cluster may let a subject
  overshoot a quota by what it spends on each of the other nodes within one interval, and by at
  most 1/16 of the quota per node for large spends;
- spending survives NATS being away, told exactly once. While this node is disconnected it
  forms no batch: the spending stays in `Subjects`, and goes out in the first batch after the
  reconnection. Every spending message carries the node's epoch (one per start) and a sequence
  number, and the node keeps the messages it sent in the last `resend_window` (60 s; at most
  `RESEND_MAX` messages). It publishes them all again when
  it reconnects (one may have died in a socket with the server) and when another node says
  hello, which a node does when it starts and whenever it reconnects (it may have missed some
  while away, as every node does when the one NATS server restarts: the nodes come back one
  after the other, and core NATS keeps nothing for a subscriber that is not there). A receiver
  applies each (epoch, sequence) once and ignores the repeats;
- connection counts are told as absolute numbers per subject: those that changed, in the next
  batch; every node's whole table to a node that says hello (it started or reconnected), and every
  `full_every` seconds, so a batch lost in a reconnect heals. A node whose heartbeat stopped
  (presence, `PresenceBus.nodes`) and that told nothing for as long is forgotten, and its
  connections no longer count.

The sums themselves live in `crdtchat.relay.ratelimit.Subjects` (shared mode), which stays
without I/O; this module only moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from crdtchat.cluster.connection import ClusterConnection
from crdtchat.cluster.presence import PresenceBus
from crdtchat.relay.ratelimit import Spend, Subjects

log = logging.getLogger("crdtchat.cluster.quotas")

QUOTA_INTERVAL = 0.25  # seconds between batches of spending
FULL_TABLE_EVERY = 10.0  # seconds between whole connection tables
IDLE_SWEEP_EVERY = 30.0  # seconds between dropping subjects with nothing left to refill
# With nothing to tell, how often a node looks for silent nodes and a reconnection: spending
# wakes it at once, so an idle node need not wake every QUOTA_INTERVAL (issue 13: an idle
# node's wake-ups were a tenth of its CPU per update at 20 updates a second).
IDLE_WAKE_EVERY = 1.0
SUBJECTS_PER_MESSAGE = 2000  # keeps a batch well under NATS's 1 MiB max_payload
RESEND_WINDOW = 60.0  # seconds a spending message is kept to be published again
RESEND_MAX = 1024  # ... and at most this many: a receiver remembers as many sequences per node


@dataclass
class _Sent:
    """One spending message as published, kept to publish again (same epoch and sequence)."""

    seq: int
    data: bytes
    sent_at: float  # time.monotonic() it was formed
    published: bool = False  # handed to the NATS client without an error


@dataclass
class _Applied:
    """Which of one node epoch's spending messages this node has charged."""

    epoch: str
    heard: float  # time.monotonic() of the last spending message of the node
    seqs: set[int] = field(default_factory=set)
    highest: int = 0

    def first_time(self, seq: int) -> bool:
        """Whether `seq` is new; remembers it. Sequences more than `RESEND_MAX` below the
        highest are never sent again (the sender keeps no more), so they are forgotten."""
        if seq in self.seqs or seq <= self.highest - RESEND_MAX:
            return False
        self.seqs.add(seq)
        if seq > self.highest:
            self.highest = seq
            if len(self.seqs) > RESEND_MAX:
                self.seqs = {s for s in self.seqs if s > seq - RESEND_MAX}
        return True


class QuotaExchange:
    """One node's side of the shared quotas: publishes its batches, applies the others'."""

    def __init__(
        self,
        connection: ClusterConnection,
        node_id: str,
        subjects: Subjects,
        presence: PresenceBus,
        *,
        interval: float = QUOTA_INTERVAL,
        full_every: float = FULL_TABLE_EVERY,
        resend_window: float = RESEND_WINDOW,
    ) -> None:
        if not subjects.shared:
            raise ValueError("a QuotaExchange needs Subjects(..., shared=True)")
        self.connection = connection
        self.subject = connection.names.quota_subject
        self.node_id = node_id
        self.subjects = subjects
        self.presence = presence
        self.interval = interval
        self.full_every = full_every
        self.resend_window = resend_window
        self.metrics = connection.metrics
        self.epoch = secrets.token_hex(8)  # this start: a restarted node's sequences start over
        self._seq = 0
        self._sent: deque[_Sent] = deque()
        self._reconnects = connection.metrics.reconnects
        self._applied: dict[str, _Applied] = {}  # node -> which of its spending was charged
        self._heard: dict[str, float] = {}  # node -> time.monotonic() of its last message
        self._urgent = asyncio.Event()
        self._wake = asyncio.Event()  # something to tell after a quiet spell
        self._send_full = asyncio.Event()
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        nc = self.connection.nc
        self._subscription = await nc.subscribe(self.subject, cb=self._on_message)
        await nc.flush()
        self.subjects.urgent = self._hurry
        self.subjects.untold = self._wake.set
        self._task = asyncio.create_task(self._run(), name=f"quota exchange {self.node_id}")
        await self._publish({"node": self.node_id, "hello": True})

    async def close(self) -> None:
        """Tell what is left, then stop (the other nodes forget this node's connections when
        its heartbeat stops)."""
        self.subjects.urgent = None
        self.subjects.untold = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(nats.errors.Error):
            await self._send_batch()
            await self.connection.nc.flush(timeout=2)
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._subscription.unsubscribe()
            self._subscription = None

    # Sending

    async def _run(self) -> None:
        next_full = time.monotonic() + self.full_every
        next_sweep = time.monotonic() + IDLE_SWEEP_EVERY
        while True:
            if not self._has_work():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_WAKE_EVERY):
                        await self._wake.wait()
                self._wake.clear()
            if self._has_work() and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):  # the batch: what is spent meanwhile
                    async with asyncio.timeout(self.interval):
                        await self._urgent.wait()
            self._urgent.clear()
            now = time.monotonic()
            if self.connection.nc.is_connected:  # else the spending waits in `Subjects`
                try:
                    if self.metrics.reconnects != self._reconnects:
                        self._reconnects = self.metrics.reconnects
                        await self._publish({"node": self.node_id, "hello": True})
                        self._send_full.set()  # what this node sent just before may be lost
                    if self._send_full.is_set() or now >= next_full:
                        resend = self._send_full.is_set()
                        self._send_full.clear()
                        next_full = now + self.full_every
                        self.subjects.take_connection_changes()  # the full table has them
                        await self._send_table()
                        if resend:
                            await self._send_again(now)
                    await self._send_batch()
                except nats.errors.Error as error:  # spending is kept; counts heal by table
                    log.warning("quota batch not sent: %s", error)
            self._forget_silent_nodes(now)
            if now >= next_sweep:
                next_sweep = now + IDLE_SWEEP_EVERY
                self.subjects.forget_idle()

    def _hurry(self) -> None:
        """Send at once (a subject near its quota, a node that said hello)."""
        self._urgent.set()
        self._wake.set()

    def _has_work(self) -> bool:
        return (
            self.subjects.has_untold()
            or self._send_full.is_set()
            or self._urgent.is_set()
            or bool(self._sent and not self._sent[-1].published)  # published in order
        )

    async def _send_batch(self) -> None:
        spends = self.subjects.take_spends()
        connections = self.subjects.take_connection_changes()
        spent = [[sub, s.write_bytes, s.rooms, s.refusals] for sub, s in spends.items()]
        for part in _chunks(spent):  # numbered and kept before publishing: a failure is resent
            self._seq += 1
            body = {"node": self.node_id, "epoch": self.epoch, "seq": self._seq, "spends": part}
            self._keep(_encode(body))
        unpublished = [sent for sent in self._sent if not sent.published]
        if not unpublished and not connections:
            return
        for sent in unpublished:  # in order; one that failed before goes first
            await self.connection.nc.publish(self.subject, sent.data)
            sent.published = True
        for part in _chunks(list(connections.items())):
            await self._publish({"node": self.node_id, "connections": dict(part)})
        self.metrics.quota_batches_sent += 1

    def _keep(self, data: bytes) -> None:
        now = time.monotonic()
        self._sent.append(_Sent(self._seq, data, now))
        self._drop_old(now)

    def _drop_old(self, now: float) -> None:
        while self._sent and (
            len(self._sent) > RESEND_MAX or now - self._sent[0].sent_at > self.resend_window
        ):
            self._sent.popleft()

    async def _send_again(self, now: float) -> None:
        """Every spending message of the last `resend_window`, published again: for a node
        that was away, or because one was lost with a server."""
        self._drop_old(now)
        for sent in list(self._sent):
            if sent.published:
                await self.connection.nc.publish(self.subject, sent.data)

    async def _send_table(self) -> None:
        """Every connection count of this node: the first message replaces what the other
        nodes hold for it, the rest add to it."""
        table = list(self.subjects.connection_table().items())
        for index, part in enumerate(_chunks(table) or [[]]):
            await self._publish(
                {"node": self.node_id, "connections": dict(part), "full": index == 0}
            )

    async def _publish(self, body: dict[str, Any]) -> None:
        await self.connection.nc.publish(self.subject, _encode(body))

    # Receiving

    async def _on_message(self, msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            node = str(body["node"])
        except (ValueError, KeyError, TypeError):
            return
        if node == self.node_id:
            return
        self._heard[node] = time.monotonic()
        if body.get("hello"):
            self._send_full.set()  # a node that has just started: tell it every count
            self._hurry()
            return
        if "spends" in body and not self._first_time(node, body):
            self.metrics.quota_batches_repeated += 1
            return
        try:
            for sub, write_bytes, rooms, refusals in body.get("spends", ()):
                spend = Spend(float(write_bytes), float(rooms), float(refusals))
                self.subjects.charge_remote(str(sub), spend)
                self.metrics.quota_bytes_heard += max(0.0, spend.write_bytes)
            counts = {str(sub): int(count) for sub, count in body.get("connections", {}).items()}
        except (ValueError, TypeError, AttributeError):
            log.warning("node %s sent a malformed quota batch", node)
            return
        if counts or body.get("full"):
            self.subjects.set_remote_connections(node, counts, full=bool(body.get("full")))
        self.metrics.quota_batches_heard += 1
        self.metrics.quota_remote_connections = self.subjects.remote_connections()

    def _first_time(self, node: str, body: dict[str, Any]) -> bool:
        """Whether this spending message of `node` has not been charged yet (a resent one has
        the epoch and sequence of the first sending)."""
        try:
            epoch, seq = str(body["epoch"]), int(body["seq"])
        except KeyError:
            return True  # a node of an earlier version, which never sends a message twice
        except (ValueError, TypeError):
            return False
        applied = self._applied.get(node)
        now = time.monotonic()
        if applied is None or applied.epoch != epoch:  # a new node, or the node restarted
            applied = self._applied[node] = _Applied(epoch, now)
        applied.heard = now
        return applied.first_time(seq)

    def _forget_silent_nodes(self, now: float) -> None:
        """A node silent for its presence timeout: its connections stop counting. Which of its
        spending was charged is kept for longer than it resends anything (it may have been
        away from NATS and send its last messages again when it comes back)."""
        for node, applied in list(self._applied.items()):
            if now - applied.heard > 2 * self.resend_window:
                del self._applied[node]
        alive = self.presence.nodes()
        for node, heard in list(self._heard.items()):
            if node not in alive and now - heard > self.presence.timeout:
                del self._heard[node]
                self.subjects.forget_node(node)
                self.metrics.quota_remote_connections = self.subjects.remote_connections()
                log.info("node %s silent: its subjects' connections no longer count", node)


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _chunks(items: list[Any]) -> list[list[Any]]:
    return [items[i : i + SUBJECTS_PER_MESSAGE] for i in range(0, len(items), SUBJECTS_PER_MESSAGE)]
