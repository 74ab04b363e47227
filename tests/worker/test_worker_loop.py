"""The worker process runs on uvloop, as the relay does (`crdtchat.worker.main.loop_options`)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.worker import WorkerProcess


def test_the_worker_process_runs_on_uvloop(tmp_path: Path) -> None:
    # Nothing listens at the relay URL: the worker says which loop it runs on before it
    # connects, and keeps retrying the feed after that.
    worker = WorkerProcess("worker-1", "ws://127.0.0.1:9", "http://127.0.0.1:9/v1", tmp_path)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "event loop" not in line and time.monotonic() < deadline:
            assert worker.proc is not None and worker.proc.poll() is None, (
                worker.log_path.read_text()
            )
            text = worker.log_path.read_text()
            line = next((x for x in text.splitlines() if "event loop" in x), "")
            time.sleep(0.1)  # polling the child's log: it has no other way to tell
        assert "event loop uvloop" in line, worker.log_path.read_text()
    finally:
        worker.stop()
