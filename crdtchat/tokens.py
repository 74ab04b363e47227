"""Signed access tokens for the relay (DESIGN §4).

A token is `v1.<payload>.<signature>`, both parts unpadded base64url, so it fits in a query
string unescaped. The payload is the compact JSON of {room, role, sub, exp}; the signature is
HMAC-SHA256 of the payload part under the relay's secret (`CRDTCHAT_SECRET`). No library, no
algorithm negotiation: there is exactly one way to sign, so there is nothing to downgrade.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, get_args

from crdtchat.errors import TokenError
from crdtchat.schema import ROOM_NAME

TokenRole = Literal["reader", "writer", "worker"]
ROLES: tuple[str, ...] = get_args(TokenRole)
ANY_ROOM = "*"
SECRET_VARIABLE = "CRDTCHAT_SECRET"
_VERSION = "v1"
_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class TokenClaims:
    room: str
    role: TokenRole
    sub: str
    exp: int  # unix seconds

    def allows_room(self, room: str) -> bool:
        return self.room == ANY_ROOM or self.room == room


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or any(c not in _B64_ALPHABET for c in text):
        raise TokenError("malformed token")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None


def _key(secret: str | bytes) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("the token secret is empty")
    return key


def _sign(secret: str | bytes, payload_part: str) -> str:
    digest = hmac.new(_key(secret), payload_part.encode("ascii"), hashlib.sha256).digest()
    return _b64encode(digest)


def mint_token(secret: str | bytes, room: str, role: str, sub: str, ttl: float) -> str:
    """A token for `room` (or "*") valid for `ttl` seconds from now."""
    if room != ANY_ROOM and not ROOM_NAME.fullmatch(room):
        raise ValueError(f"invalid room name {room!r}: 1-128 characters of A-Za-z0-9._- or *")
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    if not sub:
        raise ValueError("the subject (sub) must not be empty")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
    exp = math.ceil(time.time() + ttl)
    payload = json.dumps(
        {"room": room, "role": role, "sub": sub, "exp": exp},
        separators=(",", ":"),
        ensure_ascii=False,
        sort_keys=True,
    ).encode("utf-8")
    payload_part = _b64encode(payload)
    return f"{_VERSION}.{payload_part}.{_sign(secret, payload_part)}"


def parse_claims(secret: str | bytes, token: str, now: float | None = None) -> TokenClaims:
    """Check signature, shape and expiry, but not the room (blobs are not per room)."""
    if not isinstance(token, str) or len(token) > 4096:
        raise TokenError("malformed token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        raise TokenError("malformed token")
    _, payload_part, signature_part = parts
    _b64decode(signature_part)
    expected = _sign(secret, payload_part)
    if not hmac.compare_digest(expected.encode("ascii"), signature_part.encode("ascii")):
        raise TokenError("bad signature")
    try:
        payload = json.loads(_b64decode(payload_part).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TokenError("malformed token") from None
    if not isinstance(payload, dict):
        raise TokenError("malformed token")
    room, role, sub, exp = (payload.get(k) for k in ("room", "role", "sub", "exp"))
    if (
        not isinstance(room, str)
        or role not in ROLES
        or not isinstance(sub, str)
        or not sub
        or not isinstance(exp, int)
        or isinstance(exp, bool)
    ):
        raise TokenError("malformed token")
    current = time.time() if now is None else now
    if exp <= current:
        raise TokenError("expired")
    return TokenClaims(room=room, role=role, sub=sub, exp=exp)


def read_claims_unverified(token: str) -> TokenClaims:
    """What a token says, without checking its signature or expiry.

    For the token's holder, which needs its own subject (a message's `author`) and cannot
    verify: only the relay has the secret. Never use it to grant anything.
    """
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != _VERSION:
        raise TokenError("malformed token")
    try:
        payload = json.loads(_b64decode(parts[1]).decode("utf-8"))
        return TokenClaims(
            room=str(payload["room"]),
            role=payload["role"],
            sub=str(payload["sub"]),
            exp=int(payload["exp"]),
        )
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise TokenError("malformed token") from None


def verify_token(
    secret: str | bytes, token: str, room: str, now: float | None = None
) -> TokenClaims:
    """The claims of a token that may be used for `room` now; raises TokenError otherwise.

    Reasons: "malformed token", "bad signature", "expired", "wrong room".
    """
    claims = parse_claims(secret, token, now)
    if not claims.allows_room(room):
        raise TokenError("wrong room")
    return claims


def token_command(args: argparse.Namespace) -> int:
    """`crdtchat token`: print a token signed with CRDTCHAT_SECRET."""
    secret = os.environ.get(SECRET_VARIABLE, "")
    if not secret:
        print(f"crdtchat token: {SECRET_VARIABLE} is not set", file=sys.stderr)
        return 1
    try:
        token = mint_token(secret, args.room, args.role, args.sub, args.ttl)
    except ValueError as error:
        print(f"crdtchat token: {error}", file=sys.stderr)
        return 2
    print(token)
    return 0
