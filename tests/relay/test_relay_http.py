"""HTTP on the relay's port: /healthz, /metrics, handshake refusals, `crdtchat serve`.

Blobs: test_relay_blobs.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.relay import REPO, RelayProcess, message_map, raw_client, running_relay, token


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    data = Path(tmp_path_factory.mktemp("http")) / "data"
    with running_relay(data) as process:
        yield process


def test_healthz_and_metrics(relay: RelayProcess) -> None:
    assert httpx.get(f"{relay.http_url}/healthz").text == "ok\n"
    metrics = httpx.get(f"{relay.http_url}/metrics").text
    for name in (
        "crdtchat_rooms",
        "crdtchat_connections",
        "crdtchat_updates_in_total",
        "crdtchat_updates_out_total",
        "crdtchat_bytes_in_total",
        "crdtchat_bytes_out_total",
        "crdtchat_refused_writes_total",
        'crdtchat_store_write_seconds_bucket{le="+Inf"}',
        "crdtchat_store_write_seconds_count",
    ):
        assert f"\n{name} " in metrics or metrics.startswith(f"{name} ") or f"{name} " in metrics
    assert "# TYPE crdtchat_store_write_seconds histogram" in metrics


@pytest.mark.anyio
async def test_metrics_follow_traffic(relay: RelayProcess) -> None:
    def value(name: str) -> float:
        for line in httpx.get(f"{relay.http_url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(name)

    stored_before = value("crdtchat_store_write_seconds_count")
    out_before = value("crdtchat_updates_out_total")
    room = "metered"
    async with (
        raw_client(relay.url(room, token(room, "writer", "a"), ack=True)) as a,
        raw_client(relay.url(room, token(room, "reader", "b"))) as b,
    ):
        assert value("crdtchat_connections") >= 2
        await a.push(lambda doc: a.messages.append(message_map("m1", "user", "a", "x")))
        await a.wait_acked()
        await b.wait_for(lambda: len(b.messages) == 1)
        assert value("crdtchat_store_write_seconds_count") == stored_before + 1
        assert value("crdtchat_updates_out_total") == out_before + 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "status", "text"),
    [
        ("/room?token=", 401, "token is required"),
        ("/room?token=garbage", 401, "malformed token"),
        ("/room?token={other}", 403, "wrong room"),
        ("/bad%20room?token={good}", 400, "the path must be"),
    ],
)
async def test_handshake_refusals(relay: RelayProcess, path: str, status: int, text: str) -> None:
    filled = path.format(other=token("elsewhere"), good=token("room"))
    with pytest.raises(InvalidStatus) as caught:
        async with connect(f"ws://{relay.host}:{relay.port}{filled}"):
            pass
    response = caught.value.response
    assert response.status_code == status
    assert text in response.body.decode()


def test_crdtchat_serve_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", use_cli=True).start()
    assert httpx.get(f"{relay.http_url}/healthz").status_code == 200
    assert relay.terminate() == 0


def test_crdtchat_serve_needs_the_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CRDTCHAT_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "crdtchat.cli", "serve", "--port", "0", "--data", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["crdtchat serve: CRDTCHAT_SECRET is not set"]


def test_crdtchat_serve_reports_a_busy_port(relay: RelayProcess, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "crdtchat.cli",
            "serve",
            "--port",
            str(relay.port),
            "--data",
            str(tmp_path / "data"),
        ],
        cwd=REPO,
        env={**os.environ, "CRDTCHAT_SECRET": "x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("crdtchat serve: ")
    assert "address already in use" in result.stderr.lower()
