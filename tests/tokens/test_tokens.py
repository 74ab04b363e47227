"""crdtchat.tokens: JWTs of the relay's own issuer and of trusted ones, every refusal reason,
and the `crdtchat token` command (identity tokens, sign-in links, QR codes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import segno
from hypothesis import given
from hypothesis import strategies as st

from crdtchat.tokens import (
    V1_REFUSAL,
    Issuer,
    TokenError,
    TokenVerifier,
    fragment_link,
    load_trust_file,
    mint_token,
    parse_claims,
    qr_modules,
    read_claims_unverified,
    terminal_qr,
    token_from_link,
    verify_token,
)
from tests.support import REPO
from tests.support.tokens import ALGORITHMS, KeyPair, claims, forge_hs256, forge_none

SECRET = "s3cret-that-is-at-least-32-bytes-long"
IDP = "https://idp.example/"
AUDIENCE = "crdtchat-app"


def test_round_trip_and_claims() -> None:
    token = mint_token(SECRET, "conv-1", "writer", "alice", 60)
    claims_ = verify_token(SECRET, token, "conv-1")
    assert (claims_.room, claims_.role, claims_.sub) == ("conv-1", "writer", "alice")
    assert time.time() < claims_.exp <= time.time() + 61
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert read_claims_unverified(token) == claims_


def test_star_matches_every_room() -> None:
    token = mint_token(SECRET, "*", "worker", "w1", 60)
    assert verify_token(SECRET, token, "any.room").sub == "w1"
    assert verify_token(SECRET, token, "other").role == "worker"


def test_identity_token_names_a_person_and_no_room() -> None:
    token = mint_token(SECRET, None, None, "alice", 60)
    parsed = parse_claims(SECRET, token)
    assert parsed.identity and parsed.room is None and parsed.sub == "alice"
    with pytest.raises(TokenError) as caught:
        verify_token(SECRET, token, "conv-1")
    assert caught.value.reason == "identity token"


def _local(**changes: object) -> dict[str, object]:
    base = claims("crdtchat", "a", "crdtchat", room="r", role="reader")
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    ("token_of", "room", "reason"),
    [
        (
            lambda: mint_token("other secret, also 32 bytes long!", "r", "reader", "a", 60),
            "r",
            "bad signature",
        ),
        (lambda: mint_token(SECRET, "r", "reader", "a", 60), "s", "wrong room"),
        (lambda: jwt.encode(_local(exp=int(time.time()) - 5), SECRET), "r", "expired"),
        (lambda: jwt.encode(_local(nbf=int(time.time()) + 600), SECRET), "r", "not yet valid"),
        (lambda: jwt.encode(_local(aud="someone-else"), SECRET), "r", "wrong audience"),
        (
            lambda: jwt.encode(_local(aud=None), SECRET),
            "r",
            "malformed token: a required claim is missing",
        ),
        (
            lambda: jwt.encode(_local(iss="https://nobody.example/"), SECRET),
            "r",
            "untrusted issuer",
        ),
        (lambda: forge_none(_local()), "r", "algorithm not allowed"),
        (lambda: jwt.encode(_local(), SECRET, algorithm="HS512"), "r", "algorithm not allowed"),
        (lambda: jwt.encode(_local(role="admin"), SECRET), "r", "malformed token: invalid role"),
        (lambda: jwt.encode(_local(role=None), SECRET), "r", "malformed token"),
        (lambda: jwt.encode(_local(sub="x#y"), SECRET), "r", "malformed token"),
        (lambda: forge_hs256(_local(iss=["crdtchat"]), SECRET.encode()), "r", "malformed token"),
        (lambda: "v1.eyJyb29tIjoiciJ9.c2ln", "r", V1_REFUSAL),
        (lambda: "", "r", "malformed token"),
        (lambda: "a.b", "r", "malformed token"),
        (lambda: "not.a.jwt", "r", "malformed token"),
    ],
)
def test_refusal_reasons(token_of, room, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TokenError) as caught:
        verify_token(SECRET, token_of(), room)
    assert caught.value.reason.startswith(reason)


def test_mint_refuses_bad_input() -> None:
    for args in [
        ("bad room!", "writer", "a", 1),
        ("r", "admin", "a", 1),
        ("r", "writer", "", 1),
        ("r", None, "a", 1),
        (None, "writer", "a", 1),
        ("r", "writer", "x#y", 1),
    ]:
        with pytest.raises(ValueError):
            mint_token(SECRET, *args)
    with pytest.raises(ValueError):
        mint_token(SECRET, "r", "writer", "a", 0)
    with pytest.raises(ValueError):
        mint_token("", "r", "writer", "a", 10)


@given(st.text(max_size=300))
def test_arbitrary_strings_raise_only_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        parse_claims(SECRET, text)


# -- trusted issuers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, KeyPair]:
    return {algorithm: KeyPair.generate(algorithm, f"k-{algorithm}") for algorithm in ALGORITHMS}


def _issuer(tmp_path: Path, key: KeyPair, **more: object) -> Issuer:
    path = tmp_path / f"{key.kid}.pem"
    path.write_bytes(key.public_pem())
    config = {"issuer": IDP, "audience": AUDIENCE, "algorithms": [key.algorithm], "key_file": path}
    return Issuer.model_validate({**config, **more})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_public_key_issuer_accepts_its_tokens_with_namespaced_subjects(
    tmp_path: Path, keys: dict[str, KeyPair], algorithm: str
) -> None:
    key = keys[algorithm]
    verifier = TokenVerifier(SECRET, [_issuer(tmp_path, key, grants_rooms=True)])
    identity = verifier.parse(key.sign(claims(IDP, "auth0|alice", AUDIENCE)))
    assert (identity.sub, identity.identity, identity.issuer) == (f"{IDP}#auth0|alice", True, IDP)
    capability = verifier.verify(
        key.sign(claims(IDP, "alice", AUDIENCE, room="r", role="writer")), "r"
    )
    assert capability.role == "writer"
    # The relay's own "alice" is somebody else.
    own = verifier.verify(mint_token(SECRET, "r", "writer", "alice", 60), "r")
    assert own.sub == "alice" != capability.sub
    # The holder computes the same subject without the key.
    assert read_claims_unverified(key.sign(claims(IDP, "alice", AUDIENCE))).sub == f"{IDP}#alice"


def test_forged_tokens_of_a_trusted_issuer_are_refused(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    key = keys["RS256"]
    verifier = TokenVerifier(SECRET, [_issuer(tmp_path, key, grants_rooms=True)])
    good = claims(IDP, "alice", AUDIENCE, room="r", role="writer")
    other = KeyPair.generate("RS256", key.kid)
    forged = {
        "bad signature": other.sign(good),
        "algorithm not allowed": forge_none(good),
        # HS256 keyed with the issuer's public key, as if the relay took it for a secret
        "algorithm not allowed ": forge_hs256(good, key.public_pem(), key.kid),
        "expired": key.sign({**good, "exp": int(time.time()) - 10}),
        "not yet valid": key.sign({**good, "nbf": int(time.time()) + 600}),
        "wrong audience": key.sign({**good, "aud": "another-app"}),
        "untrusted issuer": key.sign({**good, "iss": "https://evil.example/"}),
        "algorithm not allowed  ": keys["ES256"].sign(good),  # pinned to RS256
    }
    for reason, token in forged.items():
        with pytest.raises(TokenError) as caught:
            verifier.verify(token, "r")
        assert caught.value.reason == reason.strip(), reason
    # The HS/RS confusion also fails against the relay's own issuer: its key is the secret.
    with pytest.raises(TokenError, match="bad signature"):
        verifier.verify(forge_hs256(_local(), key.public_pem()), "r")


def test_an_identity_provider_may_not_grant_rooms_unless_trusted_to(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    key = keys["EdDSA"]
    verifier = TokenVerifier(SECRET, [_issuer(tmp_path, key)])
    with pytest.raises(TokenError, match="may not grant rooms"):
        verifier.verify(key.sign(claims(IDP, "alice", AUDIENCE, room="*", role="worker")), "r")


def test_trust_file_is_checked_when_loaded(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    (tmp_path / "k.pem").write_bytes(keys["ES256"].public_pem())
    good = {"issuer": IDP, "audience": AUDIENCE, "algorithms": ["ES256"], "key_file": "k.pem"}
    path = tmp_path / "trust.json"
    path.write_text(f'{{"issuers": [{_json(good)}]}}')
    (loaded,) = load_trust_file(path)
    assert loaded.key_file == tmp_path / "k.pem"  # relative to the trust file
    bad = [
        {**good, "algorithms": ["HS256"]},
        {**good, "algorithms": ["ES256", "RS256"]},  # the PEM key is an EC key
        {**good, "algorithms": ["none"]},
        {**good, "algorithms": []},
        {**good, "jwks_url": "https://idp.example/jwks"},
        {k: v for k, v in good.items() if k != "key_file"},
        {**good, "issuer": "crdtchat"},
        {**good, "key_file": "missing.pem"},
        {**good, "surprise": 1},
    ]
    for config in bad:
        path.write_text(f'{{"issuers": [{_json(config)}]}}')
        with pytest.raises(ValueError):
            load_trust_file(path)


def test_jwks_file_keys_are_held_to_their_algorithms(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    ed, rs = keys["EdDSA"], keys["RS256"]
    path = tmp_path / "jwks.json"
    path.write_text(_json({"keys": [ed.jwk(), rs.jwk()]}))
    config = {"issuer": IDP, "audience": AUDIENCE, "algorithms": ["EdDSA", "RS256"]}
    verifier = TokenVerifier(SECRET, [Issuer.model_validate({**config, "key_file": path})])
    for key in (ed, rs):
        assert verifier.parse(key.sign(claims(IDP, "alice", AUDIENCE))).sub == f"{IDP}#alice"
    # An RS256 token that names the EdDSA key's kid is not checked with that key.
    swapped = rs.sign(claims(IDP, "alice", AUDIENCE), kid=ed.kid)
    with pytest.raises(TokenError, match="algorithm not allowed"):
        verifier.parse(swapped)
    with pytest.raises(TokenError, match="unknown signing key"):
        verifier.parse(KeyPair.generate("RS256", "nobody").sign(claims(IDP, "a", AUDIENCE)))


def _json(value: object) -> str:
    import json

    return json.dumps(value)


# -- the command ---------------------------------------------------------------------------


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
    env["CRDTCHAT_SECRET"] = SECRET
    done = _run_token_command(env, *args)
    assert done.returncode == 0, done.stderr
    claims_ = verify_token(SECRET, done.stdout.strip(), "conv-1")
    assert (claims_.role, claims_.sub) == ("writer", "alice")
    bad_room = _run_token_command(env, "--room", "no spaces", "--role", "reader", "--sub", "x")
    assert bad_room.returncode == 2
    assert "invalid room name" in bad_room.stderr
    half = _run_token_command(env, "--room", "conv-1", "--sub", "x")
    assert half.returncode == 2 and "both a room and a role" in half.stderr


def test_token_command_identity_link_and_qr() -> None:
    env = {**os.environ, "CRDTCHAT_SECRET": SECRET}
    base = "https://chat.example/app"
    done = _run_token_command(env, "--sub", "alice", "--link", base, "--qr")
    assert done.returncode == 0, done.stderr
    link, *drawing = done.stdout.rstrip("\n").split("\n")
    assert link.startswith(base + "#token=")
    identity = parse_claims(SECRET, token_from_link(link))
    assert identity.identity and identity.sub == "alice"
    # The drawing shows exactly the QR code of the link: its modules, read back from the
    # half blocks, are segno's encoding of that text.
    expected = [list(row) for row in segno.make(link, error="m").matrix_iter(border=2)]
    assert qr_modules("\n".join(drawing))[: len(expected)] == [
        [int(bool(v)) for v in row] for row in expected
    ]
    assert terminal_qr(link) == "\n".join(drawing)  # deterministic


def test_fragment_link_round_trip() -> None:
    assert fragment_link("https://x.example/a#old", "T") == "https://x.example/a#token=T"
    assert token_from_link("https://x.example/a#x=1&token=T") == "T"
    with pytest.raises(ValueError):
        token_from_link("https://x.example/a")
