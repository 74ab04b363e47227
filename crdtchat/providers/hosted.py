"""The one place where hosted providers touch the network.

Each hosted provider is a request builder plus a sans-I/O stream parser; this module runs
them: POST with `stream: true`, map the HTTP status to retry / recover / fail, feed the body
through the SSE decoder into the parser, and retry a cut stream (announcing `StreamReset`
first). Errors the caller can act on are not raised: they end the turn with a `Finished`
whose `error` is one readable line, as `base.Provider` promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpcore
import httpx

from crdtchat.providers.base import (
    Finished,
    StreamReset,
    TextDelta,
    ToolCallDone,
    TurnEvent,
)
from crdtchat.providers.retry import RetryableStreamError, RetryPolicy
from crdtchat.providers.sse import SSEDecoder, SSEEvent

__all__ = [
    "DEFAULT_TIMEOUT",
    "HostedProvider",
    "HttpFailure",
    "Recovery",
    "StreamParser",
    "TimedReadBackend",
    "TimedReadStream",
    "describe_failure",
    "env_setting",
    "new_client",
    "reused_connections",
    "stream_call",
]

# Reads may legitimately pause (reasoning models think before the first token); connects may not.
DEFAULT_TIMEOUT = httpx.Timeout(connect=15.0, read=300.0, write=60.0, pool=30.0)
USER_AGENT = "crdtchat/0.1"
MAX_RECOVERIES = 4


class StreamParser(Protocol):
    """What `stream_call` needs from a provider's sans-I/O parser."""

    def feed(self, event: SSEEvent) -> list[TurnEvent]:
        """Turn one SSE event into zero or more turn events (a `Finished` ends the turn)."""
        ...

    def end_of_stream(self) -> list[TurnEvent]:
        """The body ended: return `[Finished]` if that is a normal end, `[]` if it was a cut."""
        ...


@dataclass(frozen=True)
class HttpFailure:
    """A non-2xx answer, kept whole so providers can recognise their specific errors."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def error_object(self) -> dict[str, Any]:
        """The `error` object of either vendor's error body, or {} if there is none."""
        doc = self.json()
        if isinstance(doc, dict):
            err = doc.get("error")
            if isinstance(err, dict):
                return err
        return {}


@dataclass
class Recovery:
    """How a provider answers a failure it knows how to fix: events to yield, a new body."""

    events: list[TurnEvent]
    body: dict[str, Any]


