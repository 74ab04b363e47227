"""Access through a real relay (design §3, §4): JWTs of the relay and of trusted issuers,
forgeries refused at the upgrade, JWKS rotation, access that ends when the token expires, the
in-band token refresh, and presence bound to the connection that set it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import jwt
import pytest
from pycrdt import Array, Doc
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from crdtchat.replica import Replica
from crdtchat.tokens import mint_token, read_claims_unverified
from crdtchat.wire import (
    MESSAGE_TOKEN_REFRESH,
    AwarenessEntry,
    AwarenessMessage,
    Extension,
    RefreshAnswer,
    encode_awareness,
    encode_token_refresh,
)
from crdtchat.worker.feed import FEED_PATH
from tests.support.relay import (
    SECRET,
    RelayProcess,
    message_map,
    raw_client,
    running_relay,
    token,
    upgrade_status,
)
from tests.support.replica import wait_doc
from tests.support.tokens import JwksServer, KeyPair, claims, forge_hs256, forge_none, jwks_server
from tests.support.tokens import write_trust_file as write_trust

pytestmark = pytest.mark.anyio

IDP = "https://idp.example/"
ROTATING = "https://rotating.example/"
AUDIENCE = "crdtchat-app"
JWKS_REFRESH = 0.5  # seconds between fetches for an unknown kid


class Access:
    """One relay for the whole module, trusting a PEM-file issuer and a JWKS-URL issuer."""

    def __init__(self, relay: RelayProcess, pem_key: KeyPair, jwks: JwksServer) -> None:
        self.relay = relay
        self.pem_key = pem_key
        self.jwks = jwks


@pytest.fixture(scope="module")
def access(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Access]:
    base = tmp_path_factory.mktemp("access")
    pem_key = KeyPair.generate("EdDSA", "pem-1")
    (base / "idp.pem").write_bytes(pem_key.public_pem())
    with jwks_server([KeyPair.generate("ES256", "jwks-1")]) as jwks:
        trust = write_trust(
            base / "trust.json",
            [
                {
                    "issuer": IDP,
                    "audience": AUDIENCE,
                    "algorithms": ["EdDSA"],
                    "key_file": "idp.pem",
                    "grants_rooms": True,
                },
                {
                    "issuer": ROTATING,
                    "audience": AUDIENCE,
                    "algorithms": ["ES256", "RS256"],
                    "jwks_url": jwks.url,
                    "jwks_refresh": JWKS_REFRESH,
                    "grants_rooms": True,
                },
            ],
        )
        with running_relay(base / "data", ["--trust", str(trust)]) as relay:
            yield Access(relay, pem_key, jwks)


def expired_closes(relay: RelayProcess) -> float:
    """Connections the relay closed for an expired token (absent from /metrics until one)."""
    name = 'crdtchat_closed_connections_total{kind="expired"}'
    text = httpx.get(f"{relay.http_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_forged_tokens_are_refused_at_the_upgrade(access: Access) -> None:
    key = access.pem_key
    good = claims(IDP, "alice", AUDIENCE, room="r1", role="writer")
    assert await upgrade_status(access.relay, "r1", key.sign(good)) == (101, "")
    assert await upgrade_status(access.relay, "r1", token("r1")) == (101, "")
    forged = [
        (KeyPair.generate("EdDSA", key.kid).sign(good), 401, "bad signature"),
        (forge_none(good), 401, "algorithm not allowed"),
        (forge_hs256(good, key.public_pem(), key.kid), 401, "algorithm not allowed"),
        (key.sign({**good, "exp": int(time.time()) - 5}), 401, "expired"),
        (key.sign({**good, "aud": "other-app"}), 401, "wrong audience"),
        (key.sign({**good, "iss": "https://evil.example/"}), 401, "untrusted issuer"),
        # The relay's own issuer, HS256 keyed with the EdDSA public key instead of the secret.
        (
            forge_hs256(
                claims("crdtchat", "alice", "crdtchat", room="r1", role="writer"),
                key.public_pem(),
            ),
            401,
            "bad signature",
        ),
        (mint_token(SECRET, "r2", "writer", "alice", 60), 403, "wrong room"),
        # An identity token for a room it is not a member of: tests/relay/test_relay_membership.py.
        ("v1.eyJyb29tIjoicjEifQ.c2ln", 401, "v1 tokens are no longer accepted"),
        (forge_hs256({**good, "iss": [IDP]}, SECRET.encode()), 401, "malformed token: no issuer"),
    ]
    for tok, status, reason in forged:
        got_status, body = await upgrade_status(access.relay, "r1", tok)
        assert got_status == status and reason in body, (reason, got_status, body)


async def test_jwks_rotation_is_picked_up_without_restart(access: Access) -> None:
    jwks = access.jwks
    first = jwks.keys[0]
    room_claims = claims(ROTATING, "bob", AUDIENCE, room="r2", role="reader")
    assert (await upgrade_status(access.relay, "r2", first.sign(room_claims)))[0] == 101
    # The issuer rotates: a new key (another algorithm, too) replaces the old one.
    second = KeyPair.generate("RS256", "jwks-2")
    jwks.keys = [second]
    started = time.monotonic()
    fetches_before = jwks.fetches
    with anyio.fail_after(30):
        while (status := await upgrade_status(access.relay, "r2", second.sign(room_claims)))[
            0
        ] != 101:
            assert status == (401, "token refused: unknown signing key (kid)"), status
            await anyio.sleep(0.1)  # the relay refetches at most once per JWKS_REFRESH
    # A token signed with the retired key is refused now, and unknown kids do not make the
    # relay fetch the set more than once per interval.
    assert (await upgrade_status(access.relay, "r2", first.sign(room_claims)))[0] == 401
    for n in range(20):
        stray = KeyPair.generate("ES256", f"stray-{n}")
        assert (await upgrade_status(access.relay, "r2", stray.sign(room_claims)))[0] == 401
    elapsed = time.monotonic() - started
    assert jwks.fetches - fetches_before <= 2 + elapsed / JWKS_REFRESH


async def _write(client, msg_id: str, author: str = "writer") -> None:  # type: ignore[no-untyped-def]
    await client.push(lambda doc: client.messages.append(message_map(msg_id, "user", author, "hi")))


async def _sleep_until(moment: float) -> None:
    """Wait for a point in time (a token's expiry): there is no event to wait for instead."""
    await anyio.sleep(max(0.0, moment - time.time()))


@pytest.mark.parametrize("role", ["reader", "writer"])
async def test_expired_token_ends_a_live_connection(access: Access, role: str) -> None:
    relay = access.relay
    room = f"expiry-{role}"
    short = token(room, role, "shortlived", ttl=2)
    expires = int(time.time()) + 3  # at most this (mint rounds the expiry up)
    closed_before = expired_closes(relay)
    async with (
        raw_client(relay.url(room, token(room, "writer", "writer"), ack=True)) as writer,
        raw_client(relay.url(room, short)) as holder,
    ):
        await _write(writer, "before")
        await holder.wait_for(lambda: len(holder.messages) == 1)
        code, reason = await holder.wait_closed(timeout=expires - time.time() + 20)
        closed_at = time.time()
        assert (code, reason) == (4401, "token expired")
        await _write(writer, "after")
        await writer.wait_acked()
        assert holder.texts() == ["hi"]  # nothing after the expiry reached it
        assert closed_at >= expires - 1.5  # not before its time (exp is whole seconds)
    assert await upgrade_status(relay, room, short) == (401, "token refused: expired")
    after = expired_closes(relay)
    assert after == closed_before + 1


async def test_in_band_refresh_keeps_a_connection_past_expiry(access: Access) -> None:
    relay = access.relay
    room = "refresh"
    short = token(room, "reader", "carol", ttl=2)
    expires = read_exp(short)
    url = relay.url(room, short) + "&ext=refresh"
    async with (
        raw_client(relay.url(room, token(room, "writer", "writer"), ack=True)) as writer,
        raw_client(url) as reader,
    ):

        def answers() -> list[RefreshAnswer]:
            return [
                RefreshAnswer.decode(m.payload)
                for m in reader.received
                if isinstance(m, Extension) and m.type == MESSAGE_TOKEN_REFRESH
            ]

        # Refusals keep the old token: another subject, another room, a forgery.
        for bad in (
            token(room, "reader", "mallory", ttl=60),
            token("elsewhere", "reader", "carol", ttl=60),
            forge_none(claims("crdtchat", "carol", "crdtchat", room=room, role="reader")),
        ):
            await reader.send(encode_token_refresh(bad))
        await reader.wait_for(lambda: len(answers()) == 3)
        assert [a.accepted for a in answers()] == [False, False, False]
        assert "same subject" in answers()[0].reason
        assert "wrong room" in answers()[1].reason
        fresh = token(room, "reader", "carol", ttl=60)
        await reader.send(encode_token_refresh(fresh))
        await reader.wait_for(lambda: len(answers()) == 4)
        assert answers()[3] == RefreshAnswer(True, exp=read_exp(fresh))
        await _sleep_until(expires + 1.5)
        await _write(writer, "past-expiry")
        await reader.wait_for(lambda: len(reader.messages) == 1)
        assert not reader.closed


def read_exp(tok: str) -> int:
    return read_claims_unverified(tok).exp


async def test_replica_refreshes_its_token_in_band(access: Access, tmp_path: Path) -> None:
    relay = access.relay
    room = "replica-refresh"
    minted: list[str] = []

    def provider() -> str:
        minted.append(token(room, "writer", "dana", ttl=3))
        return minted[-1]

    closed_before = expired_closes(relay)
    base = f"ws://{relay.host}:{relay.port}"
    async with Replica(base, room, provider(), token_provider=provider) as replica:
        await replica.wait_until(lambda s: s.synced, timeout=30)
        first_exp = read_exp(minted[0])
        async with raw_client(relay.url(room, token(room, "writer", "writer"), ack=True)) as w:
            await _sleep_until(first_exp + 1.5)
            await _write(w, "late")
            messages = replica.doc.get("canonical.messages", type=Array)
            await wait_doc(replica.doc, lambda: len(messages) == 1, timeout=20)
        assert replica.status.connected and replica.status.rejected is None
        assert len(minted) >= 2
    after = expired_closes(relay)
    assert after == closed_before  # never cut off: the refresh came first


async def test_replica_shows_expiry_and_keeps_edits_until_a_fresh_token(access: Access) -> None:
    relay = access.relay
    room = "replica-expiry"
    base = f"ws://{relay.host}:{relay.port}"
    async with Replica(base, room, token(room, "writer", "erin", ttl=2)) as replica:
        await replica.wait_until(lambda s: s.synced, timeout=30)
        await replica.wait_until(lambda s: s.rejected is not None, timeout=30)
        assert replica.status.rejected == "token expired"
        messages = replica.doc.get("canonical.messages", type=Array)
        messages.append(message_map("offline-edit", "user", "erin", "kept"))
        assert replica.status.pending >= 1
        replica.set_token(token(room, "writer", "erin", ttl=600))
        await replica.wait_until(lambda s: s.connected and s.durable, timeout=30)
    async with raw_client(relay.url(room, token(room, "reader", "check"))) as check:
        assert check.texts() == ["kept"]


async def test_presence_is_bound_to_its_connection(access: Access) -> None:
    relay = access.relay
    room = "presence"
    async with (
        raw_client(relay.url(room, token(room, "writer", "alice"))) as alice,
        raw_client(relay.url(room, token(room, "writer", "mallory"))) as mallory,
        raw_client(relay.url(room, token(room, "reader", "observer"))) as observer,
    ):
        await alice.set_presence(111, 1, {"user": "alice"})
        await observer.wait_for(lambda: 111 in observer.awareness)
        # mallory overwrites alice's state, then clears it, with ever higher clocks...
        await mallory.set_presence(111, 5, {"user": "mallory"})
        await mallory.send(*_removal(111, 6))
        # ...and then sets its own, which is allowed: once the observer sees it, the relay
        # has handled everything mallory sent before.
        await mallory.set_presence(222, 1, {"user": "mallory"})
        await observer.wait_for(lambda: 222 in observer.awareness)
        assert observer.awareness[111] == (1, '{"user": "alice"}')
        # alice still owns 111 and may change it; once she leaves, the id is free again.
        await alice.set_presence(111, 2, {"user": "alice", "typing": True})
        await observer.wait_for(lambda: observer.awareness[111][0] == 2)


def _removal(client_id: int, clock: int) -> list[AwarenessMessage]:
    return [AwarenessMessage(encode_awareness([AwarenessEntry(client_id, clock, "null")]))]


async def test_replica_with_a_provider_replaces_a_refused_token_and_keeps_edits(
    access: Access,
) -> None:
    relay = access.relay
    room = "replica-provider"
    expired = jwt.encode(
        claims("crdtchat", "fay", "crdtchat", ttl=-10, room=room, role="writer"), SECRET
    )
    fresh: list[str] = []

    def provider() -> str:
        fresh.append(token(room, "writer", "fay", ttl=600))
        return fresh[-1]

    base = f"ws://{relay.host}:{relay.port}"
    doc = Doc()
    doc.get("canonical.messages", type=Array).append(message_map("m", "user", "fay", "offline"))
    async with Replica(base, room, expired, doc=doc, token_provider=provider) as replica:
        await replica.wait_until(lambda s: s.synced and s.durable, timeout=30)
        assert replica.status.denied == "token refused: expired"  # what the person is shown
        assert len(fresh) == 1
    async with raw_client(relay.url(room, token(room, "reader", "check"))) as check:
        assert check.texts() == ["offline"]


async def test_feed_and_blobs_follow_the_same_rules(access: Access) -> None:
    relay = access.relay
    feed_url = f"ws://{relay.host}:{relay.port}{FEED_PATH}?token="
    async with connect(feed_url + token("*", "worker", "w", ttl=2)) as feed:
        with anyio.fail_after(30):
            with pytest.raises(ConnectionClosed):
                while True:
                    await feed.recv()
        assert (feed.close_code, feed.close_reason) == (4401, "token expired")
    identity = mint_token(SECRET, None, None, "alice", 60)
    blob = httpx.get(f"{relay.http_url}/blobs/r1/{'0' * 64}?token={identity}", timeout=30)
    assert blob.status_code == 403 and "alice is not a member" in blob.text
