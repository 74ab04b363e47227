"""Relay options beyond design §6, for `crdtchat serve` and `python -m crdtchat.relay.main`."""

from __future__ import annotations

import argparse

# argparse destination -> (RelayConfig field, type, help)
EXTRA_OPTIONS: dict[str, tuple[str, type, str]] = {
    "rate": ("rate_messages", float, "sustained messages per second per connection"),
    "burst": ("rate_burst", float, "messages a connection may send at once"),
    "byte_rate": ("rate_bytes", float, "sustained bytes per second per connection"),
    "idle_unload": ("idle_unload", float, "seconds an unused room stays in memory"),
    "max_rooms": ("max_rooms", int, "rooms loaded at once (then idle ones unload early)"),
    "trim_interval": (
        "trim_interval",
        float,
        "seconds between giving freed memory back to the system after room unloads (0: never)",
    ),
    "ping_interval": ("ping_interval", float, "seconds between keepalive pings"),
    "store_commit_delay": (
        "store_commit_delay",
        float,
        "seconds the store waits for more writes before a commit, under load (0: never)",
    ),
    "listen_backlog": (
        "listen_backlog",
        int,
        "connections the kernel queues until the relay accepts them (capped by somaxconn)",
    ),
    "compact_updates": ("compact_updates", int, "compact a room's log after this many updates"),
    "compact_bytes": ("compact_min_bytes", int, "... or after this many bytes"),
    "max_blob": ("max_blob", int, "largest blob upload, bytes"),
    "blob_uploads_per_subject": (
        "blob_uploads_per_subject",
        int,
        "blob uploads in progress at once per token subject",
    ),
    "blob_uploads_total": ("blob_uploads_total", int, "blob uploads in progress at once in all"),
    "blob_downloads_per_subject": (
        "blob_downloads_per_subject",
        int,
        "blob downloads in progress at once per token subject",
    ),
    "blob_downloads_total": (
        "blob_downloads_total",
        int,
        "blob downloads in progress at once in all",
    ),
    "blob_stall_timeout": (
        "blob_stall_timeout",
        float,
        "seconds without a byte moving before a blob transfer is cut",
    ),
    # design §7.3
    "awareness_clients": ("awareness_clients", int, "awareness client ids per connection"),
    "awareness_bytes": ("awareness_state_bytes", int, "largest awareness state, bytes"),
    "awareness_depth": ("awareness_depth", int, "deepest JSON nesting of an awareness state"),
    "awareness_rate": ("awareness_rate", float, "awareness messages per second per connection"),
    "awareness_burst": ("awareness_burst", float, "awareness messages sent at once"),
    # design §7.4
    "subject_connections": ("subject_connections", int, "open connections per token subject"),
    "refusal_rate": ("refusal_rate", float, "refused writes per second per subject"),
    "refusal_burst": ("refusal_burst", float, "refused writes a subject may have at once"),
    "quota_rooms": ("quota_rooms", float, "rooms a subject may create per --quota-interval"),
    "quota_bytes": ("quota_bytes", float, "bytes a subject may write per --quota-interval"),
    "quota_interval": ("quota_interval", float, "seconds over which room and byte quotas refill"),
    "max_document": ("max_document", int, "largest room document (snapshot + log), bytes"),
    # design §7.1
    "max_depth": ("max_depth", int, "shared types nested below a root (0: unbounded)"),
    "max_entries": ("max_entries", int, "entries written into one nested Map/Array (0: any)"),
    "max_value_bytes": ("max_value_bytes", int, "bytes of one stored value (0: unbounded)"),
    # design §6, Web client
    "tls_cert": ("tls_cert", str, "PEM certificate chain: serve wss:// and https://"),
    "tls_key": ("tls_key", str, "PEM private key of --tls-cert"),
    # docs/cluster.md
    "nats": ("nats", str, "cluster mode: NATS servers, comma-separated (or CRDTCHAT_NATS_URL)"),
    "nats_replicas": ("nats_replicas", int, "replicas of the room stream this node creates"),
}


def add_extra_options(parser: argparse.ArgumentParser) -> None:
    for dest, (_, kind, help_text) in EXTRA_OPTIONS.items():
        parser.add_argument("--" + dest.replace("_", "-"), type=kind, default=None, help=help_text)
    parser.add_argument(
        "--trust",
        default=None,
        metavar="FILE",
        help="JSON file of identity providers whose tokens are accepted (design §4)",
    )
