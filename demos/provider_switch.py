"""Switch provider mid-conversation: OpenAI Responses, then Anthropic, then back.

The provider and model are conversation settings (canonical), so any device may switch them
and the worker follows. Each reply records the model that wrote it. Provider state is derived:
turn 2 on OpenAI continues from turn 1's stored response (a `provider_state` entry) and sends
only the new question; Anthropic has no such state, so turn 3 replays the whole thread, and
turn 4 reads it from Anthropic's prompt cache; back on OpenAI, turn 5 continues from turn 2's
response, still valid because the thread up to it has not changed, and sends only what came
after. Both providers are loopback servers whose tokens are whitespace words, so the numbers
can be checked by counting.

    python demos/provider_switch.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _kit import MODEL, Device, anthropic_env, check, loopback, openai_env, run, say

from crdtchat.document import Conversation
from crdtchat.schema import Message
from crdtchat.stack import LocalStack

ROOM = "switching"
PERSON = "lee"
CLAUDE = "claude-sonnet-4-5"
PLAN = [  # (provider, model, question)
    ("openai", MODEL, "name three rivers in Europe"),
    ("openai", MODEL, "which one is the longest"),
    ("anthropic", CLAUDE, "and which one flows through Vienna"),
    ("anthropic", CLAUDE, "how many countries does it cross"),
    ("openai", MODEL, "thanks, summarise what we said"),
]


def words(*messages: Message) -> int:
    return sum(len(m.content.split()) for m in messages)


def entry(conversation: Conversation, message_id: str, kind: str) -> dict[str, Any] | None:
    """The data of a message's derived entry of this kind, keys sorted; None if it has none."""
    for found in conversation.derived_entries().values():
        if found.message_id == message_id and found.kind == kind:
            # A Y.Map's keys come back in hash order, which varies from run to run: sorted,
            # so the printed entry reads the same every time.
            return dict(sorted(found.data.items()))
    return None


async def demo(tmp: Path) -> None:
    with (
        LocalStack(tmp / "stack") as stack,
        loopback("openai", stack.logs) as openai_url,
        loopback("anthropic", stack.logs) as anthropic_url,
    ):
        stack.start_relay()
        env = {**openai_env(openai_url), **anthropic_env(anthropic_url)}
        stack.start_worker("worker-1", provider="openai", model=MODEL, env=env)
        say(f"relay on {stack.url}; worker-1 can reach a loopback OpenAI and Anthropic server")

        async with Device(stack, ROOM, PERSON, "laptop", tmp / "laptop.sqlite") as laptop:
            await laptop.synced()
            conversation = laptop.conversation
            thread: list[Message] = []
            sent: list[int] = []
            say("turn  model (recorded on the reply)            input  cached  sent")
            for turn, (provider, model, text) in enumerate(PLAN, start=1):
                if conversation.settings.provider != provider:
                    conversation.set_settings(provider=provider, model=model)
                    say(f"-- {PERSON} switches the conversation to {provider} / {model}")
                question = conversation.append("user", text)
                answer = await laptop.reply_to(question)
                await laptop.until(
                    lambda a=answer: entry(conversation, a.id, "usage") is not None, "usage entry"
                )
                usage = entry(conversation, answer.id, "usage") or {}
                cached = usage["cached_input_tokens"]
                sent.append(usage["input_tokens"] - cached)
                recorded = answer.model
                check(recorded is not None, f"turn {turn}'s reply records no model")
                assert recorded is not None
                label = f"{recorded.provider} / {recorded.api} / {recorded.model}"
                say(f"{turn:>4}  {label:40} {usage['input_tokens']:>5} {cached:>7} {sent[-1]:>5}")
                check(
                    (recorded.provider, recorded.model) == (provider, model),
                    f"turn {turn} was answered by {label}, not {provider} / {model}",
                )
                check(answer.status == "complete", f"turn {turn}: {answer.status} {answer.error}")
                check(
                    answer.content.startswith(f"[turn {turn}]"),
                    f"turn {turn}: the model did not see the whole conversation: {answer.content}",
                )
                thread += [question, answer]

            q = thread[0::2]
            a = thread[1::2]
            say("")
            state_1 = entry(conversation, a[0].id, "provider_state") or {}
            state_2 = entry(conversation, a[1].id, "provider_state") or {}
            say(f"turn 1 left a provider_state entry: {state_1}")
            check(
                sent[1] == words(q[1]),
                f"turn 2 sent {sent[1]} tokens; only the new question has {words(q[1])}",
            )
            say(f"turn 2 continued from it and sent {sent[1]} tokens: the new question only")
            check(sent[2] == words(*thread[:5]), "turn 3 did not replay the whole thread")
            say(f"turn 3 on Anthropic replayed the whole thread as text: {sent[2]} tokens")
            usage_4 = entry(conversation, a[3].id, "usage") or {}
            check(usage_4.get("cached_input_tokens", 0) > 0, "turn 4 read nothing from the cache")
            say(
                f"turn 4 read {usage_4['cached_input_tokens']} tokens from Anthropic's prompt cache"
            )
            since_2 = words(*thread[4:9])
            check(
                sent[4] == since_2, f"turn 5 sent {sent[4]} tokens, not the {since_2} after turn 2"
            )
            say(
                f"turn 5, back on OpenAI, continued from turn 2's response ({state_2}) and sent"
                f" the {since_2} tokens written since"
            )


if __name__ == "__main__":
    run(demo)
