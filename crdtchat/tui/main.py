"""`crdtchat chat ROOM`: open this device's replica of the room and run the chat screen.

Without a room, the person's conversation list comes first (`crdtchat.tui.rooms`), with an
identity token; the room chosen there opens in the chat screen, and quitting it goes back.

The author is the subject of the token (design §4): the relay refuses writes in any other
name, so the client never asks for one. The replica's SQLite file lives under
`$CRDTCHAT_HOME` (default `~/.local/share/crdtchat`), one per room and device, locked while
in use: two clients on one machine get two device names instead of sharing pending state.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio
from pycrdt import Map

from crdtchat.document import Conversation
from crdtchat.errors import ConfigError
from crdtchat.local_store import read_view
from crdtchat.relays import RelayURLError, relay_urls, starting_at
from crdtchat.schema import MEMBERS, ROOM_NAME, person_room
from crdtchat.tokens import TokenError, read_claims_unverified
from crdtchat.tui.app import ChatApp
from crdtchat.tui.blobs import BlobUploader
from crdtchat.tui.link import ReplicaLink
from crdtchat.tui.presence import local_state
from crdtchat.view import SnapshotError, ViewSnapshot

if TYPE_CHECKING:
    from crdtchat.replica import Replica, ReplicaStatus

# How long the chat waits for its first screen (the saved one) before loading the document.
FIRST_SCREEN_WAIT = 2.0

TOKEN_VARIABLE = "CRDTCHAT_TOKEN"
HOME_VARIABLE = "CRDTCHAT_HOME"
DEVICE_VARIABLE = "CRDTCHAT_DEVICE"
MAX_DEVICES_PER_HOST = 16


class SetupError(ConfigError):
    """Why the client cannot start, in one line for stderr (exit status 1)."""


@dataclass(frozen=True)
class TokenSubject:
    room: str | None  # None: an identity token, which opens the rooms its person belongs to
    role: str | None  # None with an identity token: the room's membership decides
    sub: str


def read_token_subject(token: str) -> TokenSubject:
    """The claims a client needs, read without the secret (the relay checks the signature)."""
    try:
        claims = read_claims_unverified(token.strip())
    except TokenError as error:
        raise SetupError(f"{TOKEN_VARIABLE} is not a crdtchat token ({error})") from None
    return TokenSubject(room=claims.room, role=claims.role, sub=claims.sub)


def data_home() -> Path:
    configured = os.environ.get(HOME_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "crdtchat"


@contextlib.contextmanager
def claim_device(home: Path, room: str, device: str) -> Iterator[tuple[str, Path]]:
    """A device name free on this machine for `room`, with its store path, locked until exit."""
    home.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, MAX_DEVICES_PER_HOST + 1):
        name = device if attempt == 1 else f"{device}-{attempt}"
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        store = home / f"{room}@{safe}.sqlite"
        lock: IO[bytes] = open(store.with_suffix(".lock"), "wb")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        try:
            yield name, store
        finally:
            lock.close()
        return
    raise SetupError(f"{MAX_DEVICES_PER_HOST} clients of room {room} already run here")


def chat_command(args: argparse.Namespace) -> int:
    # Reported here rather than through crdtchat.cli.CommandError: under `python -m crdtchat.cli`
    # that class exists twice (as __main__ and as crdtchat.cli) and would escape as a traceback.
    try:
        return _chat(args)
    except SetupError as error:
        print(f"crdtchat chat: {error}", file=sys.stderr)
        return 1


def relays_option(value: str) -> tuple[str, ...]:
    """`--relay`: one ws:// or wss:// base URL, or several, comma-separated (design §6)."""
    try:
        return relay_urls(value)
    except RelayURLError as error:
        raise SetupError(
            f"--relay must be ws:// or wss:// URLs, comma-separated; {error}"
        ) from None


def _chat(args: argparse.Namespace) -> int:
    if args.room is None:
        return _rooms_then_chat(args)
    room: str = args.room
    if not ROOM_NAME.fullmatch(room):
        raise SetupError(f"invalid room name {room!r}: 1-128 characters of A-Za-z0-9._-")
    relays = relays_option(args.relay)
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if not token:
        raise SetupError(f"{TOKEN_VARIABLE} is not set (get one with `crdtchat token`)")
    subject = read_token_subject(token)
    if subject.room not in (None, "*", room):
        raise SetupError(f"the token is for room {subject.room!r}, not {room!r}")
    device = (
        getattr(args, "device", None)
        or os.environ.get(DEVICE_VARIABLE)
        or socket.gethostname()
        or "device"
    )
    home = data_home()
    with claim_device(home, room, device) as (device_name, store_path):
        _log_to(home / "chat.log")
        anyio.run(_run, relays, room, token, subject, device_name, store_path, backend="asyncio")
    return 0


def _rooms_then_chat(args: argparse.Namespace) -> int:
    """No room given: the person's conversation list, then the chosen room, then the list
    again, until the list is quit."""
    relays = relays_option(args.relay)
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if not token:
        raise SetupError(f"{TOKEN_VARIABLE} is not set (get one with `crdtchat token --sub`)")
    subject = read_token_subject(token)
    if subject.room is not None:
        raise SetupError("the conversation list needs an identity token (crdtchat token --sub)")
    device = getattr(args, "device", None) or os.environ.get(DEVICE_VARIABLE) or "device"
    home = data_home()
    while True:
        with claim_device(home, person_room(subject.sub), device) as (_, store_path):
            _log_to(home / "chat.log")
            chosen, current = anyio.run(_run_rooms, relays, token, store_path, backend="asyncio")
        if chosen is None:
            return 0
        relays = starting_at(relays, current)  # the relay that answered last, first
        device_option = getattr(args, "device", None)
        _chat(argparse.Namespace(room=chosen, relay=",".join(relays), device=device_option))


