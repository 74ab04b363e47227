"""The web client on the relay's port: the app at `/`, `/c/<room>` and `/rooms/<room>/join` (an
invite link), its files at `/static/`, and `GET /auth/<room>`, which tells the page whether its
token is still good.

All of these are small GETs without a body, so they come through websockets' `process_request`
like `/healthz`. The files are read once from `crdtchat/web/static` (built from `web/`).

Served safely (design §6, "Web client"): a Content-Security-Policy that allows no inline
script, no eval and no origin but the relay's own (its websocket included); content from peers
and models never runs, and remote images never load. `/auth/<room>` takes the token in an
`Authorization: Bearer` header, never in the URL: a browser cannot read the HTTP status of a
refused websocket upgrade (it sees 1006), so the page asks here and says "access refused"
instead of reconnecting for ever. An identity token is good here too (role null): its role in
the room is its membership, which the page reads from the room's `access.members`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from websockets.http11 import Request, Response

from crdtchat.relay.http import make_response, verify
from crdtchat.schema import ROOM_NAME
from crdtchat.tokens import FORBIDDEN_REASONS, TokenError, TokenVerifier, refusal_text
from crdtchat.web import STATIC

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
}
_APP_PAGE = re.compile(r"\A/c/([A-Za-z0-9._-]{1,128})\Z")
# An invite link (design §4): the page redeems it with the device's identity token by POSTing
# the secret of its fragment to the same path (crdtchat.relay.http answers the POST).
_JOIN_PAGE = re.compile(r"\A/rooms/([A-Za-z0-9._-]{1,128})/join\Z")
# A Host header the relay puts back into the policy: only a host name or address and a port.
_HOST = re.compile(r"\A[A-Za-z0-9.\-]{1,253}(:\d{1,5})?\Z|\A\[[0-9A-Fa-f:.]{2,45}\](:\d{1,5})?\Z")


def content_security_policy(host: str | None, secure: bool) -> str:
    """Nothing but the relay's own origin; the websocket named explicitly for older browsers."""
    connect = "'self'"
    if host is not None and _HOST.fullmatch(host):
        connect += f" {'wss' if secure else 'ws'}://{host}"
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' blob:",
            f"connect-src {connect}",
            "manifest-src 'self'",
            "worker-src 'self'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        )
    )


class WebApp:
    """Answers the web client's GETs; `handles(path)` says which paths are its own."""

    def __init__(
        self, verifier: TokenVerifier, static: Path = STATIC, *, secure: bool = False
    ) -> None:
        self.verifier = verifier
        self.secure = secure
        self.files: dict[str, bytes] = {}
        if static.is_dir():
            self.files = {p.name: p.read_bytes() for p in static.iterdir() if p.is_file()}

    @staticmethod
    def handles(path: str) -> bool:
        """The paths of the web client's GETs; the relay asks this before its other HTTP."""
        return (
            path == "/"
            or path.startswith(("/c/", "/static/", "/auth/"))
            or _JOIN_PAGE.fullmatch(path) is not None
        )

    async def get(self, request: Request, path: str) -> Response:
        host = request.headers.get("host")
        if path.startswith("/auth/"):
            return await self._auth(request, path.removeprefix("/auth/"))
        if path == "/" or _APP_PAGE.fullmatch(path) or _JOIN_PAGE.fullmatch(path):
            return self._file("index.html", host)
        name = path.removeprefix("/static/")
        if path.startswith("/c/"):
            return make_response(404, "a conversation page is /c/<room>, 1-128 of A-Za-z0-9._-\n")
        return self._file(name, host)

    def _file(self, name: str, host: str | None) -> Response:
        body = self.files.get(name)
        if body is None:
            if name == "index.html":
                return make_response(503, "the web client is not built: cd web && npm run build\n")
            return make_response(404, f"no file {name!r}\n")
        suffix = Path(name).suffix
        headers = [
            ("Content-Security-Policy", content_security_policy(host, self.secure)),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-cache"),  # the service worker keeps the offline copy
        ]
        if name == "sw.js":
            headers.append(("Service-Worker-Allowed", "/"))  # it serves the pages at / too
        return make_response(200, body, _TYPES.get(suffix, "application/octet-stream"), headers)

    async def _auth(self, request: Request, room: str) -> Response:
        if not ROOM_NAME.fullmatch(room):
            return make_response(400, "the path must be /auth/<room>, 1-128 of A-Za-z0-9._-\n")
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return make_response(401, "a token is required: Authorization: Bearer <token>\n")
        try:
            try:
                claims = await verify(self.verifier, token.strip(), room)
            except TokenError as error:
                if error.reason != "identity token":
                    raise
                # A person's token: good here, while the room's membership gives the role
                # (design §4), which the websocket enforces and the page reads from
                # access.members; `role` is then null.
                claims = await verify(self.verifier, token.strip(), None)
        except TokenError as error:
            status = 403 if error.reason in FORBIDDEN_REASONS else 401
            return make_response(status, f"token refused: {refusal_text(error.reason)}\n")
        body = {
            "room": room if claims.identity else claims.room,
            "role": claims.role,
            "sub": claims.sub,
            "exp": claims.exp,
        }
        return make_response(
            200, json.dumps(body), "application/json", [("Cache-Control", "no-store")]
        )
