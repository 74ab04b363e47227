"""Access tokens: JWTs, verified with PyJWT (design §4).

The relay trusts its own issuer, `crdtchat`, whose tokens are HS256 under `CRDTCHAT_SECRET`
(`mint_token`, `crdtchat token`), and any identity provider listed in a trust file (`Issuer`):
public keys (EdDSA, ES256, RS256) from a PEM or JWKS file or a JWKS URL. The issuer named in a
token picks the key and the algorithms it may use, so an HS256 token can never be checked
against a public key, and `none` is never allowed. `exp`, `nbf`, `iss` and `aud` are checked
by PyJWT.

Besides the standard claims a token may carry two of ours, `room` and `role`. Without them it
identifies a person (an identity token): it opens the rooms the person is a member of
(`crdtchat.relay.membership`), and grants nothing elsewhere (blobs, the feed). With
them it is a capability for one room or `*`, as workers and apps that mint per-room tokens use.
Subjects of other issuers are namespaced, `<iss>#<sub>`, so one issuer's "alice" is neither
another's nor the relay's own; the holder computes the same name from its token.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crdtchat.errors import TokenError
from crdtchat.schema import ROOM_NAME

TokenRole = Literal["reader", "writer", "worker"]
ROLES: tuple[str, ...] = get_args(TokenRole)
ANY_ROOM = "*"
SECRET_VARIABLE = "CRDTCHAT_SECRET"
LOCAL_ISSUER = "crdtchat"  # `iss` and `aud` of the tokens signed with CRDTCHAT_SECRET
LOCAL_AUDIENCE = "crdtchat"
LOCAL_ALGORITHM = "HS256"
SUBJECT_SEPARATOR = "#"  # <iss>#<sub> for the subjects of other issuers
PublicAlgorithm = Literal["EdDSA", "ES256", "RS256"]
MAX_TOKEN_LENGTH = 8192
# Refusals that mean "valid, but not for this": HTTP 403 rather than 401.
FORBIDDEN_REASONS = frozenset({"wrong room", "identity token"})
IDENTITY_REFUSAL = (
    "identity token: it names a person, not a room; only a token for the room is accepted here"
)
V1_REFUSAL = "v1 tokens are no longer accepted: mint a new one with `crdtchat token`"


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token grants. `sub` is already namespaced by issuer."""

    sub: str
    exp: int  # unix seconds
    room: str | None = None  # None: an identity token
    role: TokenRole | None = None
    issuer: str = LOCAL_ISSUER

    @property
    def identity(self) -> bool:
        return self.room is None

    def allows_room(self, room: str) -> bool:
        return self.room is not None and (self.room == ANY_ROOM or self.room == room)


class Issuer(BaseModel):
    """One trusted identity provider, as written in the relay's trust file (design §4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(min_length=1, description="the `iss` claim its tokens carry")
    audience: str | list[str] = Field(description="the `aud` its tokens must name")
    algorithms: list[PublicAlgorithm] = Field(min_length=1)
    key_file: Path | None = Field(default=None, description="a PEM public key or a JWKS file")
    jwks_url: str | None = Field(default=None, description="fetched and cached")
    jwks_refresh: float = Field(
        default=60.0, ge=0, description="at most one fetch per this many seconds for a new kid"
    )
    jwks_lifespan: float = Field(default=300.0, gt=0, description="seconds a fetched set is used")
    grants_rooms: bool = Field(
        default=False, description="its tokens may carry `room` and `role` (an app, a worker)"
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> Issuer:
        if (self.key_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of key_file and jwks_url")
        if self.issuer == LOCAL_ISSUER:
            raise ValueError(f"the issuer {LOCAL_ISSUER!r} is the relay's own")
        if SUBJECT_SEPARATOR in self.issuer:
            raise ValueError(f"an issuer may not contain {SUBJECT_SEPARATOR!r}")
        if self.jwks_url is not None and not self.jwks_url.startswith(("http://", "https://")):
            raise ValueError("jwks_url must be an http:// or https:// URL")
        return self


class TrustFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    issuers: list[Issuer]


def load_trust_file(path: str | Path) -> list[Issuer]:
    """The issuers of a JSON trust file `{"issuers": [...]}`; ValueError says what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"cannot read the trust file {path}: {error.strerror}") from None
    try:
        issuers = TrustFile.model_validate_json(text).issuers
    except ValidationError as error:
        raise ValueError(f"trust file {path}: {error}") from None
    names = [issuer.issuer for issuer in issuers]
    if len(set(names)) != len(names):
        raise ValueError(f"trust file {path}: an issuer is listed twice")
    resolved = []
    for issuer in issuers:
        if issuer.key_file is not None and not issuer.key_file.is_absolute():
            # A key file named relative to the trust file, wherever the relay was started.
            issuer = issuer.model_copy(update={"key_file": Path(path).parent / issuer.key_file})
        _Trusted(issuer, jwks_timeout=0)  # a bad key stops the relay at start, not at a login
        resolved.append(issuer)
    return resolved


