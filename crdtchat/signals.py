"""A broadcast "something changed" signal for async waiters.

Fed from synchronous callbacks (pycrdt observers, status updates); waiters re-check their
own condition after each wake-up, so a notify never needs to say what changed.
"""

from __future__ import annotations

import anyio


class Changes:
    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self, *_: object) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()
