"""The worker as a network peer: the relay's room feed, and exactly one reply per message while
worker processes are SIGKILLed mid-reply.

Everything is real: the relay and the workers are subprocesses, the people are Replicas over
websockets, and the model is the loopback OpenAI server (Chat Completions).
"""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.providers.openai_chat import OpenAIChatProvider
from crdtchat.schema import assistant_turn_id
from crdtchat.worker.feed import FEED_PATH, decode_room_names
from crdtchat.worker.room import ProviderPool, RoomSettings
from crdtchat.worker.service import WorkerConfig, run_worker
from crdtchat.worker.titles import title_of
from tests.support.relay import running_relay, token
from tests.support.replica import person, wait_for, watch_all
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.anyio


async def test_room_feed_is_for_workers_and_lists_rooms_that_wait(tmp_path: Path) -> None:
    with running_relay(tmp_path / "data") as relay, OpenAILoopback() as server:
        base = f"ws://127.0.0.1:{relay.port}"
        for refused in (token("*", "writer", "alice"), token("r1", "worker", "w")):
            with pytest.raises(InvalidStatus) as excinfo:
                async with connect(f"{base}{FEED_PATH}?token={refused}"):
                    pass
            assert excinfo.value.response.status_code == 403

        feed_token = token("*", "worker", "worker-1")
        async with (
            connect(f"{base}{FEED_PATH}?token={feed_token}") as feed,
            person(base, "r1") as alice,
        ):
            question = alice.append("user", "hello there")
            with anyio.fail_after(10):
                assert decode_room_names(await feed.recv()) == ["r1"]

            changes = watch_all(alice)
            alice.derived.observe_deep(changes.notify)  # the title entry
            providers = ProviderPool(
                "openai-chat",
                make=lambda name, model: OpenAIChatProvider(
                    base_url=server.base_url, api_key="test"
                ),
            )
            config = WorkerConfig(
                relays=(base,),
                token=feed_token,
                identity="worker-1",
                room=RoomSettings(idle_after=0.5),
            )
            async with anyio.create_task_group() as workers:
                workers.start_soon(run_worker, config, providers)
                answer_id = assistant_turn_id(question.id, 1)
                await wait_for(lambda: alice.view.get(answer_id) is not None, changes, 20)
                await wait_for(lambda: title_of(alice) is not None, changes, 20)
                workers.cancel_scope.cancel()
            answer = alice.message(answer_id)
            assert answer.author == "worker-1" and answer.status == "complete"
            assert "hello there" in answer.content
            # The reply and its title request went over one kept-alive connection: the
            # room's calls share a client (`reused_connections`), no new one per call.
            posts = server.posts("/chat/completions")
            assert len(posts) == 2
            assert len({post.client_port for post in posts}) == 1

        # The answered room is no longer listed, also after a restart: the first room a new
        # subscriber hears of is one that waits now.
        relay.restart()
        async with (
            connect(f"{base.rsplit(':', 1)[0]}:{relay.port}{FEED_PATH}?token={feed_token}") as feed,
            person(f"ws://127.0.0.1:{relay.port}", "r2") as bob,
        ):
            bob.append("user", "anyone?")
            with anyio.fail_after(10):
                assert decode_room_names(await feed.recv()) == ["r2"]


async def test_three_workers_killed_mid_reply_give_exactly_one_reply_each(tmp_path: Path) -> None:
    rng = random.Random(20261122)
    turns = 8
    with running_relay(tmp_path / "data") as relay, OpenAILoopback(event_delay=0.05) as model:
        workers = [
            WorkerProcess(f"worker-{n}", relay.ws_base, model.base_url, tmp_path) for n in (1, 2, 3)
        ]
        for worker in workers:
            worker.start()
        try:
            async with person(f"ws://127.0.0.1:{relay.port}", "busy") as alice:
                changes = watch_all(alice)
                for turn in range(turns):
                    question = alice.append("user", f"question number {turn} please")
                    answer_id = assistant_turn_id(question.id, 1)
                    # Wait until someone streams the answer, then maybe kill it mid-reply.
                    await wait_for(
                        lambda answer_id=answer_id: (
                            answer_id in alice.streams_in_flight()
                            or alice.view.get(answer_id) is not None
                        ),
                        changes,
                        30,
                    )
                    stream = alice.streams.get(answer_id)
                    holder = None if stream is None else stream.get("holder")
                    if holder is not None and rng.random() < 0.6:
                        next(w for w in workers if w.sub == holder).kill_and_restart()
                    await wait_for(
                        lambda answer_id=answer_id: alice.view.get(answer_id) is not None,
                        changes,
                        60,
                    )

                assert sum(w.kills for w in workers) >= 2
                thread = alice.current_thread()
                assert [m.role for m in thread] == ["user", "assistant"] * turns
                for question, answer in zip(thread[::2], thread[1::2], strict=True):
                    assert answer.id == assistant_turn_id(question.id, 1)
                    assert answer.status == "complete"
                    assert "question number" in answer.content
                    assert len(alice.assistant_answers(question.id)) == 1
                assert alice.waiting_for_reply() == []
                bad = [p.reason for p in alice.problems() if not p.reason.startswith("duplicate")]
                assert bad == []
        finally:
            for worker in workers:
                worker.stop()
