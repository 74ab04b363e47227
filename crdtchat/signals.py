"""A broadcast "something changed" signal for async waiters.

Fed from synchronous callbacks (pycrdt observers, status updates); waiters re-check their
own condition after each wake-up, so a notify never needs to say what changed.
"""

from __future__ import annotations

import anyio


class Changes:
    def __init__(self) -> None:
        # Made by the first waiter: a notify with nobody waiting (a replica's status changes
        # twice per streamed flush) then costs nothing.
        self._event: anyio.Event | None = None

    def notify(self, *_: object) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()
