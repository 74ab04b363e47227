"""Plain HTTP on the relay's port: `/healthz`, `/metrics`, and `GET`/`PUT /blobs/<room>/<sha256>`.

`/healthz` and `/metrics` are small and come through websockets' `process_request` hook, whose
`Response` carries a whole body. Blobs do not fit that: websockets parses only GET requests
without a body and answers with bodies held in memory, and a blob may be 64 MiB. So the
connection class the server uses (`RelayConnection`) looks at the first bytes of a connection
and, for `PUT ` or `GET /blobs/`, serves the request itself with h11, streaming: an upload goes
to a temporary file as it arrives (reading pauses while the disk catches up), a download is
read from disk in chunks and written as fast as the client takes them. It does so inside
websockets' handshake step, so the server still owns the connection and waits for it on
shutdown. The handshake timeout of websocket connections (`open_timeout`) is applied by
`RelayConnection` itself, not by `serve()`, since a transfer may rightly take longer; a
transfer is cut instead when no byte moves for `blob_stall_timeout` seconds (design §7.5).

Blobs are scoped to rooms (design §7.5): an upload needs a writer or worker token for the room
in its URL, and at most `blob_uploads_per_subject` uploads run at once per token subject (429)
and `blob_uploads_total` in all (503); downloads likewise (`blob_downloads_*`). A download
needs a token that may read the room, and is
served only if the room references the blob in a message's `files` and the blob was uploaded to
that room; in every other case the answer is the same 404, so it tells nothing about blobs of
other rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import os
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, ClassVar
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import anyio.to_thread
import h11
from pycrdt import Array, Doc, Map
from pydantic import BaseModel, ValidationError
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from crdtchat import schema
from crdtchat.relay.blobs import BlobStore, HttpRefusal, Upload, check_name
from crdtchat.relay.membership import (
    AccessError,
    InviteRequest,
    JoinRequest,
    MemberChange,
    change_member,
    create_invite,
    redeem,
    revoke_invite,
)
from crdtchat.relay.metrics import Metrics
from crdtchat.relay.room import Room, RoomManager, RoomUnavailable
from crdtchat.schema import ROOM_NAME
from crdtchat.shape import array_json
from crdtchat.tokens import FORBIDDEN_REASONS, TokenClaims, TokenError, TokenVerifier, refusal_text

log = logging.getLogger("crdtchat.relay.http")

_MAX_HEAD = 16 * 1024
_INBOX_HIGH = 256 * 1024  # pause reading an upload while this much waits for the disk
_CHUNK = 256 * 1024  # bytes read from disk per write of a download
_LINGER = 2.0  # seconds to discard the rest of a refused body, so the client reads the answer
_READ_SHARE = 0.1  # at most this share of the time goes to reading one room's references
_HTTP_PREFIXES = (b"PUT ", b"GET /blobs/", b"POST ", b"DELETE ")
_MAX_ACCESS_BODY = 16 * 1024  # a membership request is a small JSON object
UPLOAD_ROLES = frozenset({"writer", "worker"})
BLOB_URL = "/blobs/<room>/<sha256>"


@dataclass(frozen=True)
class HttpLimits:
    """What bounds one blob transfer and how many run at once (design §7.5)."""

    uploads_per_subject: int = 4
    uploads_total: int = 32
    downloads_per_subject: int = 8
    downloads_total: int = 64
    stall_timeout: float = 30.0  # seconds without a byte moving before a transfer is cut
    open_timeout: float | None = 60.0  # websocket handshakes (not blob transfers)


def make_response(
    status: int,
    body: bytes | str,
    content_type: str = "text/plain; charset=utf-8",
    extra: list[tuple[str, str]] | None = None,
) -> Response:
    """One complete HTTP answer on the relay's port (blob, health, access and web routes)."""
    data = body.encode("utf-8") if isinstance(body, str) else body
    code = http.HTTPStatus(status)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(data))),
            ("Content-Type", content_type),
            *(extra or []),
        ]
    )
    return Response(code.value, code.phrase, headers, data)


