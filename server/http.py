"""Plain HTTP on the relay's port: `/healthz`, `/metrics`, and `GET`/`PUT /blobs/<sha256>`.

GET requests come through websockets' `process_request` hook. websockets parses only GET
requests without a body, so a `PUT` is recognised before websockets sees a byte: the
connection class used by the server (`RelayConnection`) looks at the request method of the
first bytes and, for a PUT, reads the request itself, answers it and closes the connection. It
does so inside websockets' own handshake step, so the connection keeps its owner and its
timeout (`open_timeout`, which therefore bounds one upload too).

Tokens are checked on every request: `?token=` or `Authorization: Bearer`. Blobs are content
addressed and shared by all rooms, so any valid token may read; only writer and worker tokens
may upload.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import SplitResult, parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from crdtchat.tokens import TokenClaims, TokenError, parse_claims
from server.blobs import BlobError, BlobStore
from server.metrics import Metrics

log = logging.getLogger("crdtchat.relay.http")

_MAX_HEAD = 16 * 1024
UPLOAD_ROLES = frozenset({"writer", "worker"})


def make_response(
    status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8"
) -> Response:
    data = body.encode("utf-8") if isinstance(body, str) else body
    code = http.HTTPStatus(status)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(data))),
            ("Content-Type", content_type),
        ]
    )
    return Response(code.value, code.phrase, headers, data)


def _token_from(url: SplitResult, headers: Any) -> str:
    values = parse_qs(url.query).get("token")
    if values:
        return values[0]
    authorization = headers.get("Authorization") or headers.get("authorization") or ""
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


class HttpEndpoints:
    def __init__(self, secret: str, blobs: BlobStore, metrics: Metrics) -> None:
        self.secret = secret
        self.blobs = blobs
        self.metrics = metrics

    def is_http_path(self, path: str) -> bool:
        return path in ("/healthz", "/metrics") or path.startswith("/blobs/")

    def _claims(self, url: SplitResult, headers: Any) -> TokenClaims:
        token = _token_from(url, headers)
        if not token:
            raise BlobError(401, "a token is required (?token= or Authorization: Bearer)")
        try:
            return parse_claims(self.secret, token)
        except TokenError as error:
            raise BlobError(401, f"token refused: {error.reason}") from None

    async def get(self, request: Request, url: SplitResult) -> Response:
        if url.path == "/healthz":
            return make_response(200, "ok\n")
        if url.path == "/metrics":
            return make_response(200, self.metrics.render(), "text/plain; version=0.0.4")
        try:
            self._claims(url, request.headers)
            sha256 = url.path.removeprefix("/blobs/")
            data = await self.blobs.get(sha256)
        except BlobError as error:
            return make_response(error.status, error.reason + "\n")
        if data is None:
            return make_response(404, "no such blob\n")
        return make_response(200, data, "application/octet-stream")

    def check_upload(self, target: str, headers: dict[str, str]) -> tuple[str, int]:
        """The blob name and body length of an acceptable PUT; BlobError otherwise."""
        url = urlsplit(target)
        if not url.path.startswith("/blobs/"):
            raise BlobError(404, "only /blobs/<sha256> accepts PUT")
        sha256 = url.path.removeprefix("/blobs/")
        self.blobs.path_for(sha256)  # validates the name
        claims = self._claims(url, headers)
        if claims.role not in UPLOAD_ROLES:
            raise BlobError(403, f"a {claims.role} token may not upload blobs")
        if "transfer-encoding" in headers:
            raise BlobError(411, "send the blob with a Content-Length, not chunked")
        raw = headers.get("content-length")
        if raw is None or not raw.isdigit():
            raise BlobError(411, "Content-Length required")
        length = int(raw)
        if length > self.blobs.max_size:
            raise BlobError(413, f"blob larger than {self.blobs.max_size} bytes")
        return sha256, length

    async def finish_upload(self, sha256: str, body: bytes) -> tuple[int, str]:
        created = await self.blobs.put(sha256, body)
        return (201, "created\n") if created else (200, "already stored\n")


@dataclass
class _PutHead:
    target: str
    headers: dict[str, str]  # lower-case names


class _PutReader:
    """Incremental reader of one PUT request: head, then exactly Content-Length body bytes."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.buffer = bytearray()
        self.head: _PutHead | None = None
        self.error: str | None = None
        self.expected: int | None = None
        self.eof = False
        self.changed = asyncio.Event()

    def feed(self, data: bytes) -> None:
        if len(self.buffer) + len(data) > self.cap:
            self.error = "request too large"
            self.changed.set()
            return
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self.error = "request head too large"
            else:
                self._parse_head(bytes(self.buffer[:end]))
                del self.buffer[: end + 4]
        self.changed.set()

    def feed_eof(self) -> None:
        self.eof = True
        self.changed.set()

    def _parse_head(self, raw: bytes) -> None:
        try:
            lines = raw.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            if method != "PUT" or not version.startswith("HTTP/1."):
                raise ValueError(lines[0])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name.strip():
                    raise ValueError(line)
                headers[name.strip().lower()] = value.strip()
        except ValueError:
            self.error = "malformed request head"
            return
        self.head = _PutHead(target, headers)

    async def wait_for(self, ready: Callable[[], bool]) -> None:
        while not ready() and self.error is None and not self.eof:
            self.changed.clear()
            await self.changed.wait()


