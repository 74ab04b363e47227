"""Provider names of `crdtchat worker --provider` → provider objects.

Imports are lazy so that choosing one provider never imports another's dependencies (the
local model pulls in llama-cpp-python).
"""

from __future__ import annotations

import importlib

from crdtchat.providers.base import Provider, ProviderError

__all__ = ["PROVIDER_NAMES", "make_provider"]

# name → (module, class)
_PROVIDERS: dict[str, tuple[str, str]] = {
    "local": ("crdtchat.providers.local", "LocalProvider"),
    "openai": ("crdtchat.providers.openai_responses", "OpenAIResponsesProvider"),
    "openai-chat": ("crdtchat.providers.openai_chat", "OpenAIChatProvider"),
    "anthropic": ("crdtchat.providers.anthropic_messages", "AnthropicProvider"),
}
PROVIDER_NAMES = tuple(_PROVIDERS)


def make_provider(name: str, *, model: str | None) -> Provider:
    """Build the named provider with its defaults (keys and endpoints from the environment).

    Raises ProviderError for an unknown name or a provider that cannot be loaded. A missing
    API key is not raised here: that turn ends with `Finished(status="error")` instead.
    """
    try:
        module_name, class_name = _PROVIDERS[name]
    except KeyError:
        known = ", ".join(PROVIDER_NAMES)
        raise ProviderError(f"unknown provider {name!r} (known: {known})") from None
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise ProviderError(f"provider {name!r} is not available: {exc}") from exc
    return cls(model=model)
