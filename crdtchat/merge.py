"""Merging Yjs updates without trusting pycrdt's `merge_updates` to finish.

pycrdt 0.14.13's `merge_updates` panics on some real histories (a sort in yrs "does not
implement a total order"; see docs/testing.md). The panic is a BaseException, so a plain
`except Exception` misses it and the relay or a client would die. Applying the updates to a
scratch document gives the same state, only slower, so that is the fallback.
"""

from __future__ import annotations

import logging

from pycrdt import Doc, merge_updates

from crdtchat.pycrdt_internals import is_panic

log = logging.getLogger(__name__)


def merge(*updates: bytes) -> bytes:
    """One update equivalent to all of `updates` (in any order)."""
    if len(updates) == 1:
        return updates[0]
    try:
        return merge_updates(*updates)
    except BaseException as error:  # pyo3's PanicException derives from BaseException
        if isinstance(error, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        if not is_panic(error):
            raise
        log.warning("merge_updates panicked (%s); merging through a document", error)
        doc: Doc = Doc()
        for update in updates:
            doc.apply_update(update)
        return doc.get_update()
