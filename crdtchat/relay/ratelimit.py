"""Token buckets: per connection (messages, bytes, awareness) and per subject (design §7.4).

A subject is the `sub` of a token. One subject may hold many tokens and connections, so what
must not scale with the number of connections (refused writes, rooms created, bytes written,
connections themselves) is counted per subject, in `Subjects`, for the whole relay.

In cluster mode the relay is several nodes, and a subject's quotas hold across them
(docs/cluster.md, "Quotas across nodes"): `Subjects(quotas, shared=True)` keeps what each
subject spent here since it was last told to the other nodes (`take_spends`) and which
connection counts changed (`take_connection_changes`); what the other nodes tell is charged
to the same buckets (`charge_remote`) and added to the connection counts
(`set_remote_connections`), so every node judges against the sum. Sending and receiving is
crdtchat/cluster/quotas.py; this module stays without I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


class TokenBucket:
    """`rate` tokens per second up to `burst`. Every method takes `now` (seconds since the
    epoch, the clock of the relay's protocol core, which reads no clock itself); the I/O shell
    may leave it out. A clock that steps back refills nothing."""

    __slots__ = ("burst", "rate", "tokens", "updated")  # several per connection

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated: float | None = None  # full until first used

    def _refill(self, now: float | None) -> None:
        if now is None:
            now = time.time()
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now

    def take(self, amount: float, now: float | None = None) -> bool:
        """Spend `amount` tokens if the bucket holds them; False means over the limit."""
        self._refill(now)
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True

    def can_take(self, amount: float, now: float | None = None) -> bool:
        """Whether `amount` is there, spending nothing (it is charged once it is known)."""
        self._refill(now)
        return amount <= self.tokens

    def charge(self, amount: float, now: float | None = None) -> None:
        """Spend `amount` even if that leaves a debt: for costs known only afterwards."""
        self._refill(now)
        self.tokens -= amount

    def refund(self, amount: float) -> None:
        """Give back `amount` charged for something that did not happen after all (a write
        withdrawn in cluster mode), up to `burst`; no clock: nothing refills here."""
        self.tokens = min(self.burst, self.tokens + amount)

    def full(self, now: float | None = None) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class ConnectionLimits:
    """Messages per second and bytes per second of one connection."""

    __slots__ = ("bytes", "messages")

    def __init__(
        self, messages: float, message_burst: float, bytes_per_second: float, byte_burst: float
    ) -> None:
        self.messages = TokenBucket(messages, message_burst)
        self.bytes = TokenBucket(bytes_per_second, max(byte_burst, bytes_per_second))

    def admit(self, message_count: int, size: int) -> str | None:
        """None if the frame is within limits, else the reason to close the connection."""
        if not self.messages.take(max(1, message_count)):
            return f"rate limit exceeded: more than {self.messages.rate:g} messages/s"
        if not self.bytes.take(size):
            return f"rate limit exceeded: more than {self.bytes.rate:g} bytes/s"
        return None


@dataclass(frozen=True)
class SubjectQuotas:
    """The per-subject limits, from `RelayConfig` (design §7.4)."""

    connections: int = 128  # open connections at once
    refusal_rate: float = 1.0  # refused writes per second, sustained ...
    refusal_burst: float = 30.0  # ... and at once
    rooms: float = 100.0  # rooms created per `interval`
    write_bytes: float = 128 * 1024 * 1024  # bytes of accepted updates per `interval`
    interval: float = 3600.0  # seconds over which `rooms` and `write_bytes` refill


@dataclass(slots=True)
class Spend:
    """What one subject spent on this node and has not told the other nodes yet (net of
    refunds, so it may be negative)."""

    write_bytes: float = 0.0
    rooms: float = 0.0
    refusals: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.write_bytes or self.rooms or self.refusals)


@dataclass(slots=True)  # one per connected subject, and subjects are mostly idle
class Subject:
    """What one subject may still do; shared by all of its connections. Spending goes through
    the methods below, which also note it for the other nodes of a cluster."""

    sub: str
    quotas: SubjectQuotas
    connections: int = 0
    refusals: TokenBucket = field(init=False)
    rooms: TokenBucket = field(init=False)
    write_bytes: TokenBucket = field(init=False)
    owner: Subjects | None = None  # set when spending is shared with other nodes

    def __post_init__(self) -> None:
        q = self.quotas
        self.refusals = TokenBucket(q.refusal_rate, q.refusal_burst)
        self.rooms = TokenBucket(q.rooms / q.interval, q.rooms)
        self.write_bytes = TokenBucket(q.write_bytes / q.interval, q.write_bytes)

    def spend_bytes(self, amount: float, now: float | None = None) -> None:
        """Bytes of an accepted update (charged once known, so it may leave a debt)."""
        self.write_bytes.charge(amount, now)
        if self.owner is not None:
            self.owner.note(self.sub, write_bytes=amount)

    def spend_room(self, now: float | None = None) -> None:
        self.rooms.charge(1, now)
        if self.owner is not None:
            self.owner.note(self.sub, rooms=1)

    def take_refusal(self, now: float | None = None) -> bool:
        """Count a refused write; False when the subject has used up its refusal budget."""
        if not self.refusals.take(1, now):
            return False
        if self.owner is not None:
            self.owner.note(self.sub, refusals=1)
        return True

    def refund_bytes(self, amount: float) -> None:
        self.write_bytes.refund(amount)
        if self.owner is not None:
            self.owner.note(self.sub, write_bytes=-amount)

    def refund_room(self) -> None:
        self.rooms.refund(1)
        if self.owner is not None:
            self.owner.note(self.sub, rooms=-1)

    def idle(self) -> bool:
        """No connection and nothing spent: forgetting it changes nothing."""
        return (
            self.connections == 0
            and self.refusals.full()
            and self.rooms.full()
            and self.write_bytes.full()
        )


class Subjects:
    """Every subject that has a connection, or spent something that has not refilled yet.

    `shared`: a cluster node's table, whose spending and connection counts are told to the
    other nodes and added to theirs (see the module's docstring). `urgent` is called when a
    subject's untold spending passes `urgent_share` of a quota, so that it is told at once
    rather than at the next batch."""

    def __init__(
        self, quotas: SubjectQuotas, *, shared: bool = False, urgent_share: float = 1 / 16
    ) -> None:
        self.quotas = quotas
        self.shared = shared
        self.urgent: Callable[[], None] | None = None
        # Called when there is something to tell again after `take_spends` and
        # `take_connection_changes` took everything: the teller may sleep until then.
        self.untold: Callable[[], None] | None = None
        self._urgent_bytes = quotas.write_bytes * urgent_share
        self._urgent_rooms = quotas.rooms * urgent_share
        self._subjects: dict[str, Subject] = {}
        self._spends: dict[str, Spend] = {}  # sub -> spent here, untold
        self._changed_connections: set[str] = set()
        self._remote: dict[str, dict[str, int]] = {}  # node -> sub -> its connections there
        self._remote_total: dict[str, int] = {}  # sub -> connections on all other nodes
        self._remote_sum = 0  # every subject's connections on the other nodes

    def get(self, sub: str) -> Subject:
        subject = self._subjects.get(sub)
        if subject is None:
            subject = self._subjects[sub] = Subject(sub, self.quotas)
            if self.shared:
                subject.owner = self
        return subject

    def connections(self, sub: str) -> int:
        """`sub`'s open connections: here, and on the other nodes as they last told."""
        subject = self._subjects.get(sub)
        here = 0 if subject is None else subject.connections
        return here + self._remote_total.get(sub, 0)

    def connect(self, sub: str) -> Subject | str:
        """Count a new connection of `sub`; the reason to refuse it if over the limit."""
        if self.connections(sub) >= self.quotas.connections:
            return (
                f"too many connections for subject {sub!r}: limit {self.quotas.connections}; "
                "try again later"
            )
        subject = self.get(sub)
        subject.connections += 1
        if self.shared:
            self._connection_changed(sub)
        return subject

    def disconnect(self, subject: Subject) -> None:
        """One connection fewer; an idle subject is forgotten (the table holds active ones,
        and those whose last connection left while they still owed something)."""
        subject.connections -= 1
        if self.shared:
            self._connection_changed(subject.sub)
        if subject.idle() and self._subjects.get(subject.sub) is subject:
            del self._subjects[subject.sub]

    def __len__(self) -> int:
        return len(self._subjects)

    # -- sharing with the other nodes of a cluster ----------------------------------------

    def has_untold(self) -> bool:
        """Whether spending or connection changes wait to be told to the other nodes."""
        return bool(self._spends or self._changed_connections)

    def _first_untold(self) -> None:
        if self.untold is not None and not self.has_untold():
            self.untold()

    def _connection_changed(self, sub: str) -> None:
        self._first_untold()
        self._changed_connections.add(sub)

    def note(self, sub: str, write_bytes: float = 0, rooms: float = 0, refusals: float = 0) -> None:
        """Spending of `sub` on this node, to be told to the other nodes."""
        spend = self._spends.get(sub)
        if spend is None:
            self._first_untold()
            spend = self._spends[sub] = Spend()
        spend.write_bytes += write_bytes
        spend.rooms += rooms
        spend.refusals += refusals
        if self.urgent is not None and (
            spend.write_bytes >= self._urgent_bytes or spend.rooms >= self._urgent_rooms
        ):
            self.urgent()

    def take_spends(self) -> dict[str, Spend]:
        """What was spent here since the last call (nothing spent nets out to nothing)."""
        spends, self._spends = self._spends, {}
        return {sub: spend for sub, spend in spends.items() if spend}

    def take_connection_changes(self) -> dict[str, int]:
        """The connection counts here that changed since the last call: sub -> count now."""
        changed, self._changed_connections = self._changed_connections, set()
        return {sub: self._local_connections(sub) for sub in changed}

    def connection_table(self) -> dict[str, int]:
        """Every subject's connection count here (for a node that has just joined)."""
        return {sub: s.connections for sub, s in self._subjects.items() if s.connections}

    def _local_connections(self, sub: str) -> int:
        subject = self._subjects.get(sub)
        return 0 if subject is None else subject.connections

    def charge_remote(self, sub: str, spend: Spend, now: float | None = None) -> None:
        """Spending another node told: charged to the same buckets, told no further."""
        subject = self.get(sub)
        for bucket, amount in (
            (subject.write_bytes, spend.write_bytes),
            (subject.rooms, spend.rooms),
            (subject.refusals, spend.refusals),
        ):
            if amount > 0:
                bucket.charge(amount, now)
            elif amount < 0:
                bucket.refund(-amount)

    def set_remote_connections(self, node: str, counts: dict[str, int], *, full: bool) -> None:
        """Connection counts another node told: all of them (`full`), or those that changed."""
        table = self._remote.setdefault(node, {})
        if full:
            for sub in list(table):
                if sub not in counts:
                    self._set_remote(table, sub, 0)
        for sub, count in counts.items():
            self._set_remote(table, sub, count)

    def forget_node(self, node: str) -> None:
        """A node gone silent (its heartbeat stopped): its connections no longer count."""
        table = self._remote.pop(node, None) or {}
        for sub in list(table):
            self._set_remote(table, sub, 0)

    def remote_connections(self) -> int:
        """Connections on the other nodes, all subjects together (a gauge)."""
        return self._remote_sum

    def _set_remote(self, table: dict[str, int], sub: str, count: int) -> None:
        delta = count - table.get(sub, 0)
        if count > 0:
            table[sub] = count
        else:
            table.pop(sub, None)
        self._remote_sum += delta
        total = self._remote_total.get(sub, 0) + delta
        if total > 0:
            self._remote_total[sub] = total
        else:
            self._remote_total.pop(sub, None)

    def forget_idle(self) -> int:
        """Drop subjects with nothing left to refill and no connection (entries made by other
        nodes' spending have no disconnect to drop them). Returns how many went."""
        idle = [sub for sub, subject in self._subjects.items() if subject.idle()]
        for sub in idle:
            del self._subjects[sub]
        return len(idle)
