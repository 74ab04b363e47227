"""Property-based merge testing for crdtchat conversations (public API).

- `crdtchat.testing.operations`: writes as frozen values with `apply(conversation)`;
- `crdtchat.testing.strategies`: hypothesis strategies that draw them for a replica's state;
- `crdtchat.testing.network`: a deterministic network of replicas running the real client
  protocol, linked directly or through the real relay protocol (loss, reordering,
  duplication, partitions, crashes with a local store, relay crashes, refusals), or through
  a cluster of relay nodes over an in-process stream (`nodes=N`: conflicts, lagging nodes,
  node kills);
- `crdtchat.testing.invariants`: what must hold at quiescence;
- `crdtchat.testing.machine`: `ConversationMachine`, the state machine to subclass.

See docs/testing.md.
"""

from crdtchat.testing.invariants import (
    Reading,
    ReplicaState,
    assert_same_state,
    check_converged,
    check_kept,
    check_no_gap,
    check_quiescent,
    check_reader_rules,
    check_rebuild,
    check_round_trip,
    read_replica,
    reference_reading,
    roots_json,
)
from crdtchat.testing.machine import ConversationMachine, CreateConversation
from crdtchat.testing.network import (
    RELAY,
    Envelope,
    LocalStore,
    RelayStore,
    SimulatedNetwork,
    SimulatedNode,
    SimulatedRelay,
    SimulatedReplica,
    has_gap,
    integrates_fully,
)
from crdtchat.testing.operations import Operation, canonical_snapshot
from crdtchat.testing.profiles import register_profiles
from crdtchat.testing.strategies import (
    append_messages,
    characters,
    commits,
    deep_writes,
    derived_changes,
    duplicate_ids,
    foreign_writes,
    json_values,
    leases,
    message_ids,
    operations,
    settings_changes,
    streams,
    text_edits,
    texts,
    transport_changes,
    worker_operations,
)
from crdtchat.wire import decode_state_vector  # state vectors belong to the wire

__all__ = [
    "RELAY",
    "ConversationMachine",
    "CreateConversation",
    "Envelope",
    "LocalStore",
    "Operation",
    "Reading",
    "RelayStore",
    "ReplicaState",
    "SimulatedNetwork",
    "SimulatedNode",
    "SimulatedRelay",
    "SimulatedReplica",
    "append_messages",
    "assert_same_state",
    "canonical_snapshot",
    "characters",
    "check_converged",
    "check_kept",
    "check_no_gap",
    "check_quiescent",
    "check_reader_rules",
    "check_rebuild",
    "check_round_trip",
    "commits",
    "decode_state_vector",
    "deep_writes",
    "derived_changes",
    "duplicate_ids",
    "foreign_writes",
    "has_gap",
    "integrates_fully",
    "json_values",
    "leases",
    "message_ids",
    "operations",
    "read_replica",
    "reference_reading",
    "register_profiles",
    "roots_json",
    "settings_changes",
    "streams",
    "text_edits",
    "texts",
    "transport_changes",
    "worker_operations",
]
