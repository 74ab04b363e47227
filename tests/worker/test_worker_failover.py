"""A worker given several relays (design §5, §6): its room feed and its room replicas move to
the next relay when theirs goes away.

Real relay subprocesses with separate data directories, the loopback OpenAI server (Chat
Completions) as the model, people as Replicas over websockets. `crdtchat worker` runs as a
subprocess where the command line is what is shown, in-process (`run_worker`) otherwise.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from crdtchat import cli
from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.providers.openai_chat import OpenAIChatProvider
from crdtchat.replica import Backoff
from crdtchat.schema import assistant_turn_id
from crdtchat.worker.room import ProviderPool, RoomSettings
from crdtchat.worker.service import WorkerConfig, run_worker
from tests.support.relay import RelayProcess, running_relay, token
from tests.support.replica import person, wait_for, watch_all
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.05, maximum=0.5)


@contextmanager
def refusing_url() -> Iterator[str]:
    """A loopback URL that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}"


async def test_worker_command_with_a_dead_relay_first_answers_on_the_live_one(
    tmp_path: Path,
) -> None:
    with (
        refusing_url() as dead,
        running_relay(tmp_path / "live") as live,
        OpenAILoopback() as model,
    ):
        worker = WorkerProcess(
            "worker-1",
            f"{dead},{live.ws_base}",
            model.base_url,
            tmp_path,
            lease_ttl=None,
            idle_after=2,
        )
        worker.start()
        try:
            async with person([live.ws_base], "asked", backoff=FAST) as alice:
                changes = watch_all(alice)
                question = alice.append("user", "is anyone there")
                answer_id = assistant_turn_id(question.id, 1)
                await wait_for(lambda: alice.view.get(answer_id) is not None, changes, 60)
                answer = alice.message(answer_id)
                assert answer.author == "worker-1" and answer.status == "complete"
                assert "is anyone there" in answer.content
        finally:
            worker.stop()
        assert f"room feed at {dead} unavailable" in worker.log_path.read_text()


async def test_worker_feed_moves_to_the_next_relay_when_its_relay_dies(tmp_path: Path) -> None:
    """The worker answers on relay A; A dies; a question asked on relay B is answered, which
    only B's feed can have told the worker about.

    (Relays with separate stores cannot take over a room that several peers wrote: the
    worker's step 2 to B would carry the person's messages, which the relay refuses from a
    worker. Moving mid-reply needs relays that share the room, a cluster: issue 13.)"""
    a = RelayProcess(tmp_path / "a").start()
    b = RelayProcess(tmp_path / "b").start()
    try:
        with OpenAILoopback() as loopback:
            providers = ProviderPool(
                "openai-chat",
                make=lambda name, model: OpenAIChatProvider(
                    base_url=loopback.base_url, api_key="test"
                ),
            )
            config = WorkerConfig(
                relays=(a.ws_base, b.ws_base),
                token=token("*", "worker", "worker-1"),
                identity="worker-1",
                room=RoomSettings(idle_after=0.5),
            )
            async with anyio.create_task_group() as workers:
                workers.start_soon(run_worker, config, providers)
                for relay, room in ((a, "on-a"), (b, "on-b")):
                    async with person([relay.ws_base], room, backoff=FAST) as alice:
                        changes = watch_all(alice)
                        question = alice.append("user", f"a question in {room}")
                        answer_id = assistant_turn_id(question.id, 1)
                        await wait_for(
                            lambda alice=alice, answer_id=answer_id: (
                                alice.view.get(answer_id) is not None
                            ),
                            changes,
                            60,
                        )
                        answer = alice.message(answer_id)
                        assert answer.status == "complete" and room in answer.content
                    if relay is a:
                        a.kill()
                workers.cancel_scope.cancel()
    finally:
        a.stop()
        b.stop()


def test_worker_command_names_a_malformed_relay_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRDTCHAT_TOKEN", token("*", "worker", "worker-1"))
    assert cli.main(["worker", "--relay", "ws://127.0.0.1:1,127.0.0.1:2"]) == 1
    err = capsys.readouterr().err
    assert "crdtchat worker: --relay: not a relay URL: '127.0.0.1:2'" in err
