"""Callbacks handed to pycrdt's native side that do not keep their owner alive.

A subscription's callback is held by yrs, out of sight of Python's cycle collector. When the
callback is a bound method of the object that also holds the subscription, the pair is a
cycle nobody can collect: the owner, its pycrdt `Doc` and everything they refer to stay in
memory for good (pycrdt#421, y-crdt#654; issue 12 measured 12-15 KB per room document or
conversation built). Owners therefore drop their subscriptions in an explicit `close()`, and
the callbacks they register go through `weak_method`, so that an owner somebody forgot to
close is still freed by reference counting (its subscriptions go with it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self


class ClosesOnExit:
    """`with owner:` calls `owner.close()` on the way out, however the block ends.

    For the owners above (and a store holding a file): the close is what frees them, so the
    context manager protocol is written once rather than in each.
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def weak_method(method: Callable[..., Any]) -> Callable[..., None]:
    """`method` (a bound method) called through a weak reference to its object.

    Once the object is gone the callback does nothing; by then its subscription is normally
    gone too, since the object held it.
    """
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def call(*args: Any) -> None:
        target = ref()
        if target is not None:
            target(*args)

    return call
