"""The one way the browser test and the browser benchmark launch Chromium.

The flags keep a headless Chromium off the network (no QUIC, sync or component updates) so
that only the loopback relay is talked to, and runnable as root in CI (no sandbox).
"""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