def _key(secret: str | bytes) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("the token secret is empty")
    return key


def _check_room_role(room: str | None, role: str | None) -> None:
    if (room is None) != (role is None):
        raise ValueError("give both a room and a role, or neither (an identity token)")
    if room is not None and room != ANY_ROOM and not ROOM_NAME.fullmatch(room):
        raise ValueError(f"invalid room name {room!r}: 1-128 characters of A-Za-z0-9._- or *")
    if role is not None and role not in ROLES:
        raise ValueError(f"invalid role {role!r}: one of {', '.join(ROLES)}")


def mint_token(
    secret: str | bytes, room: str | None, role: str | None, sub: str, ttl: float
) -> str:
    """An HS256 JWT of the relay's own issuer, valid for `ttl` seconds from now.

    With `room` (a name or "*") and `role` it is a capability; with neither, an identity token.
    """
    _check_room_role(room, role)
    if not isinstance(sub, str) or not sub or SUBJECT_SEPARATOR in sub:
        raise ValueError(f"the subject (sub) must be a non-empty string without {'#'!r}")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl}")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": LOCAL_ISSUER,
        "aud": LOCAL_AUDIENCE,
        "sub": sub,
        "iat": now,
        "exp": math.ceil(time.time() + ttl),
    }
    if room is not None:
        claims["room"] = room
        claims["role"] = role
    return jwt.encode(claims, _key(secret), algorithm=LOCAL_ALGORITHM)


def _claims_of(payload: Mapping[str, Any], issuer: str, grants_rooms: bool) -> TokenClaims:
    """Our claims from a decoded payload (signature already checked, or not needed)."""
    sub, exp = payload.get("sub"), payload.get("exp")
    room, role = payload.get("room"), payload.get("role")
    if not isinstance(sub, str) or not sub:
        raise TokenError("malformed token: no subject")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise TokenError("malformed token: exp is not an integer")
    if room is not None or role is not None:
        if not isinstance(room, str) or not isinstance(role, str):
            raise TokenError("malformed token: room and role must both be strings")
        try:
            _check_room_role(room, role)
        except ValueError as error:
            raise TokenError(f"malformed token: {error}") from None
        if not grants_rooms:
            raise TokenError(f"issuer {issuer!r} may not grant rooms")
    if issuer == LOCAL_ISSUER:
        if SUBJECT_SEPARATOR in sub:
            raise TokenError(f"malformed token: a subject may not contain {'#'!r}")
        subject = sub
    else:
        subject = f"{issuer}{SUBJECT_SEPARATOR}{sub}"
    return TokenClaims(sub=subject, exp=exp, room=room, role=role, issuer=issuer)  # type: ignore[arg-type]


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a token, unchecked; raises TokenError if it is no JWT."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("malformed token")
    if token.startswith("v1."):
        raise TokenError(V1_REFUSAL)
    # Read with the standard library: only to pick the issuer's key, PyJWT checks everything
    # after (its decoder costs about twice as much again, and this runs for every token).
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("malformed token")
    try:
        header, payload = (
            json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
            for part in parts[:2]
        )
    except (ValueError, binascii.Error):
        raise TokenError("malformed token") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise TokenError("malformed token")
    return header, payload


def read_claims_unverified(token: str) -> TokenClaims:
    """What a token says, without checking its signature or expiry.

    For the token's holder, which needs its own subject (a message's `author`) and cannot
    verify: it may not hold the key. Never use it to grant anything.
    """
    _, payload = _unverified(token)
    issuer = payload.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise TokenError("malformed token: no issuer")
    return _claims_of(payload, issuer, grants_rooms=True)


