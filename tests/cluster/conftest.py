"""One real three-node NATS cluster for the whole session (tests/support/nats.py).

Each test gets its own `Names` prefix, so its stream and buckets are its own on the shared
cluster: starting three servers per test would cost more CI time than the tests themselves.
Tests that kill a NATS node restart it before they finish (`cluster_with_a_dead_node`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from crdtchat.cluster.connection import ClusterConnection, connect
from crdtchat.cluster.names import Names
from tests.support.nats import NatsCluster, nats_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with nats_cluster(Path(tmp_path_factory.mktemp("nats"))) as running:
        yield running


@pytest.fixture
def names() -> Names:
    return Names(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def connection(cluster: NatsCluster, names: Names) -> AsyncIterator[ClusterConnection]:
    conn = await connect(cluster.urls, names=names)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def second(cluster: NatsCluster, names: Names) -> AsyncIterator[ClusterConnection]:
    """Another node's connection to the same deployment, through the last server first."""
    conn = await connect(list(reversed(cluster.urls)), names=names)
    try:
        yield conn
    finally:
        await conn.close()