def _token_from(url: SplitResult, headers: Any) -> str:
    values = parse_qs(url.query).get("token")
    if values:
        return values[0]
    authorization = headers.get("authorization") or ""
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class TransferSlots:
    """Transfers of one kind in progress, per token subject and in all."""

    def __init__(self, kind: str, verb: str, per_subject: int, total: int) -> None:
        self.kind = kind  # "uploads", "downloads"
        self.verb = verb  # what the relay is doing: "receiving", "sending"
        self.per_subject = per_subject
        self.total = total
        self.active: Counter[str] = Counter()
        self.in_progress = 0

    @contextmanager
    def hold(self, subject: str) -> Iterator[None]:
        if self.active[subject] >= self.per_subject:
            raise HttpRefusal(
                429,
                f"{self.per_subject} {self.kind} of {subject!r} are in progress already; "
                "retry when one has finished",
                retry_after=1,
            )
        if self.in_progress >= self.total:
            raise HttpRefusal(
                503,
                f"the relay is {self.verb} {self.total} {self.kind} already; retry later",
                retry_after=1,
            )
        self.active[subject] += 1
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1
            self.active[subject] -= 1
            if not self.active[subject]:
                del self.active[subject]


async def verify(verifier: TokenVerifier, token: str, room: str | None) -> TokenClaims:
    """Check a token; one whose issuer's keys may need fetching is checked on a thread."""

    def check() -> TokenClaims:
        return verifier.parse(token) if room is None else verifier.verify(token, room)

    if verifier.fetches(token):
        return await anyio.to_thread.run_sync(check)
    return check()


class HttpEndpoints:
    def __init__(
        self,
        verifier: TokenVerifier | str,
        blobs: BlobStore,
        metrics: Metrics,
        rooms: RoomManager | None = None,
        limits: HttpLimits | None = None,
        health: Callable[[], str | None] | None = None,
    ) -> None:
        self.verifier = TokenVerifier(verifier) if isinstance(verifier, str) else verifier
        self.blobs = blobs
        self.metrics = metrics
        self.rooms = rooms
        self.limits = limits or HttpLimits()
        self.uploads = TransferSlots(
            "uploads", "receiving", self.limits.uploads_per_subject, self.limits.uploads_total
        )
        self.downloads = TransferSlots(
            "downloads", "sending", self.limits.downloads_per_subject, self.limits.downloads_total
        )
        self.transfers: set[RelayConnection] = set()
        # blobs each loaded room references, and the room's write count they were read at
        self._references: weakref.WeakKeyDictionary[Room, _References] = weakref.WeakKeyDictionary()
        self.health = health  # None when healthy, else the problem (e.g. the store's)

    def is_http_path(self, path: str) -> bool:
        return path in ("/healthz", "/metrics") or path.startswith(("/blobs/", "/rooms/"))

    async def get(self, request: Request, url: SplitResult) -> Response:
        """The small endpoints, answered through websockets' process_request."""
        if url.path == "/healthz":
            problem = None if self.health is None else self.health()
            if problem is not None:
                return make_response(503, f"unhealthy: {problem}\n")
            return make_response(200, "ok\n")
        if url.path == "/metrics":
            return make_response(200, self.metrics.render(), "text/plain; version=0.0.4")
        if url.path.startswith("/rooms/") and url.path.endswith("/summary"):
            return await self._summary(request, url)
        return make_response(404, f"blob URLs are {BLOB_URL}\n")

    async def _summary(self, request: Request, url: SplitResult) -> Response:
        """`GET /rooms/<room>/summary`: what a conversation list shows of a room that changes
        because others post (design §4, the list document), read from the room itself."""
        room_name = unquote(url.path.removeprefix("/rooms/").removesuffix("/summary"))
        if not ROOM_NAME.fullmatch(room_name):
            return make_response(400, "a room name is 1-128 of A-Za-z0-9._-\n")
        token = _token_from(url, request.headers)
        if not token:
            return make_response(401, "a token is required (Authorization: Bearer)\n")
        try:
            claims = await verify(self.verifier, token, None)
        except TokenError as error:
            return make_response(401, f"token refused: {refusal_text(error.reason)}\n")
        if self.rooms is None:
            return make_response(503, "this relay serves no rooms\n")
        try:
            room = await self.rooms.acquire(room_name)
        except RoomUnavailable as error:
            return make_response(503, f"room unavailable: {error}\n")
        try:
            allowed = (
                room.role_for(claims.sub) is not None
                if claims.identity
                else claims.allows_room(room_name)
            )
            if not allowed:
                return make_response(403, f"token refused: not a member of {room_name}\n")
            read = (parse_qs(url.query).get("read") or [None])[0]
            summary = room_summary(room, claims.sub, read)
        finally:
            room.release()
        return make_response(200, json.dumps(summary), "application/json")

    def close(self) -> None:
        """Shutting down: cut every transfer (an upload's temporary file is removed)."""
        for conn in list(self.transfers):
            conn.transport.abort()

    # -- checks ---------------------------------------------------------------------------

    def target(self, url: SplitResult) -> tuple[str, str]:
        """The room and blob name of `/blobs/<room>/<sha256>`."""
        parts = url.path.removeprefix("/blobs/").split("/")
        if len(parts) != 2:
            raise HttpRefusal(404, f"blob URLs are {BLOB_URL}")
        room = unquote(parts[0])
        if not ROOM_NAME.fullmatch(room):
            raise HttpRefusal(400, "a room name is 1-128 of A-Za-z0-9._-")
        return room, check_name(parts[1])

    async def claims(self, url: SplitResult, headers: dict[str, str], room: str) -> TokenClaims:
        token = _token_from(url, headers)
        if not token:
            raise HttpRefusal(401, "a token is required (?token= or Authorization: Bearer)")
        try:
            claims = await verify(self.verifier, token, None)
            if not claims.identity and not claims.allows_room(room):
                raise TokenError("wrong room")
        except TokenError as error:
            status = 403 if error.reason in FORBIDDEN_REASONS else 401
            raise HttpRefusal(status, f"token refused: {refusal_text(error.reason)}") from None
        if not claims.identity:
            return claims
        # An identity token: the room's membership gives the role (design §4), as at the
        # websocket upgrade.
        if self.rooms is None:
            raise HttpRefusal(403, f"token refused: {claims.sub} is not a member of this room")
        try:
            loaded = await self.rooms.acquire(room)
        except RoomUnavailable as error:
            raise HttpRefusal(503, f"room unavailable: {error}", retry_after=5) from None
        try:
            role = loaded.role_for(claims.sub)
        finally:
            loaded.release()
        if role is None or role == "person":
            raise HttpRefusal(403, f"token refused: {claims.sub} is not a member of this room")
        return replace(claims, room=room, role=role)  # type: ignore[arg-type]

    async def open_for(self, room_name: str, sha256: str) -> BinaryIO | None:
        """The blob's bytes if `room_name` references it and it was uploaded there."""
        if self.rooms is None:
            return None
        # The files first: only a room a blob was uploaded to gets loaded to look for the
        # reference, so asking about many rooms does not load them all.
        file = await self.blobs.open(room_name, sha256)
        if file is None:
            return None
        try:
            try:
                room = await self.rooms.acquire(room_name)
            except RoomUnavailable as error:
                raise HttpRefusal(503, f"room unavailable: {error}", retry_after=5) from None
            try:
                referenced = sha256 in await self._referenced_by(room)
            finally:
                room.release()
        except BaseException:
            file.close()
            raise
        if not referenced:
            file.close()
            return None
        return file

    async def _referenced_by(self, room: Room) -> frozenset[str]:
        references = self._references.get(room)
        if references is None:
            references = self._references[room] = _References()
        return await references.current(room)


