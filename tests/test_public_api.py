"""The public API of `import crdtchat` (docs/api.md) and the one exception root.

The export list is pinned so that removing or renaming a name an embedding program imports is
a deliberate change of this test, not an accident. Every exception class of the project
derives from `CrdtchatError`, so `except CrdtchatError` catches whatever crdtchat raises on
purpose; a new class that forgets it fails here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import tomllib
from types import ModuleType

import crdtchat
import server
from crdtchat import errors
from tests.support import REPO

EXPORTS = {
    # the document and its validated types
    "Conversation",
    "FOLLOW_CURRENT",
    "PeerRole",
    "Waiting",
    "derived_key",
    "SCHEMA_VERSION",
    "Message",
    "Role",
    "Status",
    "ToolCall",
    "FileRef",
    "ModelRef",
    "Meta",
    "Settings",
    "ToolSpec",
    "DerivedEntry",
    "DerivedKind",
    "Lease",
    "CancelRequest",
    "RegenerateRequest",
    "Problem",
    "assistant_turn_id",
    "prefix_hash",
    # syncing through a relay
    "Replica",
    "ReplicaStatus",
    "Backoff",
    # a person's conversation list
    "ConversationList",
    "Entry",
    "person_room",
    # tokens
    "ANY_ROOM",
    "TokenClaims",
    "TokenRole",
    "mint_token",
    "parse_claims",
    "read_claims_unverified",
    "verify_token",
    # errors
    "CrdtchatError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ConversationError",
    "StorageError",
    "TokenError",
    "ProviderError",
    "ConfigError",
    "CommandError",
}


def test_the_export_list_is_pinned() -> None:
    assert set(crdtchat.__all__) == EXPORTS
    assert len(crdtchat.__all__) == len(EXPORTS), "a name is listed twice in __all__"


def test_docs_api_lists_every_export() -> None:
    """docs/api.md's table "Every export" names exactly the exports."""
    text = (REPO / "docs" / "api.md").read_text()
    table = text[text.index("## Every export") :]
    names = set()
    for row in re.findall(r"^\| (.+?) \| .+ \|$", table, flags=re.MULTILINE):
        names.update(re.findall(r"`([A-Za-z_]+)`", row))
    assert names == EXPORTS


def test_every_exported_name_resolves() -> None:
    namespace: dict[str, object] = {}
    exec("from crdtchat import *", namespace)
    assert namespace.keys() >= EXPORTS


def test_the_package_ships_its_type_hints() -> None:
    """PEP 561: `py.typed` must exist and be listed as package data, or a wheel drops it."""
    assert (REPO / "crdtchat" / "py.typed").is_file()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["crdtchat"]


def _modules(package: ModuleType) -> list[ModuleType]:
    names = [package.__name__]
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return [importlib.import_module(name) for name in names]


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for package in (crdtchat, server):
        for module in _modules(package):
            for value in vars(module).values():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == module.__name__
                ):
                    found.append(value)
    return found


def test_every_exception_class_derives_from_the_root() -> None:
    classes = _exception_classes()
    # The walk found the classes it should (it would pass vacuously if it found none).
    assert {"TokenError", "StoreError", "WireError", "PeerViolation"} <= {
        c.__name__ for c in classes
    }
    strays = [
        f"{c.__module__}.{c.__qualname__}"
        for c in classes
        if not issubclass(c, errors.CrdtchatError)
    ]
    assert not strays, f"exception classes outside CrdtchatError: {strays}"


def test_each_concern_is_one_branch_of_the_tree() -> None:
    concerns = [
        errors.ProtocolError,
        errors.ConversationError,
        errors.StorageError,
        errors.TokenError,
        errors.ProviderError,
        errors.ConfigError,
    ]
    for concern in concerns:
        assert concern.__bases__[0] is errors.CrdtchatError
        assert not any(issubclass(concern, other) for other in concerns if other is not concern)
    assert issubclass(errors.LocalProtocolError, errors.ProtocolError)
    assert issubclass(errors.RemoteProtocolError, errors.ProtocolError)


def test_classes_that_were_value_errors_still_are() -> None:
    """Existing `except ValueError` clauses (ours and embedders') keep catching them."""
    from crdtchat.document import ConversationError
    from crdtchat.tokens import TokenError
    from crdtchat.wire import WireError

    for cls in (ConversationError, TokenError, WireError):
        assert issubclass(cls, ValueError)
        assert issubclass(cls, errors.CrdtchatError)
