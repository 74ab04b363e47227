"""`crdtchat worker` as a subprocess in tests, against the loopback OpenAI server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import REPO
from tests.support.relay import SECRET, token


class WorkerProcess:
    """`crdtchat worker` as a subprocess that the test can SIGKILL and start again."""

    def __init__(
        self,
        sub: str,
        relays: str,
        model_url: str,
        log_dir: Path,
        *,
        lease_ttl: float | None = 1.5,
        idle_after: float = 3.0,
    ) -> None:
        """`relays`: the `--relay` value (one base URL or a comma-separated list)."""
        self.sub = sub
        self.env = {
            **os.environ,
            "CRDTCHAT_TOKEN": token("*", "worker", sub),
            "CRDTCHAT_SECRET": SECRET,
            "OPENAI_BASE_URL": model_url,
            "OPENAI_API_KEY": "test",
            "PYTHONUNBUFFERED": "1",
        }
        self.args = [
            sys.executable,
            *("-m", "crdtchat.cli", "worker", "--provider", "openai-chat"),
            *("--relay", relays, "--idle-after", f"{idle_after:g}"),
        ]
        if lease_ttl is not None:
            self.args += ["--lease-ttl", f"{lease_ttl:g}"]
        self.log_path = log_dir / f"{sub}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=log, stderr=log)

    def kill_and_restart(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