class RelayConnection(ServerConnection):
    """A websockets server connection that also answers `PUT /blobs/...` itself."""

    endpoints: ClassVar[HttpEndpoints | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target: Any = None  # set by the relay's process_request for room connections
        self._sniffed = bytearray()
        self._mode: str | None = None  # None until the method is known, then "ws" or "put"
        self._decided: asyncio.Future[None] = self.loop.create_future()
        cap = _MAX_HEAD + (self.endpoints.blobs.max_size if self.endpoints else 0)
        self._put = _PutReader(cap)

    def _decide(self, mode: str) -> None:
        self._mode = mode
        if not self._decided.done():
            self._decided.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._mode == "ws":
            super().data_received(data)
            return
        if self._mode == "put":
            self._put.feed(data)
            return
        self._sniffed += data
        if b" " not in self._sniffed[:8] and len(self._sniffed) < 8:
            return
        buffered = bytes(self._sniffed)
        self._sniffed.clear()
        if buffered.startswith(b"PUT ") and self.endpoints is not None:
            self._decide("put")
            self._put.feed(buffered)
        else:
            self._decide("ws")
            super().data_received(buffered)

    def eof_received(self) -> bool | None:
        if self._mode == "put":
            self._put.feed_eof()
            return True  # keep the transport open to write the response
        if self._mode is None:
            self._decide("ws")
            if self._sniffed:
                buffered = bytes(self._sniffed)
                self._sniffed.clear()
                super().data_received(buffered)
        return super().eof_received()

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        if self._mode is None:
            await asyncio.wait(
                [self._decided, self.connection_lost_waiter],
                return_when=asyncio.FIRST_COMPLETED,
            )
        if self._mode == "put":
            await self._serve_put()
            return
        await super().handshake(*args, **kwargs)

    async def _serve_put(self) -> None:
        endpoints = self.endpoints
        assert endpoints is not None
        reader = self._put
        try:
            await reader.wait_for(lambda: reader.head is not None)
            if reader.head is None:
                raise BlobError(400, reader.error or "connection closed before the request head")
            sha256, length = endpoints.check_upload(reader.head.target, reader.head.headers)
            if reader.head.headers.get("expect", "").lower() == "100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await reader.wait_for(lambda: len(reader.buffer) >= length)
            if len(reader.buffer) < length:
                raise BlobError(400, reader.error or "connection closed before the whole body")
            status, text = await endpoints.finish_upload(sha256, bytes(reader.buffer[:length]))
        except BlobError as error:
            status, text = error.status, error.reason + "\n"
            log.info("PUT refused (%d): %s", status, error.reason)
        response = make_response(status, text)
        if not self.transport.is_closing():
            self.transport.write(response.serialize())
            self.transport.close()
        await self.connection_lost_waiter


def connection_class(endpoints: HttpEndpoints) -> type[RelayConnection]:
    """A RelayConnection subclass bound to `endpoints` (websockets instantiates it)."""
    return type("BoundRelayConnection", (RelayConnection,), {"endpoints": endpoints})
