"""`crdtchat.signals.Changes`, which replicas, the worker and the TUI wait on."""

from __future__ import annotations

import anyio
import pytest

from crdtchat.signals import Changes


@pytest.mark.anyio
async def test_notify_wakes_every_waiter_and_only_those_already_waiting() -> None:
    changes = Changes()
    changes.notify()  # nobody waits: nothing is remembered for later waiters
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await changes.wait()
        woken.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, 1)
            tg.start_soon(waiter, 2)
            await anyio.wait_all_tasks_blocked()
            assert woken == []
            changes.notify()
        assert sorted(woken) == [1, 2]
