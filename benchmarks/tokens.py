"""Input tokens sent per turn, with derived state and without, through the worker.

Two conversations with the same questions run side by side through the real worker
(`serve_room`) and the OpenAI Responses provider against the loopback server:

- *with state*: the worker finds the `provider_state` entry the previous turn left and sends
  `previous_response_id` plus only what is new;
- *without state*: every derived entry is discarded before each turn (a replica that pruned
  them), so the worker replays the whole thread.

"Sent" counts what the request bodies actually carry, with the loopback's token rule
(whitespace words) over the input items plus any `instructions`. The system prompt travels as
the first input item of a full request (turn 1, replays), so it is part of the stored response
and later turns need not resend it. "New" is the tokens of the messages added since the last
answer (on turn 1, the system prompt too). The loopback's reported usage (`input_tokens`,
`cached_tokens`) is shown next to it. Target: with state, sent = 1.00x new on every turn;
without, it grows with the thread.

`--provider anthropic` measures what a provider that always takes the whole thread bills
instead: the same questions through the worker and the Anthropic provider against the
loopback Anthropic server, whose prompt-cache accounting follows the API's (`cache_control`
breakpoints, 20-block look-back). Reported: per turn the input tokens and how many of them
were read from the cache. Target: cached share of input tokens >= 0.95 over the turns after
turn 2.

    .venv/bin/python benchmarks/tokens.py [--turns 100] [--system TEXT] [--provider anthropic]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from crdtchat.document import Conversation
from crdtchat.loopback.anthropic_server import AnthropicLoopback
from crdtchat.loopback.http import LoggedRequest, count_tokens
from crdtchat.loopback.openai_server import OpenAILoopback
from crdtchat.providers.anthropic_messages import AnthropicProvider
from crdtchat.providers.hosted import DEFAULT_TIMEOUT
from crdtchat.providers.openai_responses import OpenAIResponsesProvider
from crdtchat.providers.retry import RetryPolicy
from crdtchat.worker.room import ProviderPool, RoomSettings, serve_room
from crdtchat.worker.turn import TurnSettings

MODEL = "gpt-4.1"
KEY = "sk-bench"
TOPICS = ("the sea", "bread", "owls", "trains", "copper", "tea", "maps", "snow", "bees", "clocks")
# Titles off: the worker's one-off title request after the first reply is not a turn.
ONCE = RoomSettings(idle_after=0.0, turn=TurnSettings(flush_interval=0.05, titles="off"))
TARGET = 1.00
ANTHROPIC_MODEL = "claude-sonnet-4-5"
CACHED_SHARE_TARGET = 0.95


@dataclass(frozen=True)
class Sent:
    """One turn's request as the server received it."""

    items: int  # tokens in the input items
    instructions: int  # tokens in `instructions`
    body_bytes: int
    incremental: bool  # carried previous_response_id
    usage_input: int  # what the server reported
    usage_cached: int

    @property
    def total(self) -> int:
        return self.items + self.instructions


def item_tokens(item: Mapping[str, Any]) -> int:
    """The loopback's rule for one input item (reasoning items are opaque: 0)."""
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(str(part.get("text", "")) for part in content)
        return count_tokens(str(content or ""))
    if kind == "function_call":
        return count_tokens(str(item.get("name", ""))) + count_tokens(str(item["arguments"]))
    if kind == "function_call_output":
        return count_tokens(str(item.get("output", "")))
    return 0


def sent_of(request: LoggedRequest) -> Sent:
    body = request.body
    usage = request.usage or {}
    return Sent(
        items=sum(item_tokens(i) for i in body.get("input", [])),
        instructions=count_tokens(body.get("instructions") or ""),
        body_bytes=len(json.dumps(body).encode()),
        incremental="previous_response_id" in body,
        usage_input=int(usage.get("input_tokens", 0)),
        usage_cached=int((usage.get("input_tokens_details") or {}).get("cached_tokens", 0)),
    )


def question(number: int) -> str:
    topic = TOPICS[number % len(TOPICS)]
    return f"Question {number}: tell me one short fact about {topic}, please."


async def run(turns: int, system: str) -> None:
    # One client for the run, as a long-lived worker keeps its connections alive.
    with OpenAILoopback(api_key=KEY) as server:
        async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
            rows = await converse(server, client, turns, system)
    report(rows, system)


