"""Per-connection token buckets, so one flooding client cannot starve a room."""

from __future__ import annotations

import time


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = time.monotonic()

    def take(self, amount: float) -> bool:
        """Spend `amount` tokens if the bucket holds them; False means over the limit."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


class ConnectionLimits:
    """Messages per second and bytes per second of one connection."""

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
