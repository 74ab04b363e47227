"""crdtchat: local-first LLM conversations as Yjs-compatible CRDT documents.

What an embedding program needs is importable from here (docs/api.md): `Conversation` (the
document), `Replica` (a copy kept in sync through a relay) and its `ReplicaStatus`, the
validated message, derived and transport types of the schema, tokens, and the exception tree
rooted at `CrdtchatError`. Anything else is internal and may change without notice.
"""

from crdtchat.conversations import ConversationList, Entry, person_room
from crdtchat.document import FOLLOW_CURRENT, Conversation, PeerRole, Waiting, derived_key
from crdtchat.errors import (
    CommandError,
    ConfigError,
    ConversationError,
    CrdtchatError,
    LocalProtocolError,
    ProtocolError,
    ProviderError,
    RemoteProtocolError,
    StorageError,
    TokenError,
)
from crdtchat.prefix import prefix_hash
from crdtchat.replica import Backoff, Replica, ReplicaStatus
from crdtchat.schema import (
    SCHEMA_VERSION,
    CancelRequest,
    DerivedEntry,
    DerivedKind,
    FileRef,
    Lease,
    Message,
    Meta,
    ModelRef,
    Problem,
    RegenerateRequest,
    Role,
    Settings,
    Status,
    ToolCall,
    ToolSpec,
    assistant_turn_id,
)
from crdtchat.tokens import (
    ANY_ROOM,
    TokenClaims,
    TokenRole,
    mint_token,
    parse_claims,
    read_claims_unverified,
    verify_token,
)

__all__ = [
    "ANY_ROOM",
    "FOLLOW_CURRENT",
    "SCHEMA_VERSION",
    "Backoff",
    "CancelRequest",
    "CommandError",
    "ConfigError",
    "Conversation",
    "ConversationError",
    "ConversationList",
    "CrdtchatError",
    "DerivedEntry",
    "DerivedKind",
    "Entry",
    "FileRef",
    "Lease",
    "LocalProtocolError",
    "Message",
    "Meta",
    "ModelRef",
    "PeerRole",
    "Problem",
    "ProtocolError",
    "ProviderError",
    "RegenerateRequest",
    "RemoteProtocolError",
    "Replica",
    "ReplicaStatus",
    "Role",
    "Settings",
    "Status",
    "StorageError",
    "TokenClaims",
    "TokenError",
    "TokenRole",
    "ToolCall",
    "ToolSpec",
    "Waiting",
    "assistant_turn_id",
    "derived_key",
    "mint_token",
    "parse_claims",
    "person_room",
    "prefix_hash",
    "read_claims_unverified",
    "verify_token",
]
