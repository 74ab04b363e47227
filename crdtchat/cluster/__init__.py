"""Cluster mode: relay nodes that share rooms through NATS JetStream (docs/cluster.md).

One job per module: `names` (subjects, streams, buckets; room names as subject tokens),
`connection` (connecting, the stream and its replicas), `roomlog` (a room's log: conditional
appends, snapshot plus tail, live follow, roll-ups), `room` (a room on a node: a copy fed by
the stream, writes judged against it once caught up), `feed` (rooms waiting for a reply, in a KV
bucket), `blobs` (the object store), `presence` (awareness across nodes, node heartbeats),
`quotas` (per-subject quotas counted across nodes) and `metrics` (what `/healthz` and
`/metrics` show), `node` (all of it for one relay node, started and stopped as one), `memory`
(an in-process stand-in for the stream, for state machines); `local` runs nats-server
processes on loopback for the tests and benchmarks. Needs the `cluster` extra (nats-py).
"""
