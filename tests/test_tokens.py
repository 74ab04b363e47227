"""crdtchat.tokens: signing, every refusal reason, and the `crdtchat token` command."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtchat.tokens import TokenError, mint_token, parse_claims, verify_token

SECRET = "s3cret"
REPO = Path(__file__).resolve().parent.parent


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signed(payload: bytes, secret: str = SECRET) -> str:
    """A correctly signed token around an arbitrary payload (to reach the payload checks)."""
    part = _b64(payload)
    signature = hmac.new(secret.encode(), part.encode(), hashlib.sha256).digest()
    return f"v1.{part}.{_b64(signature)}"


def test_round_trip_and_claims() -> None:
    token = mint_token(SECRET, "conv-1", "writer", "alice", 60)
    claims = verify_token(SECRET, token, "conv-1")
    assert (claims.room, claims.role, claims.sub) == ("conv-1", "writer", "alice")
    assert time.time() < claims.exp <= time.time() + 61
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


def test_star_matches_every_room() -> None:
    token = mint_token(SECRET, "*", "worker", "w1", 60)
    assert verify_token(SECRET, token, "any.room").sub == "w1"
    assert verify_token(SECRET, token, "other").role == "worker"


@pytest.mark.parametrize(
    ("token_of", "room", "now", "reason"),
    [
        (lambda: mint_token("other secret", "r", "reader", "a", 60), "r", None, "bad signature"),
        (lambda: mint_token(SECRET, "r", "reader", "a", 60), "s", None, "wrong room"),
        # `now` is seconds after the token is minted: collection happens long before the run.
        (lambda: mint_token(SECRET, "r", "reader", "a", 60), "r", 120, "expired"),
        (lambda: "", "r", None, "malformed token"),
        (lambda: "v1.abc", "r", None, "malformed token"),
        (lambda: "v2.abc.def", "r", None, "malformed token"),
        (lambda: "v1.a+b.c", "r", None, "malformed token"),
        (lambda: _signed(b"not json"), "r", None, "malformed token"),
        (lambda: _signed(b"[1,2]"), "r", None, "malformed token"),
        (
            lambda: _signed(
                json.dumps({"room": "r", "role": "admin", "sub": "a", "exp": 2**40}).encode()
            ),
            "r",
            None,
            "malformed token",
        ),
        (
            lambda: _signed(
                json.dumps({"room": "r", "role": "reader", "sub": "a", "exp": "x"}).encode()
            ),
            "r",
            None,
            "malformed token",
        ),
    ],
)
def test_refusal_reasons(token_of, room, now, reason) -> None:  # type: ignore[no-untyped-def]
    token = token_of()
    at = None if now is None else time.time() + now
    with pytest.raises(TokenError) as caught:
        verify_token(SECRET, token, room, now=at)
    assert caught.value.reason == reason


def test_tampered_payload_is_a_bad_signature() -> None:
    token = mint_token(SECRET, "r", "reader", "alice", 60)
    version, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "worker"
    forged = f"{version}.{_b64(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(TokenError, match="bad signature"):
        verify_token(SECRET, forged, "r")


def test_mint_refuses_bad_input() -> None:
    for args in [("bad room!", "writer", "a", 1), ("r", "admin", "a", 1), ("r", "writer", "", 1)]:
        with pytest.raises(ValueError):
            mint_token(SECRET, *args)
    with pytest.raises(ValueError):
        mint_token(SECRET, "r", "writer", "a", 0)
    with pytest.raises(ValueError):
        mint_token("", "r", "writer", "a", 10)


@given(st.text(max_size=200))
def test_arbitrary_strings_raise_only_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        parse_claims(SECRET, text)


def _run_token_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crdtchat.cli", "token", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_token_command() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CRDTCHAT_SECRET"}
    args = ("--room", "conv-1", "--role", "writer", "--sub", "alice", "--ttl", "30")
    missing = _run_token_command(env, *args)
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.strip().splitlines() == ["crdtchat token: CRDTCHAT_SECRET is not set"]
    done = _run_token_command({**env, "CRDTCHAT_SECRET": SECRET}, *args)
    assert done.returncode == 0, done.stderr
    claims = verify_token(SECRET, done.stdout.strip(), "conv-1")
    assert (claims.role, claims.sub) == ("writer", "alice")
    bad_room = _run_token_command(
        {**env, "CRDTCHAT_SECRET": SECRET}, "--room", "no spaces", "--role", "reader", "--sub", "x"
    )
    assert bad_room.returncode == 2
    assert "invalid room name" in bad_room.stderr
