"""Giving memory that unloaded rooms freed back to the system (issue 12).

Nothing of an unloaded room stays alive (tests/relay/test_leaks.py), but glibc's malloc, which
yrs, SQLite and Python's larger objects allocate through, keeps what is freed in the middle of
its heap for later allocations: only the top of the heap goes back by itself. So a relay's
resident size follows the peak of what its loaded rooms held, not what they hold now, and
stays there after the load drops. `malloc_trim(0)` hands every free page back.

It is only worth calling now and then (benchmarks/room_churn.py, docs/performance.md): with
280 rooms of 20 messages loaded it gave back nothing, since their allocations pin the heap's
pages, and once they were unloaded it gave back 24 MiB; each call took 2-40 ms on a loaded
machine, during which the relay's allocations wait. Hence at most one call per `interval`,
after a room unloads, and one whenever the last loaded room goes (the load is gone: this is when
the most comes back). In the relay's soak it gave back 1-3 MiB at a drain and kept RSS 5-12 MiB
lower: most of the relay's memory is Python objects, whose arenas it does not touch. Where the
C library has no `malloc_trim` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable

log = logging.getLogger("crdtchat.relay.heap")


def _libc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)`, or None where there is no such function."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


class HeapTrimmer:
    """Calls `trim` after a room unload, at most once per `interval` seconds, and whenever no
    room is left loaded (0: never)."""

    def __init__(self, interval: float, trim: Callable[[], object] | None = None) -> None:
        self.interval = interval
        self.trim = trim if trim is not None else _libc_trim()
        self.trims = 0
        self._last: float | None = None

    def room_unloaded(self, rooms_left: int) -> None:
        if self.interval <= 0 or self.trim is None:
            return
        now = time.monotonic()
        if rooms_left and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        started = time.perf_counter()
        self.trim()
        self.trims += 1
        log.debug("heap trimmed in %.1f ms", (time.perf_counter() - started) * 1000)
