"""The real NATS cluster the cluster tests run against (crdtchat/cluster/local.py), and relay
nodes on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from crdtchat.cluster.local import NatsCluster, NatsNode, nats_cluster, nats_server_binary
from tests.support.relay import RelayProcess

__all__ = [
    "NatsCluster",
    "NatsNode",
    "TcpGate",
    "nats_cluster",
    "nats_server_binary",
    "relay_nodes",
]


@contextmanager
def relay_nodes(
    cluster: NatsCluster, prefix: str, directory: Path, count: int, options: Sequence[str] = ()
) -> Iterator[list[RelayProcess]]:
    """`count` relay processes on `cluster`, node i listing the NATS servers from the i-th on
    (so the nodes' connections spread over the servers), all under one subject `prefix`."""
    relays: list[RelayProcess] = []
    try:
        for index in range(count):
            servers = ",".join(cluster.urls[index:] + cluster.urls[:index])
            relay = RelayProcess(
                directory / f"node{index}",
                ["--nats", servers, *options],
                env={"CRDTCHAT_NATS_PREFIX": prefix},
            )
            relays.append(relay.start())
        yield relays
    finally:
        for relay in relays:
            relay.stop()


class TcpGate:
    """A loopback TCP forwarder to one server, which can be shut: its connections close and
    new ones are refused until it opens again. A client connected through it loses NATS when
    the test says, and gets it back when the test says, while others stay connected."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def open(self) -> None:
        """Listen (on the same port as before, once it has one)."""
        self._server = await asyncio.start_server(self._forward, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def shut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()  # one side ended: end the other
            self._writers.discard(sink)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
