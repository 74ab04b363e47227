"""Support code for the tests and the benchmarks that reuse it: launchers, clients, fixtures."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
"""The repository's root."""
JS = REPO / "tests" / "js"
"""The node project (yjs, y-websocket) the interop tests run."""