class _References:
    """The blobs one room's messages reference, read again only after the room changed.

    Reading them renders the whole message array (~0.1 s at 10,000 messages, on the event
    loop), so a room that changes all the time (a streamed answer) while someone asks for
    blobs is read at most `_READ_SHARE` of the time: a request waits for its turn.
    """

    def __init__(self) -> None:
        self.writes = -1
        self.found: frozenset[str] = frozenset()
        self.read_at = 0.0
        self.read_seconds = 0.0
        self.lock = asyncio.Lock()

    async def current(self, room: Room) -> frozenset[str]:
        async with self.lock:
            if self.writes == room.writes:
                return self.found
            loop = asyncio.get_running_loop()
            wait = self.read_at + self.read_seconds / _READ_SHARE - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # a rate limit, not a synchronisation
            start = loop.time()
            self.writes = room.writes
            self.found = referenced_blobs(room.live.messages, room.live.shape_checked())
            self.read_at = loop.time()
            self.read_seconds = self.read_at - start
            return self.found


def referenced_blobs(messages: Array, shape_checked: bool = False) -> frozenset[str]:
    """Every `sha256` in the `files` of the messages; values of another shape are skipped.

    `str()` renders the array as JSON in Rust, as the Conversation view reads it; indexing the
    Array from Python costs O(n) per item (4.5 s for 10,000 messages against 0.1 s). Unless the
    room's structure index vouches for its shape (`shape_checked`), items nested too deeply to
    render are skipped first (design §7.1).
    """
    try:
        items = array_json(messages, schema.MESSAGES, shape_checked=shape_checked)
    except ValueError as error:  # a document we cannot read serves nothing, and says why
        log.warning("reading file references failed: %s", error)
        return frozenset()
    found: set[str] = set()
    for item in items:
        files = item.get("files") if isinstance(item, dict) else None
        if not isinstance(files, list):
            continue
        for ref in files:
            if isinstance(ref, dict) and isinstance(ref.get("sha256"), str):
                found.add(ref["sha256"])
    return frozenset(found)


