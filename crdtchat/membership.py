"""Sharing a conversation: the client side of the relay's membership endpoints (design §4).

The owner of a room (the identity that created it) adds and removes members and creates and
revokes invite links through plain HTTP on the relay's port, with an identity token in
`Authorization: Bearer`; anyone with an identity token redeems an invite. The relay writes the
result into the room's `access.*` roots and enforces it on every connection at once.

An invite link is `http(s)://HOST:PORT/rooms/<room>/join#invite=<secret>`: the secret rides in
the fragment, which a browser never sends to a server, and `crdtchat join LINK` (or a web
client) posts it to the same URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import httpx

from crdtchat.errors import CommandError
from crdtchat.schema import ROOM_NAME

TOKEN_VARIABLE = "CRDTCHAT_TOKEN"
GrantedRole = Literal["reader", "writer"]
_TIMEOUT = 30.0


def http_base(relay: str) -> str:
    """`ws://host:port` (or http, wss, https) as the relay's HTTP base URL."""
    parts = urlsplit(relay)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"a relay URL is ws://HOST:PORT or wss://HOST:PORT, not {relay!r}")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def _room_url(relay: str, room: str, *path: str) -> str:
    if not ROOM_NAME.fullmatch(room):
        raise ValueError(f"a room name is 1-128 of A-Za-z0-9._-, not {room!r}")
    return "/".join([http_base(relay), "rooms", quote(room), *path])


@dataclass(frozen=True)
class InviteLink:
    id: str
    link: str
    role: GrantedRole


@dataclass(frozen=True)
class Joined:
    room: str
    role: GrantedRole
    relay: str  # ws:// URL of the relay that holds the room


