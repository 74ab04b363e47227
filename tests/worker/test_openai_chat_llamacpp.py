"""The Chat Completions path against a real OpenAI-compatible server.

`python -m llama_cpp.server` serves the packaged SmolLM2 model in a subprocess on loopback.
The official `openai` SDK streaming from it shows the server speaks the format; crdtchat's
`OpenAIChatProvider` streaming the same conversation from it (greedy, so the same text) shows
the provider speaks it too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crdtchat.prefix import prefix_hashes
from crdtchat.providers.base import Finished, TextDelta, TurnRequest
from crdtchat.providers.local import find_smollm2_gguf
from crdtchat.providers.openai_chat import OpenAIChatProvider
from crdtchat.schema import Message

pytest.importorskip("llama_cpp")
pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server] dependencies")
openai = pytest.importorskip("openai")

ALIAS = "smollm2-135m-instruct"
SYSTEM = "You are a concise assistant."
QUESTION = "Name one colour of the rainbow."
MAX_TOKENS = 12
STARTUP_SECONDS = 120.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server's base URL (`…/v1`), ready to answer; stopped after the module."""
    port = free_port()
    log_path: Path = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "crdtchat.providers.llama_server",  # llama_cpp.server, loaded as we load it
        "--model",
        str(find_smollm2_gguf()),
        "--model_alias",
        ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--seed",
        "1234",
        # one thread: a busy machine makes llama.cpp's spinning threads crawl
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:  # readiness poll with a deadline: the server has no readiness signal
            if process.poll() is not None:
                pytest.fail(
                    f"llama_cpp.server exited {process.returncode}:\n{log_path.read_text()}"
                )
            try:
                if httpx.get(f"{base}/models", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready in time:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def thread() -> list[Message]:
    return [Message(id="u1", role="user", author="alice", content=QUESTION)]


@pytest.mark.anyio
async def test_official_sdk_streams_from_llama_cpp_server(server: str) -> None:
    client = openai.AsyncOpenAI(base_url=server, api_key="unused", max_retries=0)
    models = await client.models.list()
    assert ALIAS in [m.id for m in models.data]

    stream = await client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        stream=True,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    pieces, reasons = [], []
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    await client.close()
    assert "".join(pieces).strip()
    assert reasons and reasons[-1] in ("stop", "length")


@pytest.mark.anyio
async def test_crdtchat_chat_provider_streams_from_llama_cpp_server(server: str) -> None:
    # Reference answer through the SDK, greedy: the provider must get the same text.
    client = openai.AsyncOpenAI(base_url=server, api_key="unused", max_retries=0)
    reference = await client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    await client.close()
    expected = reference.choices[0].message.content or ""

    provider = OpenAIChatProvider(model=ALIAS, base_url=server, api_key="")
    request = TurnRequest(
        conversation_id="conv",
        model=ALIAS,
        system=SYSTEM,
        tools={},
        thread=thread(),
        prefix_hashes=prefix_hashes(SYSTEM, {}, thread()),
        params={"max_tokens": MAX_TOKENS, "temperature": 0},
    )
    text, finished = "", []
    async for event in provider.stream_turn(request):
        if isinstance(event, TextDelta):
            assert not finished
            text += event.text
        elif isinstance(event, Finished):
            finished.append(event)
    assert len(finished) == 1, "exactly one Finished, last"
    assert finished[0].status in ("complete", "incomplete"), finished[0].error
    assert text.strip()
    assert text == expected