def room_summary(room: Room, sub: str, read: str | None = None) -> dict[str, Any]:
    """Messages, last activity and `sub`'s unread count of a loaded room: messages of others
    after its read mark, `read` as its list document holds it (`?read=`, which a reader can
    keep too) or else its mark in the room's `transport.read`."""
    live = room.live
    shown = array_json(live.messages, schema.MESSAGES, shape_checked=live.shape_checked())
    messages = [m for m in shown if isinstance(m, dict) and isinstance(m.get("id"), str)]
    stamps = [m["created_at"] for m in messages if isinstance(m.get("created_at"), int | float)]
    mark = read if read is not None else live.doc.get(schema.READ, type=Map).get(sub)
    ids = [m["id"] for m in messages]
    after = ids.index(mark) + 1 if isinstance(mark, str) and mark in ids else 0
    unread = sum(1 for m in messages[after:] if m.get("author") != sub)
    title = live.doc.get(schema.META, type=Map).get("title")
    if not isinstance(title, str) or not title:  # else the worker's (crdtchat.worker.titles)
        derived = [
            entry
            for entry in live.doc.get(schema.DERIVED, type=Map).values()
            if isinstance(entry, dict) and entry.get("kind") == "title"
        ]
        named = [e["data"]["title"] for e in derived if isinstance(e.get("data"), dict)]
        title = next((t for t in named if isinstance(t, str)), None)
    return {
        "room": room.name,
        "messages": len(messages),
        "last_activity": max(stamps, default=None),
        "last_message": ids[-1] if ids else None,
        "read": mark if isinstance(mark, str) else None,
        "unread": unread,
        "title": title if isinstance(title, str) else None,
    }