async def converse(
    server: OpenAILoopback, client: httpx.AsyncClient, turns: int, system: str
) -> list[tuple[int, int, Sent, Sent]]:
    """Both conversations, turn by turn; returns (turn, new tokens, with, without) rows."""
    provider = OpenAIResponsesProvider(
        model=MODEL, api_key=KEY, base_url=server.base_url, retry=RetryPolicy(), client=client
    )
    pool = ProviderPool("openai", make=lambda name, *, model: provider)
    conversations = {}
    for mode in ("with", "without"):
        person = Conversation.create(author="bench")
        person.set_settings(system=system, provider="openai", model=MODEL)
        conversations[mode] = (person, Conversation(person.doc, author="worker-1"))

    rows: list[tuple[int, int, Sent, Sent]] = []
    for number in range(1, turns + 1):
        sent: dict[str, Sent] = {}
        answers: set[str] = set()
        new = 0
        for mode, (person, worker) in conversations.items():
            asked = person.append("user", question(number))
            new = count_tokens(asked.content) + (count_tokens(system) if number == 1 else 0)
            if mode == "without":
                person.discard_all_derived()
            before = len(server.posts("/responses"))
            if await serve_room(worker, pool, room=f"bench-{mode}", settings=ONCE) != 1:
                raise SystemExit(f"turn {number} ({mode}): no answer committed")
            [reply] = person.assistant_answers(asked.id)
            if reply.status != "complete":
                raise SystemExit(f"turn {number} ({mode}): {reply.status} {reply.error}")
            posts = server.posts("/responses")[before:]
            if len(posts) != 1:
                raise SystemExit(f"turn {number} ({mode}): {len(posts)} requests, not 1")
            sent[mode] = sent_of(posts[0])
            answers.add(reply.content)
        if len(answers) != 1:  # state must save tokens, never change the answer
            raise SystemExit(f"turn {number}: the answers differ: {sorted(answers)}")
        rows.append((number, new, sent["with"], sent["without"]))
        if number % 10 == 0:
            print(f"turn {number}/{turns}", file=sys.stderr, flush=True)
    return rows


def report(rows: list[tuple[int, int, Sent, Sent]], system: str) -> None:
    turns = len(rows)
    print(
        f"\nOpenAI Responses provider via the worker, loopback server, {turns} turns, "
        f"system prompt {count_tokens(system)} tokens (an input item of full requests)\n"
    )
    head = (
        f"{'turn':>4} {'new':>4} | {'with: sent':>10} {'x new':>6} {'usage in':>8} "
        f"{'cached':>6} | {'without: sent':>13} {'x new':>6} {'usage in':>8} {'bytes':>7}"
    )
    print(head)
    print("-" * len(head))
    points = sorted({1, 2, 5, 10, 25, 50, 75, turns} & set(range(1, turns + 1)))
    for number, new, w, wo in rows:
        if number not in points:
            continue
        print(
            f"{number:>4} {new:>4} | {w.total:>10} {w.total / new:>6.2f} {w.usage_input:>8} "
            f"{w.usage_cached:>6} | {wo.total:>13} {wo.total / new:>6.2f} {wo.usage_input:>8} "
            f"{wo.body_bytes:>7}"
        )
    new_total = sum(new for _, new, _, _ in rows)
    with_total = sum(w.total for _, _, w, _ in rows)
    without_total = sum(wo.total for _, _, _, wo in rows)
    worst = max(w.total / new for _, new, w, _ in rows)
    later = [w.total / new for number, new, w, _ in rows if number > 1]
    worst_later = max(later) if later else worst
    instructions = sum(w.instructions for _, _, w, _ in rows)
    incremental = sum(w.incremental for _, _, w, _ in rows)
    print(
        f"\ntotal over {turns} turns: new {new_total}, sent with state {with_total} "
        f"({with_total / new_total:.2f}x new), without state {without_total} "
        f"({without_total / new_total:.2f}x new); without/with = {without_total / with_total:.1f}x"
    )
    print(
        f"with state: {incremental}/{turns} turns sent previous_response_id; worst turn "
        f"{worst:.2f}x new, after turn 1 {worst_later:.2f}x new "
        f"({'meets' if worst_later <= TARGET else 'MISSES'} the {TARGET:.2f}x target); "
        f"`instructions` tokens sent over the run: {instructions}"
    )
    last_with, last_without = rows[-1][2], rows[-1][3]
    print(
        f"turn {turns} body: {last_with.body_bytes} bytes with state, "
        f"{last_without.body_bytes} without"
    )
    if system:
        print(f"system prompt: {system!r}")


