"""The real NATS cluster the cluster tests run against (crdtchat/cluster/local.py)."""

from crdtchat.cluster.local import NatsCluster, NatsNode, nats_cluster, nats_server_binary

__all__ = ["NatsCluster", "NatsNode", "nats_cluster", "nats_server_binary"]