class _StaticKeys:
    """The keys of a PEM or JWKS file, read once."""

    def __init__(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read key file {path}: {error.strerror}") from None
        self.by_kid: dict[str, jwt.PyJWK] = {}
        self.single: Any = None
        if raw.lstrip().startswith(b"{"):
            try:
                keys = jwt.PyJWKSet.from_json(raw.decode("utf-8")).keys
            except (jwt.PyJWKSetError, jwt.InvalidKeyError, UnicodeDecodeError) as error:
                raise ValueError(f"key file {path} is not a usable JWKS: {error}") from None
            self.by_kid = {key.key_id: key for key in keys if key.key_id}
            if len(keys) == 1:
                self.single = keys[0]
        else:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                self.single = load_pem_public_key(raw)
            except ValueError as error:
                raise ValueError(f"key file {path} is not a PEM public key: {error}") from None

    def key(self, kid: object) -> Any:
        if isinstance(kid, str) and kid in self.by_kid:
            return self.by_kid[kid]
        if self.single is not None and (kid is None or not self.by_kid):
            return self.single
        raise TokenError("unknown signing key (kid)")


class _Trusted:
    def __init__(self, config: Issuer, jwks_timeout: float) -> None:
        self.config = config
        self.static = None if config.key_file is None else _StaticKeys(config.key_file)
        pem = None if self.static is None else self.static.single
        if pem is not None and not isinstance(pem, jwt.PyJWK):
            # A PEM key is a bare key: each pinned algorithm must be able to use it, or a
            # token naming one would fail inside PyJWT instead of being refused.
            for name in config.algorithms:
                try:
                    jwt.get_algorithm_by_name(name).prepare_key(pem)
                except (jwt.InvalidKeyError, TypeError, ValueError):
                    raise ValueError(
                        f"issuer {config.issuer!r}: its PEM key cannot verify {name}"
                    ) from None
        self.client = (
            None
            if config.jwks_url is None
            else jwt.PyJWKClient(
                config.jwks_url,
                cache_jwk_set=True,
                lifespan=config.jwks_lifespan,
                cooldown_duration=config.jwks_refresh,
                timeout=jwks_timeout,
            )
        )

    def key(self, kid: object) -> Any:
        if self.static is not None:
            return self.static.key(kid)
        assert self.client is not None
        if not isinstance(kid, str):
            raise TokenError("unknown signing key: the token has no kid")
        try:
            return self.client.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError:
            raise TokenError("the issuer's keys cannot be fetched now") from None
        except (jwt.PyJWKClientError, jwt.PyJWKSetError):
            raise TokenError("unknown signing key (kid)") from None
        except ValueError:  # the endpoint answered something that is not JSON
            raise TokenError("the issuer's keys cannot be fetched now") from None


_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.MissingRequiredClaimError, "malformed token: a required claim is missing"),
    (jwt.InvalidKeyError, "bad signature"),
)


class TokenVerifier:
    """Checks tokens of the relay's own issuer (if it has a secret) and of trusted issuers."""

    def __init__(
        self,
        secret: str | bytes | None,
        issuers: Sequence[Issuer] = (),
        *,
        jwks_timeout: float = 10.0,
    ) -> None:
        self._secret = None if not secret else _key(secret)
        self._issuers = {config.issuer: _Trusted(config, jwks_timeout) for config in issuers}

    def fetches(self, token: str) -> bool:
        """Whether verifying `token` may wait for the network (its issuer has a JWKS URL)."""
        try:
            _, payload = _unverified(token)
        except TokenError:
            return False
        issuer = payload.get("iss")
        trusted = self._issuers.get(issuer) if isinstance(issuer, str) else None
        return trusted is not None and trusted.client is not None

    def parse(self, token: str) -> TokenClaims:
        """The claims of a valid token, whatever room it is for; raises TokenError otherwise.

        May block on a JWKS fetch when `fetches(token)`: run it in a thread then.
        """
        header, payload = _unverified(token)
        issuer = payload.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise TokenError("malformed token: no issuer")
        if issuer == LOCAL_ISSUER:
            if self._secret is None:
                raise TokenError("untrusted issuer")
            key: Any = self._secret
            algorithms = [LOCAL_ALGORITHM]
            audience: str | list[str] = LOCAL_AUDIENCE
            grants_rooms = True
        else:
            trusted = self._issuers.get(issuer)
            if trusted is None:
                raise TokenError("untrusted issuer")
            algorithms = list(trusted.config.algorithms)
            if header.get("alg") not in algorithms:
                raise TokenError("algorithm not allowed")
            key = trusted.key(header.get("kid"))  # a PyJWK: PyJWT holds it to its own algorithm
            audience = trusted.config.audience
            grants_rooms = trusted.config.grants_rooms
        try:
            decoded = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=audience,
                issuer=issuer,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except TypeError:  # a key of another type than the algorithm's; load_trust_file checks
            raise TokenError("bad signature") from None
        except jwt.PyJWTError as error:
            for kind, reason in _ERRORS:
                if isinstance(error, kind):
                    raise TokenError(reason) from None
            raise TokenError("malformed token") from None
        return _claims_of(decoded, issuer, grants_rooms)

    def verify(self, token: str, room: str) -> TokenClaims:
        """The claims of a token that may be used for `room` now; raises TokenError otherwise.

        Reasons include "malformed token", "bad signature", "expired", "wrong audience",
        "wrong issuer", "untrusted issuer", "algorithm not allowed", "wrong room" and
        "identity token" (the last two in FORBIDDEN_REASONS: HTTP 403).
        """
        claims = self.parse(token)
        if claims.identity:
            raise TokenError("identity token")
        if not claims.allows_room(room):
            raise TokenError("wrong room")
        return claims


