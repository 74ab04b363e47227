"""Connections opened all at once wait in the kernel's queue until the relay accepts them.

A worker that learns of 200 waiting rooms opens 200 connections within a few milliseconds.
With asyncio's default listen backlog of 100 the kernel dropped the SYNs past the hundredth,
and those clients retried one second later: a quarter of the replies started late and their
tokens arrived late all the way through (issue 16, `benchmarks/concurrent_replies.py`).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from pathlib import Path

import httpx

from tests.support.relay import running_relay

BURST = 300  # more than asyncio's default backlog (100), as many as a busy worker opens


def test_a_burst_of_connections_is_queued_while_the_relay_is_busy(tmp_path: Path) -> None:
    with running_relay(tmp_path) as relay:
        # Stopped, the relay accepts nothing: every handshake the kernel completes on its own
        # is one the listen backlog had room for. (Busy is the same, only shorter.)
        os.kill(relay.pid, signal.SIGSTOP)
        clients: list[socket.socket] = []
        try:
            for _ in range(BURST):
                client = socket.socket()
                client.setblocking(False)
                client.connect_ex((relay.host, relay.port))
                clients.append(client)
            waiting = set(clients)
            # Loopback handshakes take microseconds. A SYN dropped at a full queue stays
            # dropped when retried: the stopped relay empties nothing, so waiting longer only
            # keeps a loaded machine from failing this for being slow.
            deadline = time.monotonic() + 10
            while waiting and (left := deadline - time.monotonic()) > 0:
                _, connected, _ = select.select([], list(waiting), [], left)
                waiting -= set(connected)
            not_queued = len(waiting)
            assert not_queued == 0, f"{not_queued} of {BURST} connections were not queued"
            assert all(c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for c in clients)
        finally:
            os.kill(relay.pid, signal.SIGCONT)
            for client in clients:
                client.close()
        # It serves on after the burst (the clients above closed without a request).
        assert httpx.get(f"{relay.http_url}/metrics", timeout=30).status_code == 200
