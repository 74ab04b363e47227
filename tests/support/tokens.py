"""Test support for JWTs: key pairs of every allowed kind, forged tokens, a loopback JWKS server.

Forgeries are built by hand (base64url JSON and an HMAC) where PyJWT would refuse to make them,
e.g. an HS256 token keyed with a public key, so the relay sees exactly what an attacker sends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ALGORITHMS = ("EdDSA", "ES256", "RS256")


@dataclass
class KeyPair:
    algorithm: str
    private: Any
    kid: str

    @classmethod
    def generate(cls, algorithm: str, kid: str) -> KeyPair:
        if algorithm == "EdDSA":
            private: Any = ed25519.Ed25519PrivateKey.generate()
        elif algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(algorithm, private, kid)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        data = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def sign(self, claims: dict[str, Any], *, kid: str | None = "own") -> str:
        headers = {"kid": self.kid if kid == "own" else kid} if kid is not None else None
        return jwt.encode(claims, self.private, algorithm=self.algorithm, headers=headers)


def claims(iss: str, sub: str, aud: str, ttl: float = 3600, **more: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + int(ttl), **more}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _part(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def forge_none(payload: dict[str, Any]) -> str:
    """`alg: none`, no signature."""
    return f"{_part({'alg': 'none', 'typ': 'JWT'})}.{_part(payload)}."


def forge_hs256(payload: dict[str, Any], key: bytes, kid: str | None = None) -> str:
    """HS256 keyed with arbitrary bytes, e.g. a public key's PEM (the HS/RS confusion)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{_part(header)}.{_part(payload)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@dataclass
class JwksServer:
    """A loopback HTTP server answering GET /jwks.json with the current keys; counts fetches."""

    keys: list[KeyPair] = field(default_factory=list)
    fetches: int = 0
    url: str = ""

    def body(self) -> bytes:
        return json.dumps({"keys": [key.jwk() for key in self.keys]}).encode()


@contextmanager
def jwks_server(keys: list[KeyPair]) -> Iterator[JwksServer]:
    state = JwksServer(list(keys))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                state.fetches += 1
                body = state.body()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def write_trust_file(path: Path, issuers: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"issuers": issuers}))
    return path
