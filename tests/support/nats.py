"""The real NATS cluster the cluster tests run against (crdtchat/cluster/local.py), and relay
nodes on it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from crdtchat.cluster.local import NatsCluster, NatsNode, nats_cluster, nats_server_binary
from tests.support.relay import RelayProcess

__all__ = ["NatsCluster", "NatsNode", "nats_cluster", "nats_server_binary", "relay_nodes"]


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