async def _run_rooms(
    relays: tuple[str, ...], token: str, store_path: Path
) -> tuple[str | None, str]:
    """The room chosen in the list (None: quit), and the relay the list was using."""
    from crdtchat.conversations import ConversationList, list_replica
    from crdtchat.tui.rooms import RoomsApp, relay_share

    replica = list_replica(relays, token, store_path=store_path)
    app = RoomsApp(ConversationList(replica.doc), share=relay_share(lambda: replica.url, token))
    async with replica:
        return await app.run_async(), replica.url


async def _run(
    relays: tuple[str, ...],
    room: str,
    token: str,
    subject: TokenSubject,
    device: str,
    store_path: Path,
) -> None:
    conversation = Conversation(
        author=subject.sub,
        role=subject.role if subject.role in ("reader", "writer", "worker") else None,  # type: ignore[arg-type]
    )
    with conversation:  # drops its observers when the chat ends (issue 12)
        await _run_chat(conversation, relays, room, token, subject, device, store_path)


async def _run_chat(
    conversation: Conversation,
    relays: tuple[str, ...],
    room: str,
    token: str,
    subject: TokenSubject,
    device: str,
    store_path: Path,
) -> None:
    from crdtchat.replica import Replica  # lazily: keeps `crdtchat --help` light

    replica = Replica(
        relays,
        room,
        token,
        doc=conversation.doc,
        store_path=store_path,
        presence=local_state(subject.sub, device, False),
        view=conversation.view,  # keeps a snapshot of the screen for the next open
    )
    app = ChatApp(
        conversation,
        ReplicaLink(replica),
        room=room,
        device=device,
        uploader=BlobUploader(lambda: replica.url, room, token),  # follows a failover
        read_only=subject.role == "reader",
        preview=saved_screen(store_path),
    )
    # The app starts first and shows the saved screen; the replica then loads the document
    # from its file (a long conversation takes a while) and the app redraws from it.
    app_done = anyio.Event()

    async def run_app() -> None:
        try:
            await app.run_async()
        finally:
            app_done.set()

    # An identity token carries no role: the room's membership gives it, and may change.
    unfollow = (
        follow_membership(conversation, app, subject.sub, replica) if subject.room is None else None
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_app)
            with anyio.move_on_after(FIRST_SCREEN_WAIT):  # a bound, in case the app never draws
                await app.updated.wait()
            async with replica:
                await app_done.wait()
    finally:
        if unfollow is not None:
            unfollow()


ROLE_UNKNOWN = "your role in this room is not known yet (the room has not synced): read until it is"
NOT_A_MEMBER = "you are not a member of this room: you can read what this device has"
READER = "you are a reader in this room: you can read, switch branches and export"


def follow_membership(
    conversation: Conversation, app: ChatApp, sub: str, replica: Replica | None = None
) -> Callable[[], None]:
    """Keep the chat's role (what it lets the person write) to `sub`'s role in the room's
    `access.members`, as the relay enforces it (design §4); returns the undo.

    Until the members are read after `replica` has synced with the relay (a local file may
    hold an older membership), the chat is a reader: a write the relay refuses would stay in
    the local replica and block its later writes until /recover."""
    members = conversation.doc.get(MEMBERS, type=Map)
    synced = replica is None or replica.status.synced

    def apply(_event: object = None) -> None:
        entry = members.get(sub) if synced else None
        role = entry.get("role") if isinstance(entry, dict) else None
        writes = role in ("owner", "writer")
        conversation.role = "writer" if writes else "reader"
        app.read_only = not writes
        if role == "reader":
            app.read_only_reason = READER
        elif not writes:
            app.read_only_reason = NOT_A_MEMBER if synced and len(members) else ROLE_UNKNOWN

    def on_status(status: ReplicaStatus) -> None:
        nonlocal synced
        if status.synced and not synced:
            synced = True  # from now on the members are the relay's (kept while offline)
            apply()

    def reopened(new: Conversation) -> None:
        """/recover replaced the document: follow the members of the new one."""
        nonlocal conversation, members, subscription
        members.unobserve(subscription)
        conversation, members = new, new.doc.get(MEMBERS, type=Map)
        subscription = members.observe(apply)
        apply()

    apply()
    subscription = members.observe(apply)
    unwatch = replica.on_status(on_status) if replica is not None else None
    app.reopened.append(reopened)

    def undo() -> None:
        members.unobserve(subscription)
        app.reopened.remove(reopened)
        if unwatch is not None:
            unwatch()

    return undo


def saved_screen(store_path: Path) -> ViewSnapshot | None:
    """The replica file's view snapshot, if it has a readable one (else the app shows the
    document once it has loaded)."""
    data = read_view(store_path)
    if data is None:
        return None
    try:
        return ViewSnapshot.decode(data)
    except SnapshotError as error:
        logging.getLogger(__name__).warning("ignoring the saved screen: %s", error)
        return None


def _log_to(path: Path) -> None:
    """The screen belongs to Textual: warnings go to a file, not over the chat."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
