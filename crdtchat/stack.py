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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from crdtchat.lifetime import ClosesOnExit
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


class RelaySubprocess:
    """The relay as a child process, started as in production: one launcher for the demo, the
    tests (`tests.support.relay.RelayProcess`) and the benchmarks (`benchmarks._support`).

    `start()` returns once the relay listens; the port it bound (0 asks for a free one) is kept,
    so `restart()` comes back on the same port with the same data. stdout is read for the
    "listening on" line; stderr, where the relay logs, goes to `log_path`.
    """

    def __init__(
        self,
        data: Path,
        secret: str,
        extra_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        use_cli: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.data = Path(data)
        self.extra_args = list(extra_args)
        self.host = host
        self.port = port
        self.use_cli = use_cli  # `crdtchat serve` instead of `python -m crdtchat.relay.main`
        self.env = {**os.environ, "CRDTCHAT_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        self.env.update(env or {})
        self.cwd = cwd
        self.log_path = log_path or self.data.parent / f"{self.data.name}-relay.log"
        self.new_session = new_session  # the demo's: Ctrl-C in the terminal stops us, not it
        self.proc: subprocess.Popen[str] | None = None

    def command(self) -> list[str]:
        module = ["-m", "crdtchat.cli", "serve"] if self.use_cli else ["-m", "crdtchat.relay.main"]
        return [
            sys.executable,
            *module,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--data",
            str(self.data),
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> Self:
        """Start the relay and wait for its "listening on" line; RuntimeError with the log if it
        exits or stays silent for `timeout` seconds."""
        assert not self.running, "the relay is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=self.new_session,
            )
        try:
            self.port = wait_until_listening(self.proc, timeout)
        except RuntimeError as error:
            self.kill()
            raise RuntimeError(f"the relay did not start ({error}); log:\n{self.log()}") from None
        return self

    def log(self) -> str:
        """What the relay has logged so far (empty before it starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ws_base(self) -> str:
        """The relay's websocket base URL, without a room: what a `Replica` takes."""
        return f"ws://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, only what was committed survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the graceful shutdown; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def restart(self) -> Self:
        """SIGKILL and start again on the same port and data."""
        self.kill()
        return self.start()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, SIGKILL after `timeout` seconds (`stop_process`)."""
        if self.proc is not None:
            stop_process(self.proc, timeout)


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
class LocalStack(ClosesOnExit):
    """A relay on a free (or given) port with its data in `data`, plus any workers.

    Use as a context manager; everything started is stopped on exit.
    """

    data: Path
    port: int = 0
    host: str = "127.0.0.1"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    relay: RelaySubprocess | None = None
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
        self.relay = RelaySubprocess(
            self.data / "relay",
            self.secret,
            extra_args,
            host=self.host,
            port=self.port,
            use_cli=True,
            env=self.env(),
            log_path=self.logs / "relay.log",
            new_session=True,
        )
        self.port = self.relay.start(timeout).port

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

    close = stop  # `with LocalStack(...)` stops everything on the way out (ClosesOnExit)
