"""Discard all derived state and continue: the canonical log is enough.

The worker keeps provider state next to the conversation (`derived.entries`): here, the id
of each OpenAI response, so the next turn sends only the new question. A device deletes every
derived entry (any writer may). The conversation still continues: the worker finds no usable
state and replays the whole thread from the canonical messages, which costs more input
tokens, once; the turn after that is incremental again. The usage entries say so. The model
is a loopback OpenAI server whose tokens are whitespace words.

    python demos/discard_derived.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _kit import MODEL, Device, check, loopback, openai_env, run, say

from crdtchat.document import Conversation
from crdtchat.schema import Message
from crdtchat.stack import LocalStack

ROOM = "recipes"
PERSON = "noa"
QUESTIONS = [
    "how long should I boil an egg for a soft yolk",
    "and for a hard one",
    "what about quail eggs",
    "thanks",
]
DISCARD_BEFORE = 3  # the turn asked right after discarding


def usage_of(conversation: Conversation, message_id: str) -> dict[str, Any] | None:
    for entry in conversation.derived_entries().values():
        if entry.kind == "usage" and entry.message_id == message_id:
            return entry.data
    return None


def kinds(conversation: Conversation) -> list[str]:
    return sorted(entry.kind for entry in conversation.derived_entries().values())


async def demo(tmp: Path) -> None:
    with (
        LocalStack(tmp / "stack") as stack,
        loopback("openai", stack.logs) as openai_url,
    ):
        stack.start_relay()
        stack.start_worker("worker-1", provider="openai", model=MODEL, env=openai_env(openai_url))
        say(f"relay on {stack.url}; worker-1 answers with {MODEL} (loopback OpenAI server)")

        async with Device(stack, ROOM, PERSON, "phone", tmp / "phone.sqlite") as phone:
            await phone.synced()
            conversation = phone.conversation
            thread: list[Message] = []
            sent: dict[int, int] = {}
            for turn, text in enumerate(QUESTIONS, start=1):
                if turn == DISCARD_BEFORE:
                    say(f"derived entries now: {kinds(conversation)}")
                    conversation.discard_all_derived()
                    await phone.durable()
                    left = kinds(conversation)
                    say(f"{PERSON}'s phone discards all derived state; entries left: {left}")
                    check(conversation.derived_entries() == {}, "derived entries are left")
                question = conversation.append("user", text)
                answer = await phone.reply_to(question)
                await phone.until(
                    lambda a=answer: usage_of(conversation, a.id) is not None, "usage"
                )
                usage = usage_of(conversation, answer.id) or {}
                sent[turn] = usage["input_tokens"] - usage["cached_input_tokens"]
                thread += [question, answer]
                say(
                    f"turn {turn}: usage entry says {usage['input_tokens']} input tokens, "
                    f"{usage['cached_input_tokens']} of them from the stored response: "
                    f"{sent[turn]} sent; reply {answer.content!r}"
                )
                check(answer.status == "complete", f"turn {turn}: {answer.status} {answer.error}")
                check(
                    answer.content.startswith(f"[turn {turn}]"),
                    f"turn {turn}: the model did not have the whole conversation",
                )

            whole = sum(len(m.content.split()) for m in thread[: 2 * DISCARD_BEFORE - 1])
            before, after = sent[DISCARD_BEFORE - 1], sent[DISCARD_BEFORE]
            check(
                before == len(QUESTIONS[DISCARD_BEFORE - 2].split()),
                f"turn {DISCARD_BEFORE - 1} should have sent only its question, sent {before}",
            )
            check(
                after == whole,
                f"turn {DISCARD_BEFORE} should have replayed all {whole} tokens, sent {after}",
            )
            check(after > before, "the replay did not send more input tokens")
            last = len(QUESTIONS)
            check(
                sent[last] == len(QUESTIONS[-1].split()),
                f"turn {last} should be incremental again, sent {sent[last]}",
            )
            say(
                f"before the discard turn {DISCARD_BEFORE - 1} sent {before} tokens; right after"
                f" it turn {DISCARD_BEFORE} replayed the whole thread ({after} tokens); turn"
                f" {last} is incremental again ({sent[last]} sent, its question only),"
                f" from the state turn {last - 1} re-created"
            )


if __name__ == "__main__":
    run(demo)
