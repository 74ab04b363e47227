"""When and how long to wait before retrying a hosted API call.

Transient failures (429, 408, 5xx incl. Anthropic's 529, connection errors, a stream cut
mid-way) are retried a bounded number of times. The wait honours what the server asked for
(`retry-after-ms`, `Retry-After` in seconds or as an HTTP-date) and otherwise is exponential
backoff with full jitter, so many workers hitting one rate limit do not retry in lock-step.
`sleep`, `random` and `clock` are injectable so tests never wait for real.
"""

from __future__ import annotations

import email.utils
import math
import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from crdtchat.errors import ProviderError

__all__ = ["RetryPolicy", "RetryableStreamError", "parse_retry_after", "zero_delay_policy"]

RETRYABLE_STATUS = frozenset({408, 409, 429})


class RetryableStreamError(ProviderError):
    """Raised by a stream parser for an in-band error event worth retrying (e.g. overloaded).

    Lives here, not next to httpx, so that parsers stay free of I/O imports.
    """


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works for plain dicts as well as httpx.Headers."""
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for key, val in headers.items():
        if key.lower() == lower:
            return val
    return None


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, or None if it did not say (or said nonsense)."""
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if math.isfinite(value) and value >= 0:
            return value
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


async def _anyio_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` counts every try, the first included (so 4 = 1 try + 3 retries)."""

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 20.0
    # A server asking for longer than this is not waited for: the call fails instead, so a
    # worker does not sit on a lease for minutes.
    max_retry_after: float = 60.0
    sleep: Callable[[float], Awaitable[None]] = field(default=_anyio_sleep, compare=False)
    random: Callable[[], float] = field(default=_random.random, compare=False)
    clock: Callable[[], float] = field(default=time.time, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    @staticmethod
    def retryable_status(status: int, headers: Mapping[str, str] | None = None) -> bool:
        """429/408/409 and every 5xx, unless the server says `x-should-retry: false`."""
        if headers is not None:
            hint = _header(headers, "x-should-retry")
            if hint == "true":
                return True
            if hint == "false":
                return False
        return status in RETRYABLE_STATUS or status >= 500

    def can_retry(self, failures: int) -> bool:
        """Whether another try is allowed after `failures` failed tries."""
        return failures < self.max_attempts

    def backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max_delay, base * 2**(failures-1))]."""
        cap = min(self.max_delay, self.base_delay * (2 ** max(0, failures - 1)))
        return self.random() * cap

    def delay(self, failures: int, headers: Mapping[str, str] | None = None) -> float | None:
        """Seconds to wait before the next try, or None if the server's wait is too long."""
        if headers is not None:
            asked = parse_retry_after(headers, now=self.clock())
            if asked is not None:
                return asked if asked <= self.max_retry_after else None
        return self.backoff(failures)

    def next_delay(self, failures: int, headers: Mapping[str, str] | None = None) -> float | None:
        """Seconds to wait before try number `failures + 1`, or None to give up."""
        if not self.can_retry(failures):
            return None
        return self.delay(failures, headers)

    async def wait(self, failures: int, headers: Mapping[str, str] | None = None) -> bool:
        """Sleep before the next try; False means give up (budget spent or wait too long)."""
        seconds = self.next_delay(failures, headers)
        if seconds is None:
            return False
        await self.sleep(seconds)
        return True


def zero_delay_policy(max_attempts: int = 4) -> RetryPolicy:
    """A policy that retries without waiting (tests)."""

    async def no_sleep(_seconds: float) -> None:
        await anyio.lowlevel.checkpoint()

    return RetryPolicy(max_attempts=max_attempts, sleep=no_sleep)