def refusal_text(reason: str) -> str:
    """The sentence a refused client is shown."""
    return IDENTITY_REFUSAL if reason == "identity token" else reason


def parse_claims(secret: str | bytes, token: str) -> TokenClaims:
    """A token of the relay's own issuer: signature, shape and expiry, not the room."""
    return TokenVerifier(secret).parse(token)


def verify_token(secret: str | bytes, token: str, room: str) -> TokenClaims:
    """A token of the relay's own issuer that may be used for `room` now."""
    return TokenVerifier(secret).verify(token, room)


def fragment_link(base: str, token: str) -> str:
    """`base` with the token in its fragment: never sent to a server, not in its logs."""
    return f"{base.split('#', 1)[0]}#token={token}"


def token_from_link(link: str) -> str:
    """The token of a `fragment_link` (what a web client reads from `location.hash`)."""
    _, _, fragment = link.partition("#")
    for part in fragment.split("&"):
        name, _, value = part.partition("=")
        if name == "token" and value:
            return value
    raise ValueError("the link carries no #token=")


def terminal_qr(text: str) -> str:
    """`text` as a QR code drawn with Unicode half blocks for a phone's camera.

    segno does the encoding. Two rows of modules share one line; a block is drawn where the
    modules are light, for a terminal with light text on a dark background (as `qrencode -t
    UTF8` draws), with a quiet zone of two modules.
    """
    import segno

    code = segno.make(text, error="m", micro=False)
    rows = [list(row) for row in code.matrix_iter(scale=1, border=2)]
    if len(rows) % 2:
        rows.append([0] * len(rows[0]))
    glyphs = {(0, 0): "█", (1, 0): "▀", (0, 1): "▄", (1, 1): " "}  # light background, dark modules
    lines = []
    for top, bottom in zip(rows[0::2], rows[1::2], strict=True):
        lines.append("".join(glyphs[(bool(a), bool(b))] for a, b in zip(top, bottom, strict=True)))
    return "\n".join(lines)


def qr_modules(drawing: str) -> list[list[int]]:
    """The module matrix a `terminal_qr` drawing shows (1 dark), border included."""
    decode = {"█": (0, 0), "▀": (1, 0), "▄": (0, 1), " ": (1, 1)}
    rows: list[list[int]] = []
    for line in drawing.splitlines():
        pairs = [decode[glyph] for glyph in line]
        rows.append([top for top, _ in pairs])
        rows.append([bottom for _, bottom in pairs])
    return rows


def token_command(args: argparse.Namespace) -> int:
    """`crdtchat token`: print a token signed with CRDTCHAT_SECRET, or a link and QR code."""
    secret = os.environ.get(SECRET_VARIABLE, "")
    if not secret:
        print(f"crdtchat token: {SECRET_VARIABLE} is not set", file=sys.stderr)
        return 1
    try:
        token = mint_token(secret, args.room, args.role, args.sub, args.ttl)
    except ValueError as error:
        print(f"crdtchat token: {error}", file=sys.stderr)
        return 2
    link = getattr(args, "link", None)
    shown = token if link is None else fragment_link(link, token)
    print(shown)
    if getattr(args, "qr", False):
        print(terminal_qr(shown))
    return 0
