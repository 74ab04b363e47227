"""A conversation's title, written by the worker after its first reply (design §5, titles).

Hosted providers are asked for a short title by the same provider and model that answered;
the local model is not (a second generation on a small CPU model costs seconds for a few words)
and gets a deterministic one: the first words of the question. Either way it is a `title`
derived entry keyed to the first reply; a person's own title (`canonical.meta.title`)
overrides it wherever a title is shown (`title_of`).
"""

from __future__ import annotations

import re
import time

from crdtchat.document import Conversation
from crdtchat.errors import ProviderError
from crdtchat.providers.base import Finished, Provider, TextDelta, TurnRequest
from crdtchat.schema import DerivedEntry, Message

MAX_WORDS = 6
MAX_CHARS = 60
TITLE_PROMPT = (
    "Write a title of at most six words for a conversation that starts with the message "
    "below. Answer with the title only, no quotes, no final period.\n\n{question}"
)
DETERMINISTIC = frozenset({"local"})  # providers that get the fallback, never asked


def _shorten(text: str) -> str:
    """At most MAX_WORDS words and MAX_CHARS characters, without markup; "…" marks a cut."""
    words = re.sub(r"[`*_#>\[\]]+", " ", text).split()
    title = " ".join(words[:MAX_WORDS])
    if len(title) > MAX_CHARS:
        title = title[: MAX_CHARS - 1].rsplit(" ", 1)[0] + "…"
    elif len(words) > MAX_WORDS:
        title += "…"
    return title


def fallback_title(question: str) -> str:
    """The first words of the question, at most MAX_WORDS and MAX_CHARS, without markup."""
    return _shorten(question) or "Untitled"


def _clean(text: str) -> str:
    """The provider's answer as a title: its first line, without quotes, a "Title:" label or
    markup, held to the fallback's limits (a model may ignore "at most six words")."""
    line = next((line for line in text.strip().splitlines() if line.strip()), "")
    line = re.sub(r"[`*_#>]+", " ", line).strip()
    line = line.strip("\"'“”«»").removeprefix("Title:").strip().strip("\"'“”«»").rstrip(".")
    return _shorten(line)


async def ask_title(provider: Provider, model: str, question: str, conversation_id: str) -> str:
    """A title from the provider; the fallback when it fails or answers nothing usable."""
    prompt = Message(
        id="title", role="user", author="worker", content=TITLE_PROMPT.format(question=question)
    )
    request = TurnRequest(
        conversation_id=f"{conversation_id}:title",
        model=model,
        system="You write short, plain titles.",
        tools={},
        thread=[prompt],
        prefix_hashes=[""],
    )
    parts: list[str] = []
    try:
        async for event in provider.stream_turn(request):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished) and event.status != "complete":
                return fallback_title(question)
    except ProviderError:
        return fallback_title(question)
    return _clean("".join(parts)) or fallback_title(question)


def first_reply(conversation: Conversation, reply: Message) -> Message | None:
    """The question `reply` answers, if it is the conversation's first exchange and no
    title entry exists yet."""
    if reply.role != "assistant" or reply.parent is None:
        return None
    question = conversation.view.get(reply.parent)
    if question is None or question.parent is not None or question.role != "user":
        return None
    if any(entry.kind == "title" for entry in conversation.derived_entries().values()):
        return None
    return question


async def write_title(
    conversation: Conversation,
    reply: Message,
    provider: Provider,
    model: str,
    conversation_id: str,
    *,
    ask: bool = True,
) -> str | None:
    """After the first reply: write a `title` derived entry; returns the title written.
    Without `ask`, every provider gets the first words of the question."""
    question = first_reply(conversation, reply)
    if question is None:
        return None
    if not ask or provider.name in DETERMINISTIC:
        title = fallback_title(question.content)
    else:
        title = await ask_title(provider, model, question.content, conversation_id)
    thread = conversation.thread(reply.id)
    conversation.put_derived(
        DerivedEntry(
            kind="title",
            message_id=reply.id,
            prefix_hash=conversation.prefix_hash_of(thread),
            provider=provider.name,
            api=provider.api,
            model=model,
            data={"title": title},
            created_at=time.time(),
            producer=conversation.author,
        )
    )
    return title


def title_of(conversation: Conversation) -> str | None:
    """What to show as the conversation's title: the person's own, else the worker's."""
    own = conversation.title
    if own:
        return own
    derived = [e for e in conversation.derived_entries().values() if e.kind == "title"]
    for entry in sorted(derived, key=lambda e: e.created_at):
        value = entry.data.get("title")
        if isinstance(value, str) and value:
            return value
    return None