def event_object(event: SSEEvent, what: str = "event data") -> dict[str, Any]:
    """The JSON object an SSE event carries. A stream cut or garbled mid-event is retried
    (RetryableStreamError), as every hosted API's stream is read the same way."""
    try:
        data = json.loads(event.data)
    except ValueError as exc:
        raise RetryableStreamError(f"malformed {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise RetryableStreamError(f"{what} is not a JSON object")
    return data


def _is_event_stream(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verified TLS context for all calls: building one costs ~70 ms, a client per turn."""
    return httpx.create_ssl_context()


class TimedReadStream(httpcore.AsyncNetworkStream):
    """httpcore's anyio stream with each read timed by `asyncio.timeout` instead.

    httpcore enters two context managers per read, an exception map and `anyio.fail_after`
    (a cancel scope and its timer): with one read per streamed token, ~24 µs of a worker's
    CPU per token at 200 replies, more than parsing the event (py-spy, docs/performance.md).
    `asyncio.timeout` times the same read for about half of that; the exceptions are
    httpcore's, so httpx maps them as before. Crdtchat runs on asyncio (uvloop) only.
    """

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        # httpcore's AnyIOStream keeps the anyio byte stream here; pinned by
        # tests/providers/test_hosted_transport.py.
        self._receive = inner._stream.receive  # type: ignore[attr-defined]

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            if timeout is None:
                return await self._receive(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._receive(max_bytes)
        except anyio.EndOfStream:
            return b""
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(exc) from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpcore.ReadError(exc) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return TimedReadStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class TimedReadBackend(httpcore.AnyIOBackend):
    """httpcore's anyio backend whose TCP streams are `TimedReadStream`s."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await super().connect_tcp(host, port, timeout, local_address, socket_options)
        return TimedReadStream(stream)


def new_client(timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> httpx.AsyncClient:
    """A client for one call, its reads timed by `TimedReadStream`.

    httpx has no public way to choose httpcore's network backend: its transport's pool is
    replaced by one built the same way (httpx's default limits) with ours. Proxies from the
    environment keep httpx's own transports."""
    transport = httpx.AsyncHTTPTransport(verify=_ssl_context())
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=TimedReadBackend(),
    )
    return httpx.AsyncClient(timeout=timeout, transport=transport)


_shared_client: contextvars.ContextVar[httpx.AsyncClient | None] = contextvars.ContextVar(
    "crdtchat_shared_http_client", default=None
)


@contextlib.asynccontextmanager
async def reused_connections() -> AsyncIterator[httpx.AsyncClient]:
    """Calls made in this block, and in the tasks it starts, share one client and so reuse its
    kept-alive connections; a provider given its own client keeps it.

    A worker holds one per room it serves: a reply is followed by its title request and by the
    room's next turn, each of which would otherwise set up a client and a connection (with
    TLS, against a hosted API) while other replies stream. One client per room, not per
    worker: httpcore's pool looks at every connection it holds at each request and close, so
    one pool for hundreds of replies at once costs more than it saves.
    """
    async with new_client() as client:
        token = _shared_client.set(client)
        try:
            yield client
        finally:
            _shared_client.reset(token)


def env_setting(env: Mapping[str, str] | None, name: str) -> str | None:
    """An environment variable, empty counted as unset (like the SDKs)."""
    source = os.environ if env is None else env
    value = source.get(name)
    return value or None


def describe_failure(failure: HttpFailure, *, key_var: str | None = None) -> str:
    """One readable line for an HTTP error from either vendor."""
    err = failure.error_object()
    message = err.get("message") if isinstance(err.get("message"), str) else None
    kind = err.get("code") or err.get("type")
    if message is None:
        text = failure.body.decode("utf-8", errors="replace").strip()
        message = text[:300] if text else httpx.codes.get_reason_phrase(failure.status)
    head = f"HTTP {failure.status}" + (f" {kind}" if isinstance(kind, str) and kind else "")
    hint = ""
    if failure.status in (401, 403) and key_var:
        hint = f" (check {key_var})"
    elif failure.status == 404:
        hint = " (unknown model or endpoint?)"
    return f"{head}: {message}{hint}"


async def stream_call(
    *,
    url: str,
    headers: Mapping[str, str],
    body: dict[str, Any],
    new_parser: Callable[[], StreamParser],
    policy: RetryPolicy,
    describe: Callable[[HttpFailure], str],
    recover: Callable[[HttpFailure], Recovery | None] | None = None,
    client: httpx.AsyncClient | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
) -> AsyncIterator[TurnEvent]:
    """POST `body` and stream its events; retries and recovery happen here, once per call.

    `recover` is consulted on a non-retryable failure before giving up: a provider uses it to
    drop a dead handle (yielding `DiscardDerived`) and replay with a fuller body. Each recovery
    must drop something, so it cannot loop; `MAX_RECOVERIES` is a backstop all the same.
    """
    request_headers = {
        "accept": "text/event-stream",
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **headers,
    }
    shared = _shared_client.get() if client is None else None
    # A shared client was made with the default timeouts: this provider's go with each request.
    per_request: dict[str, Any] = {} if shared is None else {"timeout": timeout}
    if shared is not None:
        client = shared
    # A client made for this call is closed with it: reading past the final event to give
    # its connection back to a pool would only delay that.
    pooled = client is not None
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(new_client(timeout))
        failures = 0
        recoveries = 0
        while True:
            parser = new_parser()
            failure: HttpFailure | None = None
            cut: str | None = None
            got_stream = False
            streamed = False
            try:
                async with client.stream(
                    "POST", url, headers=request_headers, json=body, **per_request
                ) as resp:
                    if not 200 <= resp.status_code < 300:
                        failure = HttpFailure(resp.status_code, resp.headers, await resp.aread())
                    elif not _is_event_stream(resp.headers.get("content-type", "")):
                        # A server that ignored `stream: true` (or a proxy's HTML page): say so
                        # rather than reporting a cut stream after pointless retries.
                        head = (await resp.aread())[:200].decode("utf-8", errors="replace")
                        yield Finished(
                            status="error",
                            error=f"expected an event stream from {url}, got "
                            f"{resp.headers.get('content-type') or 'no content type'}: {head}",
                        )
                        return
                    else:
                        got_stream = True
                        decoder = SSEDecoder()
                        chunks = resp.aiter_bytes()
                        async for chunk in chunks:
                            for sse in decoder.feed(chunk):
                                for event in parser.feed(sse):
                                    if isinstance(event, Finished):
                                        if pooled:
                                            await _drain(chunks)
                                        yield event
                                        return
                                    yield event
                                    streamed = streamed or isinstance(
                                        event, TextDelta | ToolCallDone
                                    )
                        for sse in decoder.close():
                            for event in parser.feed(sse):
                                yield event
                                if isinstance(event, Finished):
                                    return
                        tail = parser.end_of_stream()
                        for event in tail:
                            yield event
                        if tail:
                            return
                        cut = "the server ended the stream before its final event"
            except RetryableStreamError as exc:
                cut = f"the server reported an error mid-stream: {exc}"
            except httpx.TransportError as exc:
                detail = str(exc) or type(exc).__name__
                cut = f"{type(exc).__name__}: {detail}"

            if failure is not None:
                if recover is not None and recoveries < MAX_RECOVERIES:
                    recovery = recover(failure)
                    if recovery is not None:
                        recoveries += 1
                        for event in recovery.events:
                            yield event
                        body = recovery.body
                        continue
                if policy.retryable_status(failure.status, failure.headers):
                    failures += 1
                    delay = policy.next_delay(failures, failure.headers)
                    if delay is not None:
                        await policy.sleep(delay)
                        continue
                    yield Finished(
                        status="error",
                        error=f"{describe(failure)} (gave up after {failures} attempts)",
                    )
                    return
                yield Finished(status="error", error=describe(failure))
                return

            assert cut is not None
            failures += 1
            delay = policy.next_delay(failures)
            if delay is not None:
                if streamed:
                    yield StreamReset(reason=f"retrying after a cut stream: {cut}")
                await policy.sleep(delay)
                continue
            if got_stream:
                yield Finished(status="incomplete", error=f"stream cut: {cut}")
            else:
                yield Finished(
                    status="error", error=f"cannot reach {url} after {failures} attempts: {cut}"
                )
            return


async def _drain(
    chunks: AsyncIterator[bytes], limit: int = 64 * 1024, seconds: float = 1.0
) -> None:
    """Read what follows the final event (e.g. `data: [DONE]`, the chunked terminator).

    A response read to its end lets httpx put the connection back in the pool, so the next
    turn skips a TCP and TLS handshake. Bounded, because the turn is already complete.
    """
    read = 0
    with anyio.move_on_after(seconds):
        async for chunk in chunks:
            read += len(chunk)
            if read > limit:
                break


class HostedProvider:
    """Configuration every hosted provider shares: model, key and endpoint, read as the
    official SDKs read them, plus the retry policy and an optional shared httpx client.

    Subclasses set the class attributes and implement `stream_turn`.
    """

    name: str
    api: str
    default_model: str
    default_base_url: str
    key_variable: str
    base_variable: str

    def __init__(
        self,
        *,
        model: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        retry: RetryPolicy | None = None,
        client: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model or self.default_model
        self.api_key = api_key if api_key is not None else env_setting(env, self.key_variable)
        configured = base_url or env_setting(env, self.base_variable) or self.default_base_url
        self.base_url = configured.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.client = client
        self.timeout = timeout
        if client is None:
            # Built now, once per process, not in a worker's first turns: its ~70 ms would
            # stall every reply streaming beside them.
            _ssl_context()

    def config_error(self) -> str | None:
        """Why a call cannot work at all, or None. A custom base URL may need no key."""
        if not self.api_key and self.base_url == self.default_base_url:
            return f"{self.key_variable} is not set"
        return None
