"""A local crdtchat deployment in subprocesses: a relay, workers, tokens.

`crdtchat demo` and the scripts in demos/ use it, so that what they show is the real thing:
the relay and the workers run exactly as `crdtchat serve` and `crdtchat worker` would, and can
be killed and restarted like any process.
"""

from __future__ import annotations

import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from crdtchat.tokens import mint_token

LISTENING = re.compile(r"crdtchat relay listening on wss?://([^:\s]+):(\d+)")
SECRET_FILE = "demo-secret"


def load_or_create_secret(data: Path) -> str:
    """A secret kept beside the data, so a second terminal can mint tokens for this relay."""
    data.mkdir(parents=True, exist_ok=True)
    path = data / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


def wait_until_listening(
    proc: subprocess.Popen[str], timeout: float, pattern: re.Pattern[str] = LISTENING
) -> int:
    """The port from the first stdout line matching `pattern` (the relay's "listening on").

    One launcher reads it for the demo, the tests and the benchmarks: the port is 0 until the
    server has bound it, and the line is the event that says it has. RuntimeError if the
    process exits first or says nothing within `timeout` seconds; the caller holds the log.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise RuntimeError(f"no listening line within {timeout:g} s")
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"exited with {proc.wait()} before listening")
            match = pattern.search(line)
            if match:
                return int(match.group(2))


def stop_process(proc: subprocess.Popen[str], timeout: float) -> None:
    """SIGTERM, so that a relay or worker shuts down as in production; SIGKILL if it has not
    within `timeout` seconds. Then the stdout pipe is closed (it may have been read from)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class ManagedProcess:
    """One child process with its log file; SIGTERM then SIGKILL on stop."""

    name: str
    args: list[str]
    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen[str] | None = None

    def start(self, *, capture_stdout: bool = False) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                self.args,
                env=dict(self.env),
                stdout=subprocess.PIPE if capture_stdout else log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,  # Ctrl-C in the terminal goes to us; we stop them
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)


@dataclass
class LocalStack:
    """A relay on a free (or given) port with its data in `data`, plus any workers.

    Use as a context manager; everything started is stopped on exit.
    """

    data: Path
    port: int = 0
    host: str = "127.0.0.1"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    relay: ManagedProcess | None = None
    workers: dict[str, ManagedProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.secret = load_or_create_secret(self.data)
        self.logs = self.data / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def env(self, **more: str) -> dict[str, str]:
        return {
            **os.environ,
            "CRDTCHAT_SECRET": self.secret,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
            **more,
        }

    def token(self, room: str, role: str, sub: str, ttl: float = 7 * 24 * 3600) -> str:
        return mint_token(self.secret, room, role, sub, ttl)

    def start_relay(self, timeout: float = 30.0, extra_args: tuple[str, ...] = ()) -> None:
        """Start (or restart, on the same port) the relay; returns once it listens."""
        self.relay = ManagedProcess(
            "relay",
            [
                sys.executable,
                "-m",
                "crdtchat.cli",
                "serve",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--data",
                str(self.data / "relay"),
                *extra_args,
            ],
            self.env(),
            self.logs / "relay.log",
        )
        self.relay.start(capture_stdout=True)
        proc = self.relay.proc
        assert proc is not None
        try:
            self.port = wait_until_listening(proc, timeout)
        except RuntimeError as error:
            self.relay.kill()
            raise RuntimeError(
                f"the relay did not start ({error}); see {self.relay.log_path}"
            ) from None

    def start_worker(
        self,
        name: str,
        *,
        provider: str = "local",
        model: str | None = None,
        lease_ttl: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        args = [
            sys.executable,
            "-m",
            "crdtchat.cli",
            "worker",
            "--relay",
            self.url,
            "--provider",
            provider,
            "--lease-ttl",
            str(lease_ttl),
        ]
        if model is not None:
            args += ["--model", model]
        worker = ManagedProcess(
            name,
            args,
            self.env(CRDTCHAT_TOKEN=self.token("*", "worker", name), **(env or {})),
            self.logs / f"{name}.log",
        )
        worker.start()
        self.workers[name] = worker
        return worker

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        if self.relay is not None:
            self.relay.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
