"""crdtchat.pycrdt_internals against the installed pycrdt: one test per private name it uses.

When a pycrdt upgrade moves one of them, the failing test says which attribute and what
crdtchat needs it for, instead of an AttributeError deep inside the view or the relay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Array, Doc, Map, Text, XmlFragment, merge_updates

from crdtchat import pycrdt_internals as internals
from tests.support.updates import PANICKING_HISTORY

PYCRDT = version("pycrdt")


@contextmanager
def uses(attribute: str) -> Iterator[None]:
    """Turn a missing or reshaped pycrdt attribute into a failure that names it."""
    try:
        yield
    except (AttributeError, TypeError, ImportError) as error:
        pytest.fail(
            f"pycrdt {PYCRDT} changed {attribute}, which crdtchat.pycrdt_internals uses: {error!r}",
            pytrace=False,
        )


def read_raw_event(root: Array | Map, write: Callable[[], None]) -> tuple[str, Any]:
    """What an observer on `root.integrated` reads of the one raw yrs event `write` fires
    (a raw event is valid only inside its callback): its kind and its wrapped delta or keys."""
    doc = root.doc
    seen: list[tuple[str, Any]] = []

    def observer(event: Any) -> None:
        kind = internals.raw_event_kind(event)
        seen.append((kind, internals.wrap(event.delta if kind == "array" else event.keys, doc)))

    subscription = root.integrated.observe(observer)
    write()
    subscription.drop()
    (only,) = seen
    return only


def test_the_pin_covers_the_installed_pycrdt() -> None:
    """pyproject.toml's bound is the version these names were checked against."""
    major, minor = (int(part) for part in PYCRDT.split(".")[:2])
    assert (major, minor) == (0, 14), f"pycrdt {PYCRDT}: re-check crdtchat.pycrdt_internals"


def test_raw_transaction_reads_raw_values() -> None:
    doc = Doc()
    messages = doc.get("m", type=Map)
    messages["nested"] = Map({"a": 1})
    messages["plain"] = 1
    with uses("Transaction._txn"), doc.transaction() as txn:
        handle = internals.raw_transaction(txn)
        raw = messages.integrated
        assert sorted(raw.keys(handle)) == ["nested", "plain"]
        assert isinstance(raw.get(handle, "nested"), internals.RawMap)
        assert not isinstance(raw.get(handle, "plain"), internals.RAW_CONTAINERS)


def test_raw_containers_are_the_integrated_classes() -> None:
    """`pycrdt._pycrdt` classes are what `.integrated` returns for each container type."""
    doc = Doc()
    with uses("pycrdt._pycrdt's Array, Map, XmlFragment classes"):
        for name, kind in (("a", Array), ("m", Map), ("x", XmlFragment)):
            assert isinstance(doc.get(name, type=kind).integrated, internals.RAW_CONTAINERS)
        assert not isinstance(doc.get("t", type=Text).integrated, internals.RAW_CONTAINERS)


def test_in_transaction_follows_doc_txn() -> None:
    doc = Doc()
    with uses("Doc._txn"):
        assert not internals.in_transaction(doc)
        with doc.transaction():
            assert internals.in_transaction(doc)
        assert not internals.in_transaction(doc)


def test_subscriptions_lists_what_observe_made() -> None:
    doc = Doc()
    root = doc.get("m", type=Map)
    with uses("Doc._subscriptions and BaseType._subscriptions"):
        on_doc = doc.observe(lambda event: None)
        on_root = root.observe(lambda event: None)
        assert on_doc in internals.subscriptions(doc)
        assert internals.subscriptions(root) == [on_root]
        root.unobserve(on_root)
        assert internals.subscriptions(root) == []


def test_wrap_and_raw_event_kind_read_raw_events() -> None:
    doc = Doc()
    array = doc.get("a", type=Array)
    mapping = doc.get("m", type=Map)
    with uses("pycrdt._base.process_event and the raw event classes' names"):
        kind, delta = read_raw_event(array, lambda: array.append(Map({"k": 1})))
        assert kind == "array"
        (inserted,) = delta[0]["insert"]
        assert isinstance(inserted, Map) and isinstance(inserted, internals.BaseType)
        assert inserted.to_py() == {"k": 1}
        kind, keys = read_raw_event(mapping, lambda: mapping.update({"k": 2}))
        assert kind == "map"
        assert keys["k"]["newValue"] == 2


def test_read_transaction_and_report_to_commit_inside_a_raw_observer() -> None:
    """A raw deep observer can read the document, and its error surfaces at the commit."""
    doc = Doc()
    array = doc.get("a", type=Array)
    read: list[Any] = []

    def observer(events: list[Any]) -> None:
        with internals.read_transaction(doc, events[0].transaction):
            read.append(array.to_py())
            internals.report_to_commit(doc, LookupError("from the observer"))

    subscription = array.integrated.observe_deep(observer)
    with uses("Doc._read_transaction and Doc._exceptions"):
        with pytest.raises(ExceptionGroup) as raised:
            array.append(1)
        (error,) = raised.value.exceptions
        assert repr(error) == "LookupError('from the observer')"
        assert read == [[1.0]]
    subscription.drop()


def test_root_count_counts_roots_without_reading_them() -> None:
    doc = Doc()
    doc.get("a", type=Array)
    doc.get("m", type=Map)
    with uses("Doc._doc.roots"):
        assert internals.root_count(doc) == 2


def test_is_panic_recognises_pycrdts_panic() -> None:
    """The history that makes yrs's `merge_updates` panic (tests/testing/test_convergence.py)."""
    try:
        merge_updates(*PANICKING_HISTORY)
    except BaseException as error:
        assert internals.is_panic(error), f"pycrdt {PYCRDT} raised {type(error)!r}, not a panic"
        assert not isinstance(error, Exception)
    else:
        pytest.skip("pycrdt no longer panics here (its xfail in test_convergence says so too)")
    assert not internals.is_panic(ValueError("Cannot merge updates"))


PRIVATE_USES = ("from pycrdt._", "import pycrdt._", "._txn", "._read_transaction", "._exceptions")


def test_no_other_module_reaches_into_pycrdt() -> None:
    """The private names above are used through crdtchat.pycrdt_internals only."""
    package = Path(internals.__file__).parent
    offenders = [
        f"{path.relative_to(package.parent)}: {needle}"
        for path in sorted(package.rglob("*.py"))
        if path != Path(internals.__file__)
        for needle in PRIVATE_USES
        if needle in path.read_text()
    ]
    assert offenders == []
