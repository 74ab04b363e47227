"""The relay serves the web client (design §6, Web client): the app at `/`, `/c/<room>` and
`/rooms/<room>/join` (an invite link), its files, a strict Content-Security-Policy,
`GET /auth/<room>` for the page to learn that its token was refused, and TLS with
`--tls-cert/--tls-key`. Against a relay subprocess."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.sync.client import connect

from crdtchat.tokens import LOCAL_ALGORITHM, LOCAL_AUDIENCE, LOCAL_ISSUER, mint_token
from crdtchat.web import STATIC
from crdtchat.wire import SyncStep1, decode_frame
from tests.support.relay import SECRET, RelayProcess, running_relay, token


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with running_relay(tmp_path_factory.mktemp("web") / "data") as process:
        yield process


def expired_token(room: str) -> str:
    claims = {"iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "sub": "alice", "exp": 1_000_000}
    return jwt.encode(claims | {"room": room, "role": "writer"}, SECRET, LOCAL_ALGORITHM)


def test_the_app_is_served_at_the_root_and_at_each_conversation(relay: RelayProcess) -> None:
    index = (STATIC / "index.html").read_bytes()
    for path in ("/", "/c/my-chat", "/c/a.b_c-1"):
        response = httpx.get(relay.http_url + path)
        assert response.status_code == 200, path
        assert response.content == index
        assert response.headers["content-type"].startswith("text/html")
    script = httpx.get(relay.http_url + "/static/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.content == (STATIC / "app.js").read_bytes()
    worker = httpx.get(relay.http_url + "/static/sw.js")
    assert worker.headers["service-worker-allowed"] == "/"


def test_an_invite_link_opens_the_app_and_its_post_still_reaches_the_relay(
    relay: RelayProcess,
) -> None:
    """GET of `/rooms/<room>/join` is the page that redeems the link's fragment; the POST of
    the same path is the relay's join endpoint (design §4), which refuses a wrong secret."""
    page = httpx.get(relay.http_url + "/rooms/shared-room/join")
    assert page.status_code == 200
    assert page.content == (STATIC / "index.html").read_bytes()
    assert "script-src 'self'" in page.headers["content-security-policy"]
    refused = httpx.post(
        relay.http_url + "/rooms/shared-room/join",
        json={"secret": "nope.nope"},
        headers={"Authorization": f"Bearer {mint_token(SECRET, None, None, 'bob', 60)}"},
    )
    assert refused.status_code == 403
    assert "this invite is not valid" in refused.text
    for path in ("/rooms/shared-room/summary", "/rooms/a/b/join", "/rooms/shared-room/joins"):
        assert (
            httpx.get(relay.http_url + path).headers["content-type"] != page.headers["content-type"]
        ), path


def test_bad_paths_get_a_clear_answer(relay: RelayProcess) -> None:
    for path in ("/c/not%20a%20room", "/c/a/b", "/static/nope.js", "/static/..%2Fserver%2Fmain.py"):
        response = httpx.get(relay.http_url + path)
        assert response.status_code == 404, path
        assert response.text.strip()


def test_the_content_security_policy_allows_only_the_relay_itself(relay: RelayProcess) -> None:
    policy = httpx.get(relay.http_url + "/c/room").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no inline script, no eval, no other origin
    assert directives["connect-src"] == f"'self' ws://127.0.0.1:{relay.port}"
    assert directives["img-src"] == "'self' blob:"  # remote images never load
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy and "http" not in policy


def test_a_host_header_cannot_inject_into_the_policy(relay: RelayProcess) -> None:
    response = httpx.get(relay.http_url + "/", headers={"host": "evil.example; script-src *"})
    assert "evil" not in response.headers["content-security-policy"]


def test_auth_tells_the_page_whether_its_token_is_good(relay: RelayProcess) -> None:
    def check(tok: str | None, room: str = "room") -> httpx.Response:
        headers = {} if tok is None else {"authorization": f"Bearer {tok}"}
        return httpx.get(f"{relay.http_url}/auth/{room}", headers=headers)

    good = check(token("room", "reader", "bob"))
    assert good.status_code == 200
    assert good.json() | {"exp": 0} == {"room": "room", "role": "reader", "sub": "bob", "exp": 0}
    assert good.headers["cache-control"] == "no-store"
    expired = check(expired_token("room"))
    assert (expired.status_code, expired.text) == (401, "token refused: expired\n")
    wrong = check(token("other"))
    assert (wrong.status_code, wrong.text) == (403, "token refused: wrong room\n")
    assert check(None).status_code == 401
    assert check("v1.garbage.sig").status_code == 401
    assert check(token("room"), room="bad room").status_code == 400
    # An identity token is good for any room here: its role is the room's membership, which
    # the page reads from access.members (the websocket refuses a non-member).
    person = check(mint_token(SECRET, None, None, "carol", 3600))
    assert person.status_code == 200
    assert person.json() | {"exp": 0} == {"room": "room", "role": None, "sub": "carol", "exp": 0}
    claims = {"iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "sub": "carol", "exp": 1_000_000}
    late = check(jwt.encode(claims, SECRET, LOCAL_ALGORITHM))
    assert (late.status_code, late.text) == (401, "token refused: expired\n")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made here."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_serves_the_page_and_the_websocket(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with running_relay(tmp_path / "data", args, use_cli=True) as relay:
        base = f"https://127.0.0.1:{relay.port}"
        page = httpx.get(base + "/c/room", verify=ssl.create_default_context(cafile=cert))
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert f"wss://127.0.0.1:{relay.port}" in policy
        context = ssl.create_default_context(cafile=cert)
        url = f"wss://127.0.0.1:{relay.port}/room?token={token('room')}"
        with connect(url, ssl=context, open_timeout=60) as ws:
            assert isinstance(decode_frame(ws.recv(timeout=30))[0], SyncStep1)
        with pytest.raises(httpx.TransportError):  # and nothing in clear
            httpx.get(f"http://127.0.0.1:{relay.port}/", timeout=10)


def test_tls_options_are_checked_before_serving(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", ["--tls-cert", str(tmp_path / "missing.pem")])
    relay.use_cli = True
    with pytest.raises(RuntimeError, match="--tls-cert and --tls-key go together"):
        relay.start()