@dataclass(frozen=True)
class Billed:
    """One Anthropic turn's input as the server billed it."""

    uncached: int
    cache_read: int
    cache_write: int

    @property
    def total(self) -> int:
        return self.uncached + self.cache_read + self.cache_write


async def run_anthropic(turns: int, system: str, min_cache_tokens: int) -> None:
    with AnthropicLoopback(api_key=KEY, min_cache_tokens=min_cache_tokens) as server:
        async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT) as client:
            provider = AnthropicProvider(
                model=ANTHROPIC_MODEL,
                api_key=KEY,
                base_url=server.base_url,
                retry=RetryPolicy(),
                client=client,
            )
            pool = ProviderPool("anthropic", make=lambda name, *, model: provider)
            person = Conversation.create(author="bench")
            person.set_settings(system=system, provider="anthropic", model=ANTHROPIC_MODEL)
            worker = Conversation(person.doc, author="worker-1")
            rows: list[tuple[int, Billed]] = []
            for number in range(1, turns + 1):
                asked = person.append("user", question(number))
                before = len(server.posts("/messages"))
                if await serve_room(worker, pool, room="bench-anthropic", settings=ONCE) != 1:
                    raise SystemExit(f"turn {number}: no answer committed")
                [reply] = person.assistant_answers(asked.id)
                if reply.status != "complete":
                    raise SystemExit(f"turn {number}: {reply.status} {reply.error}")
                posts = server.posts("/messages")[before:]
                if len(posts) != 1:
                    raise SystemExit(f"turn {number}: {len(posts)} requests, not 1")
                usage = posts[0].usage or {}
                rows.append(
                    (
                        number,
                        Billed(
                            uncached=int(usage.get("input_tokens", 0)),
                            cache_read=int(usage.get("cache_read_input_tokens", 0)),
                            cache_write=int(usage.get("cache_creation_input_tokens", 0)),
                        ),
                    )
                )
    print(
        f"\nAnthropic Messages provider via the worker, loopback server, {turns} turns, "
        f"system prompt {count_tokens(system)} tokens, minimum cacheable prefix "
        f"{min_cache_tokens} tokens\n"
    )
    head = (
        f"{'turn':>4} | {'input':>6} {'cache read':>10} {'cache write':>11} {'uncached':>8} | share"
    )
    print(head)
    print("-" * len(head))
    points = sorted({1, 2, 3, 5, 10, 25, 50, 75, turns} & set(range(1, turns + 1)))
    for number, b in rows:
        if number in points:
            print(
                f"{number:>4} | {b.total:>6} {b.cache_read:>10} {b.cache_write:>11} "
                f"{b.uncached:>8} | {b.cache_read / b.total:.3f}"
            )
    later = [b for number, b in rows if number > 2]
    if later:
        read = sum(b.cache_read for b in later)
        total = sum(b.total for b in later)
        worst = min(b.cache_read / b.total for b in later)
        share = read / total
        print(
            f"\nturns 3-{turns}: {read} of {total} input tokens read from the cache, share "
            f"{share:.3f} ({'meets' if share >= CACHED_SHARE_TARGET else 'MISSES'} the "
            f"{CACHED_SHARE_TARGET} target); lowest single turn {worst:.3f}; "
            f"turn {turns} {later[-1].cache_read / later[-1].total:.3f}"
        )
    if system:
        print(f"system prompt: {system!r}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--system", default="", help="system prompt (default: none)")
    parser.add_argument("--provider", choices=("openai", "anthropic"), default="openai")
    parser.add_argument(
        "--min-cache-tokens",
        type=int,
        default=0,
        help="anthropic: smallest prefix the loopback caches (the API: 1024 for Sonnet)",
    )
    args = parser.parse_args()
    if args.turns < 1 or args.min_cache_tokens < 0:
        parser.error("--turns must be positive and --min-cache-tokens not negative")
    if args.provider == "anthropic":
        anyio.run(run_anthropic, args.turns, args.system, args.min_cache_tokens)
    else:
        anyio.run(run, args.turns, args.system)


if __name__ == "__main__":
    cli()
