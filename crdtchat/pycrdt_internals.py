"""Every place crdtchat depends on pycrdt beyond its public API, in one module.

pycrdt's public API cannot do a few things crdtchat needs (see each function for why), so
these reach into its private attributes and into pyo3's behaviour. Keeping them here means a
pycrdt upgrade breaks one module, and tests/document/test_pycrdt_internals.py says which
attribute moved. pyproject.toml pins pycrdt below its next minor version for the same reason.
"""

from __future__ import annotations


def is_panic(error: BaseException) -> bool:
    """Whether `error` is a Rust panic surfaced by pyo3 (`pyo3_runtime.PanicException`).

    pyo3 creates that class at run time in a module that cannot be imported, so it is known by
    its name. It derives from BaseException: an `except Exception` misses it, and yrs panics on
    some inputs (`merge_updates` on some histories, docs/testing.md).
    """
    return type(error).__name__ == "PanicException"
