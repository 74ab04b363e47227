"""The websocket side of the relay: who may connect, and what each connection runs.

URL: `ws://HOST:PORT/<room>?token=<token>[&ext=ack,refresh]`. The token is checked before the
upgrade (HTTP 400/401/403 with the reason otherwise). `ext=ack` turns on the Ack extension for
that connection, `ext=refresh` the token refresh (design §3: extensions only for clients that
asked). A connection lasts only as long as its token: at its expiry the relay stops sending to
it and closes it (4401 "token expired"), unless a refresh moved the expiry.

Each connection runs one task, the reader: it decodes frames and hands every message to the
room's protocol core (`crdtchat.relay.protocol`), whose actions the room carries out. What
waits for the store (broadcasts, Ack, AuthDenied, sync step 2 replies) is finished by the core
when the store reports the write, from the store's completion callback, so no task per
connection waits for it; an update accepted just before a disconnect still reaches everyone
else. A close is a task only once decided, and the token's expiry is a timer: most connections
are idle, and per-connection task groups, tasks, events and streams were 14 of the 34 KiB an
idle connection cost (docs/performance.md, "Connections and rooms").

Bad input closes only the offending connection (1008 policy violation, 1003 for text frames,
1009 for frames over --max-frame and other things too big), with the reason; a subject over
its connection limit or a quota is closed with 1013 (try again later). The limits are design
§7.3 and §7.4. Every close has a `CloseKind`, which `/metrics` counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import cast
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from crdtchat.relay.config import RelayConfig
from crdtchat.relay.feed import WaitingFeed
from crdtchat.relay.http import HttpEndpoints, make_response, verify
from crdtchat.relay.membership import claim_owner, is_empty, owner_of
from crdtchat.relay.metrics import Metrics
from crdtchat.relay.protocol import (
    ACCESS_REVOKED_CODE,
    TOKEN_EXPIRED,
    TOKEN_EXPIRED_CODE,
    CloseKind,
    VerifyToken,
)
from crdtchat.relay.ratelimit import ConnectionLimits, Subjects
from crdtchat.relay.room import RelayPeer, Room, RoomLimitReached, RoomManager, RoomUnavailable
from crdtchat.relay.webapp import WebApp
from crdtchat.schema import ROOM_NAME, is_person_room
from crdtchat.tokens import (
    ANY_ROOM,
    FORBIDDEN_REASONS,
    TokenClaims,
    TokenError,
    TokenVerifier,
    refusal_text,
)
from crdtchat.wire import (
    Extension,
    SyncStep2,
    SyncUpdate,
    WireError,
    decode_frame,
)
from crdtchat.worker.feed import FEED_PATH

log = logging.getLogger("crdtchat.relay")

_MAX_REASON_BYTES = 123  # RFC 6455: a close reason fits in a control frame


@dataclass(frozen=True)
class Target:
    room: str
    claims: TokenClaims
    want_ack: bool
    want_refresh: bool = False


def _close_reason(text: str) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= _MAX_REASON_BYTES:
        return text
    return raw[: _MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


@dataclass(frozen=True)
class FeedTarget:
    claims: TokenClaims


class Relay:
    def __init__(
        self,
        config: RelayConfig,
        rooms: RoomManager,
        http: HttpEndpoints,
        metrics: Metrics,
        feed: WaitingFeed | None = None,
        verifier: TokenVerifier | None = None,
        web: WebApp | None = None,
        subjects: Subjects | None = None,
    ) -> None:
        self.config = config
        self.verifier = verifier or TokenVerifier(config.secret, config.issuers)
        self.web = web
        self.rooms = rooms
        self.http = http
        self.metrics = metrics
        self.feed = feed
        self.subjects = Subjects(config.subject_quotas()) if subjects is None else subjects
        self._closing: set[asyncio.Task[None]] = set()  # closes under way (_close_soon)

    async def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if self.web is not None and self.web.handles(url.path):  # first: GET of an invite link
            return await self.web.get(request, url.path)
        if self.http.is_http_path(url.path):
            return await self.http.get(request, url)
        if url.path == FEED_PATH and self.feed is not None:
            return await self._admit_feed(conn, url.query)
        room = unquote(url.path[1:])
        if not ROOM_NAME.fullmatch(room):
            return make_response(400, "the path must be /<room>, 1-128 of A-Za-z0-9._-\n")
        query = parse_qs(url.query)
        token = (query.get("token") or [""])[0]
        if not token:
            return make_response(401, "a token is required: ?token=...\n")
        try:
            claims = await verify(self.verifier, token, None)
            if is_person_room(room) and not claims.identity:
                raise TokenError("wrong room")  # a person's list: their identity tokens only
            if not claims.identity and not claims.allows_room(room):
                raise TokenError("wrong room")
        except TokenError as error:
            status = 403 if error.reason in FORBIDDEN_REASONS else 401
            return make_response(status, f"token refused: {refusal_text(error.reason)}\n")
        if claims.identity:
            refused = await self._admit_identity(room, claims)
            if refused is not None:
                return refused
        extensions = {ext for value in query.get("ext", []) for ext in value.split(",")}
        conn.target = Target(  # type: ignore[attr-defined]
            room, claims, want_ack="ack" in extensions, want_refresh="refresh" in extensions
        )
        return None

    async def _admit_identity(self, name: str, claims: TokenClaims) -> Response | None:
        """An identity token opens a room it is a member of, or one that holds nothing yet,
        which makes it the owner (design §4). Checked again once connected (`handle`)."""
        try:
            room = await self.rooms.acquire(name)
        except RoomLimitReached as error:
            return make_response(503, f"{error}; try again later\n")
        except RoomUnavailable as error:
            return make_response(503, f"room unavailable: {error}\n")
        try:
            if room.role_for(claims.sub) is not None:
                return None
            if is_person_room(name):
                reason = "a person's conversation list opens only with that person's token"
                return make_response(403, f"token refused: {reason}\n")
            table = room.members()
            if owner_of(table) is None and is_empty(room.live.doc):
                log.info("room %s created by %s, its owner", name, claims.sub)
                try:
                    await room.write_access(lambda _doc: claim_owner(claims.sub))
                except RoomUnavailable as error:
                    return make_response(503, f"room unavailable: {error}\n")
                return None
            if owner_of(table) is None:
                reason = "this room has no owner: it opens only with a token for the room"
            else:
                reason = f"{claims.sub} is not a member of this room"
            return make_response(403, f"token refused: {reason}\n")
        finally:
            room.release()

    async def _admit_feed(self, conn: ServerConnection, query_string: str) -> Response | None:
        """The room feed is for workers that serve every room."""
        token = (parse_qs(query_string).get("token") or [""])[0]
        try:
            claims = await verify(self.verifier, token, None)
        except TokenError as error:
            return make_response(401, f"token refused: {refusal_text(error.reason)}\n")
        if claims.role != "worker" or claims.room != ANY_ROOM:
            return make_response(403, "the room feed needs a worker token for every room\n")
        conn.target = FeedTarget(claims)  # type: ignore[attr-defined]
        return None

    async def handle(self, ws: ServerConnection) -> None:
        target: Target | FeedTarget = ws.target  # type: ignore[attr-defined]
        if isinstance(target, FeedTarget):
            assert self.feed is not None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._close_feed_at_expiry, ws, target.claims.exp)
                await self.feed.serve(ws)
                tg.cancel_scope.cancel()
            return
        # Counted before the room is loaded: a subject over its limit costs no room load.
        subject = self.subjects.connect(target.claims.sub)
        if isinstance(subject, str):
            log.warning("refusing a connection to %s: %s", target.room, subject)
            self.metrics.closed_connections[CloseKind.QUOTA] += 1
            await ws.close(1013, _close_reason(subject))
            return
        self.metrics.connections += 1
        try:
            try:
                room = await self.rooms.acquire(target.room)
            except RoomLimitReached as error:  # 1013 Try Again Later: clients back off
                self.metrics.closed_connections[CloseKind.UNAVAILABLE] += 1
                await ws.close(1013, _close_reason(str(error)))
                return
            except RoomUnavailable as error:
                self.metrics.closed_connections[CloseKind.UNAVAILABLE] += 1
                await ws.close(1011, _close_reason(str(error)))
                return
            try:
                claims = target.claims
                if claims.identity:
                    role = room.role_for(claims.sub)
                    if role is None:  # removed since the upgrade was admitted
                        self.metrics.closed_connections[CloseKind.REVOKED] += 1
                        await ws.close(ACCESS_REVOKED_CODE, "access revoked: not a member")
                        return
                    claims = replace(claims, room=room.name, role=role)
                peer = RelayPeer(
                    ws,
                    claims,
                    subject,
                    self.config,
                    want_ack=target.want_ack,
                    want_refresh=target.want_refresh,
                    identity=target.claims.identity,
                )
                await self._serve(ws, room, peer)
            finally:
                room.release()
        finally:
            self.metrics.connections -= 1
            self.subjects.disconnect(subject)

    async def _serve(self, ws: ServerConnection, room: Room, peer: RelayPeer) -> None:
        peer.on_close = self._close_soon
        room.join(peer)
        peer.watch_expiry(room)  # access ends with the token (or its refresh)
        try:
            await self._read(ws, room, peer)
        finally:
            peer.stop_watching_expiry()
            room.leave(peer)

    def _close_soon(self, peer: RelayPeer) -> None:
        """Called once per peer, when its close is decided: close the connection in a task of
        its own (the decision may come from inside another peer's broadcast)."""
        task = asyncio.get_running_loop().create_task(
            peer.ws.close(peer.close_code, _close_reason(peer.close_reason))
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_feed_at_expiry(self, ws: ServerConnection, exp: int) -> None:
        await anyio.sleep(max(0.0, exp - time.time()))
        self.metrics.closed_connections[CloseKind.EXPIRED] += 1
        await ws.close(TOKEN_EXPIRED_CODE, TOKEN_EXPIRED)

    async def _refresh(self, room: Room, verify_token: VerifyToken) -> None:
        """Extension 102: verify the newer token (which may need the network), then let the
        protocol judge and answer it."""
        try:
            verified: TokenClaims | TokenError = await verify(
                self.verifier, verify_token.token, None
            )
        except TokenError as error:
            verified = error
        peer = cast(RelayPeer, verify_token.peer)
        room.perform(room.core.refresh_verified(peer, verified, time.time()))
        peer.watch_expiry(room)

    async def _read(self, ws: ServerConnection, room: Room, peer: RelayPeer) -> None:
        config = self.config
        limits = ConnectionLimits(
            config.rate_messages, config.rate_burst, config.rate_bytes, 2 * config.max_frame
        )
        try:
            async for frame in ws:
                if peer.closing:
                    # Closing: keep reading (and dropping) frames so that websockets sees the
                    # peer's close frame behind them instead of waiting for its close timeout.
                    continue
                await self._consume(frame, room, peer, limits)
        except ConnectionClosed as closed:
            if closed.sent is not None and closed.sent.code == 1009:
                log.warning("closed %r: frame larger than %d bytes", peer, config.max_frame)
                self.metrics.closed_connections[CloseKind.LIMITS] += 1
            elif closed.rcvd is None and closed.sent is None:
                log.info("connection %r lost", peer)

    async def _consume(
        self, frame: bytes | str, room: Room, peer: RelayPeer, limits: ConnectionLimits
    ) -> None:
        """Hand one frame's messages to the room, in order; the frame layer's own checks
        (text frames, undecodable frames, rates) close the peer here."""
        if isinstance(frame, str):
            room.close_peer(
                peer, 1003, "text frames are not part of the protocol", CloseKind.MALFORMED
            )
            return
        self.metrics.bytes_in += len(frame)
        try:
            messages = decode_frame(frame)
        except WireError as error:
            room.close_peer(peer, 1008, f"malformed frame: {error}", CloseKind.MALFORMED)
            return
        over = limits.admit(len(messages), len(frame))
        if over is not None:
            room.close_peer(peer, 1008, over, CloseKind.RATE)
            return
        max_in_flight = self.config.max_in_flight
        for message in messages:
            if peer.closing:
                return
            if isinstance(message, SyncStep2 | SyncUpdate) and not room.structure_ready.is_set():
                await room.structure_ready.wait()
            actions = room.receive(peer, message)
            if isinstance(message, Extension):
                for action in actions:
                    if isinstance(action, VerifyToken):
                        await self._refresh(room, action)
            if peer.queue is not None and len(peer.queue) >= max_in_flight:
                await room.wait_for_queue(peer, max_in_flight)
