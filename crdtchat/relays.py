"""The relays a client may use: several base URLs, tried in turn (design §3, §6).

Every client (`Replica`, `crdtchat chat`, `crdtchat worker`) takes a list of relay base URLs,
as a sequence or as the comma-separated `--relay a,b,c` of the command line. It connects to the
first; when a connection fails or drops it moves to the next, round robin, waiting its backoff
between attempts. Any relay of a cluster serves any room, and a replica holds the whole
document, so a relay that has less of a room catches up from the replica's sync step 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from crdtchat.errors import ConfigError

# Where plain HTTP calls (blobs, sharing) go: one relay, or a function naming the current one
# (a client's `lambda: replica.url`), so that they follow the replica when it moves.
RelaySource = str | Callable[[], str]


class RelayURLError(ConfigError, ValueError):
    """A relay URL that cannot be used; the message names it. A ValueError too, as the
    `Replica` constructor raised before lists existed."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"not a relay URL: {url!r} ({why})")
        self.url = url
        self.why = why


def relay_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """The relay base URLs in `value`, checked, without trailing slashes, in order.

    `value` is one URL, a comma-separated list of them, or a sequence. Each must be
    ``ws://HOST[:PORT][/PATH]`` or ``wss://...`` without query or fragment; a URL listed twice
    is refused too (a typo, most likely). The first bad one raises `RelayURLError`, so a
    client fails at start rather than at its first failover.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or items == [""]:
        raise RelayURLError("", "no relay URL given")
    urls: list[str] = []
    for item in items:
        url = _checked(item.strip() if isinstance(item, str) else item)
        if url in urls:
            raise RelayURLError(url, "listed twice")
        urls.append(url)
    return tuple(urls)


def _checked(url: object) -> str:
    if not isinstance(url, str):
        raise RelayURLError(repr(url), "not a string")
    if not url:
        raise RelayURLError(url, "empty entry in the list")
    if any(c.isspace() for c in url):
        raise RelayURLError(url, "contains white space")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as error:
        raise RelayURLError(url, str(error)) from None
    if parts.scheme not in ("ws", "wss"):
        raise RelayURLError(url, "must start with ws:// or wss://")
    if not parts.hostname:
        raise RelayURLError(url, "no host")
    if port == 0:
        raise RelayURLError(url, "port 0")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise RelayURLError(
            url, "a relay URL has no query or fragment (the room and token go there)"
        )
    return url.rstrip("/")


def starting_at(urls: tuple[str, ...], first: str) -> tuple[str, ...]:
    """`urls` in the same round-robin order, but starting at `first` (a relay known to answer
    now, such as the one a worker's feed is connected to); unchanged if it is not listed."""
    if first not in urls:
        return urls
    at = urls.index(first)
    return urls[at:] + urls[:at]


def current_relay(source: RelaySource) -> str:
    """The relay `source` names now."""
    return source if isinstance(source, str) else source()
