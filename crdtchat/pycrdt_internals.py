"""Every place crdtchat depends on pycrdt beyond its public API, in one module.

pycrdt's public API cannot do a few things crdtchat needs (each function says why), so these
reach into its private modules and attributes, and into pyo3's behaviour. Keeping them here
means a pycrdt upgrade breaks one module, and tests/document/test_pycrdt_internals.py names the
attribute that moved. pyproject.toml pins pycrdt below its next minor version for the same
reason; every name below is as of pycrdt 0.14.13.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from importlib.metadata import version
from typing import Any

from pycrdt import Doc, Subscription, Transaction

try:
    # process_event wraps raw yrs values (an event's delta, a raw read) in pycrdt's classes.
    from pycrdt._base import BaseType, process_event
    from pycrdt._pycrdt import Array as RawArray
    from pycrdt._pycrdt import Map as RawMap
    from pycrdt._pycrdt import XmlElement as RawXmlElement
    from pycrdt._pycrdt import XmlFragment as RawXmlFragment
    from pycrdt._pycrdt import XmlText as RawXmlText
except ImportError as error:  # pragma: no cover - only with a pycrdt that moved them
    raise ImportError(
        f"crdtchat.pycrdt_internals: pycrdt {version('pycrdt')} no longer has a name crdtchat "
        f"uses ({error}); crdtchat is tested with pycrdt 0.14"
    ) from error

__all__ = [
    "RAW_CONTAINERS",
    "BaseType",
    "RawMap",
    "in_transaction",
    "is_panic",
    "raw_event_kind",
    "raw_transaction",
    "read_transaction",
    "report_to_commit",
    "root_count",
    "subscriptions",
    "wrap",
]

# yrs's own classes for the shared types that can hold other shared types (a Text cannot).
RAW_CONTAINERS = (RawMap, RawArray, RawXmlElement, RawXmlFragment, RawXmlText)

# Raw yrs event classes by name, as an observer subscribed to `.integrated` receives them.
_RAW_EVENT_KINDS = {"ArrayEvent": "array", "MapEvent": "map", "TextEvent": "text"}


def wrap(raw: Any, doc: Doc) -> Any:
    """A raw yrs value (as an event's delta or a raw read gives it) as pycrdt's class for it.

    Lists and dicts are wrapped in place. Readers subscribe to raw events to avoid pycrdt
    wrapping every attribute of every event up front (design §7.1, crdtchat.view), and wrap
    only what they read.
    """
    return process_event(raw, doc)


def raw_event_kind(event: Any) -> str:
    """ "array", "map" or "text" for a raw yrs event, "xml" for any other."""
    return _RAW_EVENT_KINDS.get(type(event).__name__, "xml")


def raw_transaction(txn: Transaction) -> Any:
    """The yrs transaction behind a pycrdt one (`Transaction._txn`): raw reads take it, and they
    skip wrapping each value in a pycrdt class."""
    return txn._txn


def in_transaction(doc: Doc) -> bool:
    """Whether a transaction is open on `doc` (`Doc._txn`): a write alone in its transaction
    lets the view take it without asking yrs for the delta."""
    return doc._txn is not None


def subscriptions(owner: Doc | BaseType) -> list[Subscription]:
    """The subscriptions pycrdt holds for `owner` (`_subscriptions`), as a copy: closing a
    conversation drops those made on its roots, whoever made them."""
    return list(owner._subscriptions)


def read_transaction(doc: Doc, raw_txn: Any) -> AbstractContextManager[Any]:
    """Make `doc` usable inside a raw observer running in yrs's transaction `raw_txn`
    (`Doc._read_transaction`), as pycrdt's own deep observer does."""
    return doc._read_transaction(raw_txn)


def report_to_commit(doc: Doc, error: Exception) -> None:
    """Raise `error` where the transaction that ran a raw observer ends (`Doc._exceptions`), as
    pycrdt does for its own observers: an exception must not cross yrs's commit."""
    doc._exceptions.append(error)


def root_count(doc: Doc) -> int:
    """How many roots `doc` has (`Doc._doc.roots`), without wrapping each one as `doc.keys()`
    would (and pycrdt's wrapping of an unknown root type guesses)."""
    with doc.transaction() as txn:
        return len(doc._doc.roots(raw_transaction(txn)))


def is_panic(error: BaseException) -> bool:
    """Whether `error` is a Rust panic surfaced by pyo3 (`pyo3_runtime.PanicException`).

    pyo3 creates that class at run time in a module that cannot be imported, so it is known by
    its name. It derives from BaseException: an `except Exception` misses it, and yrs panics on
    some inputs (`merge_updates` on some histories, docs/testing.md).
    """
    return type(error).__name__ == "PanicException"
