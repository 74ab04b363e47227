"""One person, two devices, one conversation with an LLM worker.

Sam's phone and laptop each hold a full replica of the conversation in their own SQLite file
and sync through the relay. The phone asks; the laptop watches the reply stream in and then
sees the committed answer. The laptop asks a follow-up; the phone sees it and its answer.
The relay and the worker are subprocesses; the model is the loopback OpenAI server.

    python demos/two_devices.py
"""

from __future__ import annotations

from pathlib import Path

from _kit import MODEL, Device, check, loopback, openai_env, run, say

from crdtchat.schema import assistant_turn_id
from crdtchat.stack import LocalStack

ROOM = "weekend-trip"
PERSON = "sam"


async def demo(tmp: Path) -> None:
    with (
        LocalStack(tmp / "stack") as stack,
        loopback("openai", stack.logs, "--event-delay", "0.05") as openai_url,
    ):
        stack.start_relay()
        stack.start_worker("worker-1", provider="openai", model=MODEL, env=openai_env(openai_url))
        say(f"relay on {stack.url}; worker-1 answers with {MODEL} (loopback OpenAI server)")

        async with (
            Device(stack, ROOM, PERSON, "phone", tmp / "phone.sqlite") as phone,
            Device(stack, ROOM, PERSON, "laptop", tmp / "laptop.sqlite") as laptop,
        ):
            await phone.synced()
            await laptop.synced()
            await phone.until_peer(lambda p: p.get("device") == "laptop", "the laptop")
            devices = sorted(p["device"] for p in phone.replica.other_devices().values())
            say(f"phone is online and sees {PERSON}'s other devices: {', '.join(devices)}")
            check(devices == ["laptop"], f"the phone sees other devices: {devices}")

            question = phone.conversation.append("user", "What should I pack for Lisbon?")
            say(f"phone   asks:  {question.content}")
            turn_id = assistant_turn_id(question.id, 1)
            seen: list[str] = []

            def laptop_watch() -> bool:
                streamed = laptop.conversation.stream_text(turn_id)
                if streamed and (not seen or streamed != seen[-1]):
                    seen.append(streamed)
                    say(f"laptop sees the reply streaming: {streamed!r}")
                return laptop.conversation.view.get(turn_id) is not None

            await laptop.until(laptop_watch, "reply on the laptop")
            answer = laptop.conversation.message(turn_id)
            say(f"laptop sees the committed answer by {answer.author}: {answer.content!r}")
            check(bool(seen), "the laptop never saw the reply while it was streaming")
            check(answer.status == "complete", f"the answer is {answer.status}: {answer.error}")
            check(seen[-1] == answer.content[: len(seen[-1])], "the stream is not the answer")
            check(
                laptop.conversation.streams_in_flight() == {},
                "the stream was not cleared when the answer was committed",
            )
            on_phone = await phone.reply_to(question)
            check(on_phone == answer, "the phone and the laptop hold different answers")

            follow_up = laptop.conversation.append("user", "And if it rains?")
            say(f"laptop asks:  {follow_up.content}")
            await phone.until(
                lambda: phone.conversation.view.get(follow_up.id) is not None,
                "follow-up question on the phone",
            )
            say(f"phone  sees the laptop's question: {follow_up.content!r}")
            second = await phone.reply_to(follow_up)
            say(f"phone  sees the answer: {second.content!r}")
            check(second.status == "complete", f"the answer is {second.status}: {second.error}")
            check(
                second.content.startswith("[turn 2]"),
                "the worker did not send the whole conversation to the model",
            )
            await laptop.reply_to(follow_up)
            await phone.durable()
            await laptop.durable()
            thread_phone = [(m.role, m.content) for m in phone.conversation.current_thread()]
            thread_laptop = [(m.role, m.content) for m in laptop.conversation.current_thread()]
            check(thread_phone == thread_laptop, "the devices show different threads")
            check(
                [role for role, _ in thread_phone] == ["user", "assistant", "user", "assistant"],
                f"unexpected thread {thread_phone}",
            )
            say("both devices show the same thread:")
            for role, content in thread_phone:
                say(f"  {role:9} {content}")


if __name__ == "__main__":
    run(demo)
