"""Token buckets: per connection (messages, bytes, awareness) and per subject (design §7.4).

A subject is the `sub` of a token. One subject may hold many tokens and connections, so what
must not scale with the number of connections (refused writes, rooms created, bytes written,
connections themselves) is counted per subject, in `Subjects`, for the whole relay.
"""

from __future__ import annotations

import time
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


@dataclass(slots=True)  # one per connected subject, and subjects are mostly idle
class Subject:
    """What one subject may still do; shared by all of its connections."""

    sub: str
    quotas: SubjectQuotas
    connections: int = 0
    refusals: TokenBucket = field(init=False)
    rooms: TokenBucket = field(init=False)
    write_bytes: TokenBucket = field(init=False)

    def __post_init__(self) -> None:
        q = self.quotas
        self.refusals = TokenBucket(q.refusal_rate, q.refusal_burst)
        self.rooms = TokenBucket(q.rooms / q.interval, q.rooms)
        self.write_bytes = TokenBucket(q.write_bytes / q.interval, q.write_bytes)

    def idle(self) -> bool:
        """No connection and nothing spent: forgetting it changes nothing."""
        return (
            self.connections == 0
            and self.refusals.full()
            and self.rooms.full()
            and self.write_bytes.full()
        )


class Subjects:
    """Every subject that has a connection, or spent something that has not refilled yet."""

    def __init__(self, quotas: SubjectQuotas) -> None:
        self.quotas = quotas
        self._subjects: dict[str, Subject] = {}

    def get(self, sub: str) -> Subject:
        subject = self._subjects.get(sub)
        if subject is None:
            subject = self._subjects[sub] = Subject(sub, self.quotas)
        return subject

    def connect(self, sub: str) -> Subject | str:
        """Count a new connection of `sub`; the reason to refuse it if over the limit."""
        subject = self.get(sub)
        if subject.connections >= self.quotas.connections:
            return (
                f"too many connections for subject {sub!r}: limit {self.quotas.connections}; "
                "try again later"
            )
        subject.connections += 1
        return subject

    def disconnect(self, subject: Subject) -> None:
        """One connection fewer; an idle subject is forgotten (the table holds active ones,
        and those whose last connection left while they still owed something)."""
        subject.connections -= 1
        if subject.idle() and self._subjects.get(subject.sub) is subject:
            del self._subjects[subject.sub]

    def __len__(self) -> int:
        return len(self._subjects)
