"""Cost of checking a token at the upgrade: JWTs (PyJWT) side by side with the dropped v1 scheme.

The relay checks a token once per connection (and once per blob request, and per in-band
refresh). This times, in one run and interleaved, the verification of:

- the anchor: a v1 token as the relay checked it before JWTs (HMAC-SHA256 of the payload part,
  a constant-time compare, JSON of the payload), written out here since the code is gone;
- a JWT of the relay's own issuer (HS256), through `TokenVerifier.verify`;
- JWTs of a trusted issuer, through the same call, signed EdDSA, ES256 and RS256 (keys from a
  PEM file, as `key_file` loads them; a JWKS URL's keys are the same objects once cached).

Reported per token kind: µs per check (median of rounds) and the ratio to the anchor.

Run: .venv/bin/python benchmarks/access_tokens.py [--quick]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crdtchat.tokens import Issuer, TokenVerifier, mint_token
from tests.support.tokens import KeyPair, claims

SECRET = "benchmark-secret-for-the-relay-32-bytes"
IDP = "https://idp.example/"
AUDIENCE = "crdtchat-app"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def v1_token(room: str, role: str, sub: str, ttl: float) -> str:
    payload = json.dumps(
        {"room": room, "role": role, "sub": sub, "exp": int(time.time() + ttl)},
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    part = _b64(payload)
    signature = hmac.new(SECRET.encode(), part.encode(), hashlib.sha256).digest()
    return f"v1.{part}.{_b64(signature)}"


def v1_verify(token: str, room: str) -> dict[str, object]:
    """What the relay did per v1 token (signature, shape, expiry, room)."""
    _, part, signature = token.split(".")
    expected = _b64(hmac.new(SECRET.encode(), part.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise ValueError("bad signature")
    payload = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    if payload["exp"] <= time.time() or payload["room"] not in ("*", room):
        raise ValueError("refused")
    return payload


def per_check(check: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        check()
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, count = (3, 200) if args.quick else (9, 2000)
    checks: dict[str, Callable[[], object]] = {}
    anchor = v1_token("r", "writer", "alice", 3600)
    checks["v1 HMAC (anchor)"] = lambda: v1_verify(anchor, "r")
    own = TokenVerifier(SECRET)
    hs = mint_token(SECRET, "r", "writer", "alice", 3600)
    checks["JWT HS256, own issuer"] = lambda: own.verify(hs, "r")
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in ("EdDSA", "ES256", "RS256"):
            key = KeyPair.generate(algorithm, f"k-{algorithm}")
            pem = Path(tmp) / f"{algorithm}.pem"
            pem.write_bytes(key.public_pem())
            verifier = TokenVerifier(
                SECRET,
                [
                    Issuer(
                        issuer=IDP,
                        audience=AUDIENCE,
                        algorithms=[algorithm],  # type: ignore[list-item]
                        key_file=pem,
                        grants_rooms=True,
                    )
                ],
            )
            tok = key.sign(claims(IDP, "alice", AUDIENCE, room="r", role="writer"))
            checks[f"JWT {algorithm}, trusted issuer"] = lambda verifier=verifier, tok=tok: (
                verifier.verify(tok, "r")
            )
        for check in checks.values():
            check()  # warm up, and fail loudly if any is refused
        times: dict[str, list[float]] = {name: [] for name in checks}
        for _ in range(rounds):  # interleaved: load changes hit every kind alike
            for name, check in checks.items():
                times[name].append(per_check(check, count))
    base = statistics.median(times["v1 HMAC (anchor)"])
    print(f"{rounds} rounds of {count} checks each, median per check")
    print("| token | µs per check | × anchor |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e6:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
