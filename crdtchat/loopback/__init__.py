"""Loopback HTTP servers that speak the hosted APIs' wire formats, for tests and demos.

`OpenAILoopback` (Responses + Chat Completions) and `AnthropicLoopback` (Messages) run on
127.0.0.1 with a deterministic scripted "model", a request log and fault injection.
"""

from crdtchat.loopback.http import LoggedRequest, LoopbackServer, count_tokens, script_reply

__all__ = [
    "AnthropicLoopback",
    "LoggedRequest",
    "LoopbackServer",
    "OpenAILoopback",
    "count_tokens",
    "script_reply",
]


def __getattr__(name: str) -> object:
    # Lazy, so `python -m crdtchat.loopback.openai_server` does not import its module twice.
    if name == "OpenAILoopback":
        from crdtchat.loopback.openai_server import OpenAILoopback

        return OpenAILoopback
    if name == "AnthropicLoopback":
        from crdtchat.loopback.anthropic_server import AnthropicLoopback

        return AnthropicLoopback
    raise AttributeError(name)