class _Exchange:
    """One HTTP request for a blob, over the connection that received it."""

    def __init__(self, conn: RelayConnection, endpoints: HttpEndpoints) -> None:
        self.conn = conn
        self.endpoints = endpoints
        self.stall = endpoints.limits.stall_timeout
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self.responded = False

    async def run(self) -> None:
        try:
            try:
                await self._serve()
            except HttpRefusal as error:
                level = logging.WARNING if error.status in (408, 429, 503) else logging.INFO
                log.log(level, "HTTP request refused (%d): %s", error.status, error.reason)
                if not self.responded:
                    await self._answer(error.status, error.reason + "\n", error.retry_after)
            self.conn.transport.close()
        except (TimeoutError, ConnectionError) as error:
            log.info("blob transfer cut: %s", error or type(error).__name__)
            self.conn.transport.abort()  # a client that reads nothing must not keep it open
        except BaseException:
            self.conn.transport.abort()
            raise

    async def _serve(self) -> None:
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            raise HttpRefusal(400, "connection closed before the request head")
        url = urlsplit(event.target.decode("ascii", "replace"))
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
        if url.path.startswith("/rooms/") and event.method in (b"POST", b"DELETE"):
            await self._access(event.method, url, headers)
        elif event.method == b"PUT":
            await self._put(url, headers)
        elif event.method == b"GET":
            await self._get(url, headers)
        else:
            raise HttpRefusal(405, "blobs take GET and PUT; /rooms/<room>/... take POST and DELETE")

    # -- reading --------------------------------------------------------------------------

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as error:
                raise HttpRefusal(400, f"malformed request: {error}") from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.conn.receive_some(self.stall)
            except TimeoutError:
                raise HttpRefusal(408, f"no bytes for {self.stall:g} s: request cut") from None
            self.h11.receive_data(data)

    # -- writing --------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if self.conn.transport.is_closing():
            raise ConnectionError("client went away")
        self.conn.transport.write(data)
        async with asyncio.timeout(self.stall):
            await self.conn.drain()

    async def _answer(self, status: int, text: str, retry_after: int | None = None) -> None:
        body = text.encode()
        headers = [("content-type", "text/plain; charset=utf-8")]
        if retry_after is not None:
            headers.append(("retry-after", str(retry_after)))
        await self._start(status, len(body), headers)
        await self._write(self.h11.send(h11.Data(data=body)) or b"")
        await self._write(self.h11.send(h11.EndOfMessage()) or b"")
        await self._linger()

    async def _start(self, status: int, length: int, headers: list[tuple[str, str]]) -> None:
        self.responded = True
        response = h11.Response(
            status_code=status,
            reason=http.HTTPStatus(status).phrase,
            headers=[
                ("date", email.utils.formatdate(usegmt=True)),
                ("server", "crdtchat-relay"),
                ("connection", "close"),
                ("content-length", str(length)),
                *headers,
            ],
        )
        await self._write(self.h11.send(response) or b"")

    async def _linger(self) -> None:
        """Discard what is left of a request body for a moment, then close.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the answer before the client reads it; an early refusal (413, 429) must arrive.
        """
        if self.h11.their_state in (h11.DONE, h11.CLOSED, h11.ERROR):
            return
        if self.conn.transport.can_write_eof():
            self.conn.transport.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(_LINGER):
                while await self.conn.receive_some(_LINGER):
                    pass

    # -- membership (design §4): POST/DELETE /rooms/<room>/... ----------------------------

    async def _access(self, method: bytes, url: SplitResult, headers: dict[str, str]) -> None:
        """An owner's change to a room's members or invites, or an invite redeemed.

        The caller is named by an identity token in `Authorization: Bearer`; the change is
        judged against the room's membership and written by the relay into the document.
        """
        endpoints = self.endpoints
        parts = url.path.removeprefix("/rooms/").split("/")
        room_name = unquote(parts[0])
        if not ROOM_NAME.fullmatch(room_name):
            raise HttpRefusal(400, "a room name is 1-128 of A-Za-z0-9._-")
        action = (method.decode(), *parts[1:])
        models: dict[tuple[str, ...], type[BaseModel] | None] = {
            ("POST", "members"): MemberChange,
            ("POST", "invites"): InviteRequest,
            ("POST", "join"): JoinRequest,
        }
        if len(action) == 3 and action[:2] == ("DELETE", "invites"):
            model: type[BaseModel] | None = None
        elif action in models:
            model = models[action]
        else:
            raise HttpRefusal(
                404,
                "membership URLs are POST /rooms/<room>/members, POST /rooms/<room>/invites, "
                "DELETE /rooms/<room>/invites/<id>, POST /rooms/<room>/join",
            )
        token = _token_from(url, headers)
        if not token:
            raise HttpRefusal(401, "an identity token is required: Authorization: Bearer <token>")
        try:
            claims = await verify(endpoints.verifier, token, None)
        except TokenError as error:
            raise HttpRefusal(401, f"token refused: {refusal_text(error.reason)}") from None
        if not claims.identity:
            raise HttpRefusal(403, "membership changes need an identity token (no room or role)")
        body = await self._small_body()
        request: Any = None
        if model is not None:
            try:
                request = model.model_validate_json(body or b"{}")
            except ValidationError as error:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()
                )
                raise HttpRefusal(400, f"bad request body: {problems}") from None
        if endpoints.rooms is None:
            raise HttpRefusal(503, "this relay serves no rooms")
        try:
            room = await endpoints.rooms.acquire(room_name)
        except RoomUnavailable as error:
            raise HttpRefusal(503, f"room unavailable: {error}", retry_after=5) from None
        try:
            await room.structure_ready.wait()
            answer = await self._change_access(room, claims.sub, action, request)
        except AccessError as error:
            raise HttpRefusal(error.status, error.reason) from None
        except RoomUnavailable as error:
            raise HttpRefusal(503, f"room unavailable: {error}", retry_after=5) from None
        finally:
            room.release()
        log.info("room %s: %s %s by %s", room_name, *action[:2], claims.sub)
        await self._answer_json(201 if action[:2] == ("POST", "invites") else 200, answer)

    @staticmethod
    async def _change_access(
        room: Room, sub: str, action: tuple[str, ...], request: Any
    ) -> dict[str, Any]:
        """Decide and write in one step: nothing is awaited between reading the membership
        and applying the change (`Room.write_access`). A cluster node may decide again after
        a conflict: the answer reports the decision that was stored."""
        if action[1] == "members":
            await room.write_access(lambda doc: change_member(doc, sub, request))
            if request.remove:
                return {"room": room.name, "sub": request.sub, "removed": True}
            return {"room": room.name, "sub": request.sub, "role": request.role}
        if action[1] == "join":
            granted: list[str] = []

            def join(doc: Doc) -> Any:
                role, write = redeem(doc, sub, request.secret)
                granted[:] = [role]
                return write

            await room.write_access(join)
            return {"room": room.name, "sub": sub, "role": granted[0]}
        if action[0] == "DELETE":
            await room.write_access(lambda doc: revoke_invite(doc, sub, action[2]))
            return {"room": room.name, "id": action[2], "revoked": True}
        made: list[tuple[str, str]] = []

        def invite(doc: Doc) -> Any:
            invite_id, secret, write = create_invite(doc, sub, request)
            made[:] = [(invite_id, secret)]
            return write

        await room.write_access(invite)
        invite_id, secret = made[0]
        return {
            "room": room.name,
            "id": invite_id,
            "secret": secret,
            "role": request.role,
            "ttl": request.ttl,
            "uses": request.uses,
        }

    async def _small_body(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > _MAX_ACCESS_BODY:
                    raise HttpRefusal(413, f"request body larger than {_MAX_ACCESS_BODY} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise HttpRefusal(400, "connection closed before the whole body")

    async def _answer_json(self, status: int, value: dict[str, Any]) -> None:
        body = json.dumps(value).encode()
        await self._start(status, len(body), [("content-type", "application/json")])
        await self._write(self.h11.send(h11.Data(data=body)) or b"")
        await self._write(self.h11.send(h11.EndOfMessage()) or b"")

    # -- PUT ------------------------------------------------------------------------------

    async def _put(self, url: SplitResult, headers: dict[str, str]) -> None:
        endpoints = self.endpoints
        room, sha256 = endpoints.target(url)
        claims = await endpoints.claims(url, headers, room)
        if claims.role not in UPLOAD_ROLES:
            raise HttpRefusal(403, f"a {claims.role} token may not upload blobs")
        if "transfer-encoding" in headers:
            raise HttpRefusal(411, "send the blob with a Content-Length, not chunked")
        raw = headers.get("content-length", "")
        if not raw.isdigit():
            raise HttpRefusal(411, "Content-Length required")
        if int(raw) > endpoints.blobs.max_size:
            raise HttpRefusal(413, f"blob larger than {endpoints.blobs.max_size} bytes")
        with endpoints.uploads.hold(claims.sub):
            try:
                upload = await endpoints.blobs.begin(room, sha256)
            except OSError as error:
                raise HttpRefusal(507, f"the relay cannot store blobs now: {error}") from None
            try:
                if self.h11.they_are_waiting_for_100_continue:
                    continued = h11.InformationalResponse(
                        status_code=100, headers=[], reason="Continue"
                    )
                    await self._write(self.h11.send(continued) or b"")
                await self._receive_body(upload)
                await upload.finish()
            except (ConnectionError, TimeoutError):  # the client, not the disk
                raise
            except OSError as error:  # the disk: say so, keep nothing
                log.error("storing blob %s failed: %s", sha256, error)
                raise HttpRefusal(507, f"the relay could not store the blob: {error}") from None
            finally:
                upload.discard()  # nothing left to remove once finished
        # The same answer whether these bytes were stored already: it must not tell a writer
        # of one room that another room holds a file.
        await self._answer(201, "stored\n")

    async def _receive_body(self, upload: Upload) -> None:
        """Write the body to `upload` as it arrives: every batch the network gave at once."""
        while True:
            event = await self._next_event()
            chunks: list[bytes] = []
            while True:
                if isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    if chunks:
                        await upload.write(chunks)
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpRefusal(400, "connection closed before the whole body")
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError as error:
                    raise HttpRefusal(400, f"malformed request: {error}") from None
                if event is h11.NEED_DATA:
                    break
            if chunks:
                await upload.write(chunks)

    # -- GET ------------------------------------------------------------------------------

    async def _get(self, url: SplitResult, headers: dict[str, str]) -> None:
        room, sha256 = self.endpoints.target(url)
        claims = await self.endpoints.claims(url, headers, room)
        with self.endpoints.downloads.hold(claims.sub):
            await self._send_blob(room, sha256)

    async def _send_blob(self, room: str, sha256: str) -> None:
        file = await self.endpoints.open_for(room, sha256)
        if file is None:  # missing, unreferenced or not uploaded here: one answer for all
            raise HttpRefusal(404, f"no such blob in room {room!r}")
        try:
            size = os.fstat(file.fileno()).st_size
            await self._start(200, size, [("content-type", "application/octet-stream")])
            threads = self.endpoints.blobs.threads
            while chunk := await anyio.to_thread.run_sync(file.read, _CHUNK, limiter=threads):
                await self._write(self.h11.send(h11.Data(data=chunk)) or b"")
            await self._write(self.h11.send(h11.EndOfMessage()) or b"")
        finally:
            file.close()


class RelayConnection(ServerConnection):
    """A websockets server connection that also serves blob requests itself, streaming."""

    endpoints: ClassVar[HttpEndpoints | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target: Any = None  # set by the relay's process_request for room connections
        self._sniffed = bytearray()
        self._mode: str | None = None  # None until the first bytes tell, then "ws" or "http"
        self._decided: asyncio.Future[None] = self.loop.create_future()
        self._inbox = bytearray()
        self._eof = False
        self._arrived = asyncio.Event()
        self._reading_paused = False

    def _decide(self, mode: str) -> None:
        self._mode = mode
        if not self._decided.done():
            self._decided.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._mode == "ws":
            super().data_received(data)
            return
        if self._mode == "http":
            self._take(data)
            return
        self._sniffed += data
        buffered = bytes(self._sniffed)
        if self.endpoints is not None:
            if buffered.startswith(_HTTP_PREFIXES):
                self._sniffed.clear()
                self._decide("http")
                self._take(buffered)
                return
            if any(prefix.startswith(buffered) for prefix in _HTTP_PREFIXES):
                return  # too few bytes to tell yet
        self._sniffed.clear()
        self._decide("ws")
        super().data_received(buffered)

    def _take(self, data: bytes) -> None:
        self._inbox += data
        self._arrived.set()
        if len(self._inbox) >= _INBOX_HIGH and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    async def receive_some(self, timeout: float) -> bytes:
        """What arrived since the last call, b"" at the end; TimeoutError if nothing came."""
        async with asyncio.timeout(timeout):
            while not self._inbox and not self._eof:
                self._arrived.clear()
                await self._arrived.wait()
        data = bytes(self._inbox)
        self._inbox.clear()
        if self._reading_paused and not self._eof:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def eof_received(self) -> bool | None:
        if self._mode == "http":
            self._eof = True
            self._arrived.set()
            return True  # keep the transport open to write the response
        if self._mode is None:
            self._decide("ws")
            if self._sniffed:
                buffered = bytes(self._sniffed)
                self._sniffed.clear()
                super().data_received(buffered)
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._arrived.set()
        super().connection_lost(exc)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        endpoints = self.endpoints
        open_timeout = endpoints.limits.open_timeout if endpoints is not None else None
        # One deadline for telling the kind of request and, for a websocket, its handshake.
        deadline = None if open_timeout is None else self.loop.time() + open_timeout
        if self._mode is None:
            async with asyncio.timeout_at(deadline):
                await asyncio.wait(
                    [self._decided, self.connection_lost_waiter],
                    return_when=asyncio.FIRST_COMPLETED,
                )
        if self._mode == "http":
            assert endpoints is not None
            endpoints.transfers.add(self)
            try:
                await _Exchange(self, endpoints).run()
                try:  # close() waits for the answer to be flushed: not forever
                    async with asyncio.timeout(endpoints.limits.stall_timeout):
                        await asyncio.shield(self.connection_lost_waiter)
                except TimeoutError:
                    self.transport.abort()
                    await self.connection_lost_waiter
            finally:
                endpoints.transfers.discard(self)
            return
        async with asyncio.timeout_at(deadline):
            await super().handshake(*args, **kwargs)


def connection_class(endpoints: HttpEndpoints) -> type[RelayConnection]:
    """A RelayConnection subclass bound to `endpoints` (websockets instantiates it)."""
    return type("BoundRelayConnection", (RelayConnection,), {"endpoints": endpoints})
