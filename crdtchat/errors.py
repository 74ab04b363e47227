"""The exception tree: one root, `CrdtchatError`, and a class per concern under it.

An embedding program can catch everything crdtchat raises on purpose with `CrdtchatError`, or
one concern (`ProtocolError`, `ConversationError`, `StorageError`, `TokenError`,
`ProviderError`, `ConfigError`). The specific classes stay in the modules that raise them and
derive from one of these; classes that were `ValueError` or `RuntimeError` before still are, so
existing `except` clauses keep working. See docs/api.md.

`CommandError` lives here rather than in `crdtchat.cli` so that it is one class even when the
CLI runs as `python -m crdtchat.cli` (then that module is also `__main__`).
"""


class CrdtchatError(Exception):
    """The root of every exception crdtchat raises on purpose."""


class ProtocolError(CrdtchatError):
    """Bytes that break a protocol: the y-websocket wire, a Yjs update, an HTTP API."""


class LocalProtocolError(ProtocolError):
    """This side asked for something the protocol does not allow (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The other side sent something a correct peer never sends; drop what it sent."""


class ConversationError(CrdtchatError, ValueError):
    """A write that the document contract does not allow, refused before it is made."""


class StorageError(CrdtchatError):
    """A store (the relay's rooms or blobs, a replica's file) could not do what was asked."""


class TokenError(CrdtchatError, ValueError):
    """A token that must not be honoured; `reason` is short enough for an auth message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProviderError(CrdtchatError):
    """A configuration problem (no key, unknown model): becomes a turn with status error."""


class ConfigError(CrdtchatError):
    """What a person asked for (options, environment, a chat command) cannot be done."""


class CommandError(CrdtchatError):
    """A failure to report as one line on stderr with exit status 1."""