def _call(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    """One membership request; CommandError with the relay's one-line reason if refused."""
    try:
        response = httpx.request(
            method,
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=_TIMEOUT,
        )
    except httpx.HTTPError as error:
        raise CommandError(f"cannot reach the relay at {url}: {error}") from None
    if response.status_code >= 400:
        reason = response.text.strip().splitlines()[0] if response.text.strip() else ""
        raise CommandError(f"refused ({response.status_code}): {reason}")
    return response.json()


def share(relay: str, room: str, token: str, sub: str, role: GrantedRole) -> None:
    """Give `sub` the `role` in `room` (the token's subject must own it)."""
    _call("POST", _room_url(relay, room, "members"), token, {"sub": sub, "role": role})


def unshare(relay: str, room: str, token: str, sub: str) -> None:
    """Remove `sub` from `room`: its open connections end within the relay's next write."""
    _call("POST", _room_url(relay, room, "members"), token, {"sub": sub, "remove": True})


def invite(
    relay: str,
    room: str,
    token: str,
    role: GrantedRole,
    ttl: float | None = None,
    uses: int | None = None,
) -> InviteLink:
    """A new invite link to `room` granting `role`, optionally expiring or limited in uses."""
    answer = _call(
        "POST",
        _room_url(relay, room, "invites"),
        token,
        {"role": role, "ttl": ttl, "uses": uses},
    )
    link = f"{_room_url(relay, room, 'join')}#invite={answer['secret']}"
    return InviteLink(answer["id"], link, role)


def revoke(relay: str, room: str, token: str, invite_id: str) -> None:
    _call("DELETE", _room_url(relay, room, "invites", quote(invite_id, safe="")), token)


def parse_link(link: str) -> tuple[str, str, str]:
    """(relay ws URL, room, secret) of an invite link; ValueError if it is not one."""
    parts = urlsplit(link)
    path = parts.path.strip("/").split("/")
    secret = parts.fragment.removeprefix("invite=")
    if (
        parts.scheme not in ("http", "https")
        or len(path) != 3
        or path[0] != "rooms"
        or path[2] != "join"
        or not ROOM_NAME.fullmatch(path[1])
        or not parts.fragment.startswith("invite=")
        or not secret
    ):
        raise ValueError(
            f"not an invite link (http://HOST:PORT/rooms/<room>/join#invite=...): {link!r}"
        )
    ws = urlunsplit(("ws" if parts.scheme == "http" else "wss", parts.netloc, "", "", ""))
    return ws, path[1], secret


def join(link: str, token: str) -> Joined:
    """Redeem an invite link with an identity token: its subject becomes a member."""
    relay, room, secret = parse_link(link)
    answer = _call("POST", _room_url(relay, room, "join"), token, {"secret": secret})
    return Joined(room, answer["role"], relay)


async def accept(relay: str, token: str, room: str, timeout: float = 30.0) -> None:
    """Put `room` in the token's person's conversation list, stored by the relay."""
    from crdtchat.conversations import ConversationList, list_replica

    async with list_replica(relay, token) as replica:
        await replica.wait_until(lambda status: status.synced, timeout=timeout)
        ConversationList(replica.doc).add(room)
        await replica.wait_until(lambda status: status.durable, timeout=timeout)


# -- the commands (design §6) ---------------------------------------------------------------


def _token() -> str:
    token = os.environ.get(TOKEN_VARIABLE, "")
    if not token:
        raise CommandError(f"{TOKEN_VARIABLE} is not set: an identity token is needed")
    return token


def _usage(command: str, message: str) -> int:
    print(f"crdtchat {command}: {message}", file=sys.stderr)
    return 2


def share_command(args: argparse.Namespace) -> int:
    """`crdtchat share ROOM --relay URL --with SUB (--role ROLE | --remove)`."""
    try:
        _room_url(args.relay, args.room)
    except ValueError as error:
        return _usage("share", str(error))
    token = _token()
    if args.remove:
        unshare(args.relay, args.room, token, args.with_)
        print(f"{args.with_} removed from {args.room}")
    else:
        share(args.relay, args.room, token, args.with_, args.role)
        print(f"{args.room} shared with {args.with_} as {args.role}")
    return 0


def invite_command(args: argparse.Namespace) -> int:
    """`crdtchat invite ROOM --relay URL (--role ROLE [--ttl S] [--uses N] | --revoke ID)`."""
    try:
        _room_url(args.relay, args.room)
    except ValueError as error:
        return _usage("invite", str(error))
    if args.ttl is not None and args.ttl <= 0:
        return _usage("invite", "--ttl must be more than 0 seconds")
    if args.uses is not None and args.uses < 1:
        return _usage("invite", "--uses must be at least 1")
    token = _token()
    if args.revoke is not None:
        revoke(args.relay, args.room, token, args.revoke)
        print(f"invite {args.revoke} revoked")
        return 0
    made = invite(args.relay, args.room, token, args.role, args.ttl, args.uses)
    print(made.link)
    print(f"invite id {made.id} (revoke with --revoke {made.id})", file=sys.stderr)
    return 0


def join_command(args: argparse.Namespace) -> int:
    """`crdtchat join LINK`: redeem an invite with CRDTCHAT_TOKEN."""
    try:
        parse_link(args.link)
    except ValueError as error:
        return _usage("join", str(error))
    token = _token()
    joined = join(args.link, token)
    try:
        anyio.run(accept, joined.relay, token, joined.room)
    except TimeoutError:
        raise CommandError(
            f"joined {joined.room} as {joined.role}, but your list did not sync in time"
        ) from None
    print(f"joined {joined.room} as {joined.role}")
    print(f"open it with: crdtchat chat {joined.room} --relay {joined.relay}")
    return 0


def add_commands(commands: Any) -> None:
    """The parsers of `share`, `invite` and `join` (design §6)."""
    share_parser = commands.add_parser("share", help="share a room you own with a person")
    share_parser.add_argument("room")
    share_parser.add_argument("--relay", required=True, help="ws://HOST:PORT")
    share_parser.add_argument("--with", dest="with_", required=True, metavar="SUB")
    how = share_parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--role", choices=["reader", "writer"])
    how.add_argument("--remove", action="store_true", help="take the room back from SUB")

    invite_parser = commands.add_parser("invite", help="create or revoke an invite link")
    invite_parser.add_argument("room")
    invite_parser.add_argument("--relay", required=True, help="ws://HOST:PORT")
    what = invite_parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--role", choices=["reader", "writer"])
    what.add_argument("--revoke", metavar="ID", help="revoke the invite with this id")
    invite_parser.add_argument("--ttl", type=float, default=None, help="seconds it stays valid")
    invite_parser.add_argument("--uses", type=int, default=None, help="how many may redeem it")

    join_parser = commands.add_parser("join", help="redeem an invite link")
    join_parser.add_argument("link")
