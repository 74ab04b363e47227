"""Kill the worker mid-reply and watch another one finish it: exactly one reply.

Two worker processes serve the relay. The one that claims the lease on the question streams
its reply slowly (the loopback model waits between words); the demo SIGKILLs it mid-way.
Its lease is no longer renewed, so it expires after --lease-ttl seconds; the other worker
takes the lease over, streams the reply from the start and commits it. The answer id is
derived from the question's, so even two commits would be one message: the person sees
exactly one reply.

    python demos/worker_takeover.py
"""

from __future__ import annotations

from pathlib import Path

from _kit import MODEL, Device, check, loopback, openai_env, run, say

from crdtchat.schema import assistant_turn_id
from crdtchat.stack import LocalStack

ROOM = "long-answer"
PERSON = "ana"
LEASE_TTL = 1.5  # seconds a lease lasts without renewal
EVENT_DELAY = 0.1  # seconds between the loopback model's streamed words
QUESTION = (
    "Please explain, slowly and in many words, why a reply that was cut off half way should "
    "still reach me exactly once even when the machine writing it dies"
)


async def demo(tmp: Path) -> None:
    with (
        LocalStack(tmp / "stack") as stack,
        loopback("openai", stack.logs, "--event-delay", str(EVENT_DELAY)) as openai_url,
    ):
        stack.start_relay()
        workers = {
            name: stack.start_worker(
                name,
                provider="openai",
                model=MODEL,
                lease_ttl=LEASE_TTL,
                env=openai_env(openai_url),
            )
            for name in ("worker-1", "worker-2")
        }
        say(f"relay on {stack.url}; worker-1 and worker-2 running, leases last {LEASE_TTL} s")

        async with Device(stack, ROOM, PERSON, "laptop", tmp / "laptop.sqlite") as laptop:
            await laptop.synced()
            conversation = laptop.conversation
            question = conversation.append("user", QUESTION)
            turn_id = assistant_turn_id(question.id, 1)
            say(f"{PERSON} asks a question whose answer streams for a few seconds")

            def stream_holder() -> str | None:
                stream = conversation.streams.get(turn_id)
                holder = None if stream is None else stream.get("holder")
                return holder if isinstance(holder, str) else None

            await laptop.until(
                lambda: (
                    len((conversation.stream_text(turn_id) or "").split()) >= 6
                    or conversation.view.get(turn_id) is not None
                ),
                "reply streaming",
            )
            first = stream_holder()
            check(conversation.view.get(turn_id) is None, "the reply finished before the kill")
            check(first in workers, f"the stream is held by {first!r}, not by a worker")
            assert first is not None
            cut = conversation.stream_text(turn_id)
            workers[first].kill()
            say(f"{first} was streaming the reply; killed it (SIGKILL) at {cut!r}")

            other = next(name for name in workers if name != first)
            await laptop.until(
                lambda: stream_holder() == other or conversation.view.get(turn_id) is not None,
                f"takeover by {other}",
            )
            say(f"{first}'s lease expired; {other} took it over and streams the reply again")

            answer = await laptop.reply_to(question)
            say(f"{answer.author} committed the reply: {answer.content!r}")
            check(answer.author == other, f"the reply is by {answer.author}, not by {other}")
            check(answer.status == "complete", f"the reply is {answer.status}: {answer.error}")
            check(answer.content == f"[turn 1] You said: {QUESTION}", "the reply is not whole")
            await laptop.until(
                lambda: (
                    not conversation.streams_in_flight() and conversation.lease(question.id) is None
                ),
                "cleared stream and lease",
            )
            replies = conversation.assistant_answers(question.id)
            check(len(replies) == 1, f"{len(replies)} replies to one question")
            check(len(conversation.messages) == 2, "the document holds a duplicate message")
            check(not workers[first].running and workers[other].running, "wrong worker state")
            say(
                f"exactly one reply: the document holds {len(conversation.messages)} messages,"
                " no stream and no lease are left behind"
            )


if __name__ == "__main__":
    run(demo)
