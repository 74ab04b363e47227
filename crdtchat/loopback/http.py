"""Shared plumbing of the loopback API servers: a real HTTP/1.1 server on 127.0.0.1, a
request log, fault injection, SSE over chunked transfer encoding, and the deterministic
"model" both vendors' fakes answer with.

Standard library only (`http.server.ThreadingHTTPServer`), so the fakes add no dependency.
The server runs in one background thread owned by the context manager that started it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

__all__ = [
    "Fault",
    "JSONReply",
    "LoggedRequest",
    "LoopbackServer",
    "SSEReply",
    "ScriptedReply",
    "Signer",
    "count_tokens",
    "run_until_interrupted",
    "script_reply",
]


def count_tokens(text: str) -> int:
    """The fakes' tokenizer: whitespace-separated words. Deterministic, so tests can assert it."""
    return len(text.split())


# ---------------------------------------------------------------- replies and faults


@dataclass
class JSONReply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


SSEEventSpec = tuple[str | None, Any]


@dataclass
class SSEReply:
    """Events as (event name or None, JSON-able data or a raw string).

    `error_event(n)` builds the in-band error event sent in place of event number `n` when an
    `error_event_next` fault hits this stream (None: the fault acts as a cut).
    """

    events: list[SSEEventSpec]
    headers: dict[str, str] = field(default_factory=dict)
    error_event: Callable[[int, Fault], SSEEventSpec] | None = None


@dataclass
class Fault:
    """One injected failure, consumed by the next matching request."""

    kind: Literal["status", "cut", "stream_error", "no_stream"]
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    after_events: int = 0
    message: str = ""


@dataclass
class LoggedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    # Filled in once answered: the status sent, and the usage the fake computed (if any).
    status: int | None = None
    usage: dict[str, Any] | None = None
    fault: str | None = None
    client_port: int = 0  # the same port twice means a reused connection


class Signer:
    """Opaque blobs bound to a model, like thinking signatures and encrypted reasoning.

    The secret is per server instance, so a blob is valid only where it was made, and only
    for the model that made it: exactly the property the providers must respect.
    """

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)

    def sign(self, model: str, payload: str) -> str:
        mac = hmac.new(self._secret, f"{model}\0{payload}".encode(), hashlib.sha256).digest()
        return base64.b64encode(mac).decode()

    def verify(self, model: str, payload: str, signature: Any) -> bool:
        return isinstance(signature, str) and hmac.compare_digest(
            self.sign(model, payload), signature
        )

    def blob(self, model: str) -> str:
        """A self-contained opaque blob (redacted thinking, encrypted reasoning)."""
        nonce = secrets.token_hex(8)
        return f"{nonce}.{self.sign(model, nonce)}"

    def verify_blob(self, model: str, blob: Any) -> bool:
        if not isinstance(blob, str) or "." not in blob:
            return False
        nonce, _, signature = blob.partition(".")
        return self.verify(model, nonce, signature)


# ---------------------------------------------------------------- the scripted model


@dataclass(frozen=True)
class ScriptedReply:
    """What the fake model says: text, or one call of a declared tool."""

    text: str = ""
    tool_name: str | None = None
    tool_arguments: str = ""


def script_reply(
    *,
    last_user_text: str,
    user_turns: int,
    tool_names: Iterable[str],
    tool_output: str | None,
) -> ScriptedReply:
    """The deterministic answer rule the tests rely on.

    - after a tool result: "The tool said: <output>";
    - a user message naming a declared tool (as a word): a call of that tool with
      arguments {"input": <the user text>};
    - otherwise "[turn N] You said: <text>", N = user messages in the context the server saw,
      so a reply proves whether the server had the whole conversation.
    """
    if tool_output is not None:
        return ScriptedReply(text=f"The tool said: {tool_output}")
    words = set(re.findall(r"[A-Za-z0-9_\-]+", last_user_text))
    for name in tool_names:
        if name in words:
            return ScriptedReply(
                tool_name=name, tool_arguments=json.dumps({"input": last_user_text})
            )
    return ScriptedReply(text=f"[turn {user_turns}] You said: {last_user_text}")


def word_pieces(text: str) -> list[str]:
    """Split text into streamable deltas that join back exactly (a word and its space)."""
    return re.findall(r"\S+\s*|\s+", text)


# ---------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # one small write per SSE event: do not wait for ACKs
    server: _HTTPServer
    timeout = 30  # an idle keep-alive connection does not pin a thread for long

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the request log has it
        return

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        owner = self.server.owner
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = ...
        headers = {k.lower(): v for k, v in self.headers.items()}
        logged = LoggedRequest(method, self.path, headers, None if body is ... else body)
        logged.client_port = self.client_address[1]
        owner._log(logged)
        if body is ...:
            reply: JSONReply | SSEReply = owner.error_reply(
                400, "invalid_request_error", "the request body is not valid JSON"
            )
        else:
            fault = owner._take_fault(streaming=isinstance(body, dict) and bool(body.get("stream")))
            if fault is not None and fault.kind == "status":
                logged.fault = f"status {fault.status}"
                reply = owner.fault_reply(fault)
            else:
                if fault is not None and fault.kind == "no_stream":
                    # Answer as a server without streaming support would: one JSON body.
                    logged.fault = "no_stream"
                    logged.body = {**body, "stream": False}
                    fault = None
                try:
                    reply = owner.handle(logged)
                except Exception as exc:  # a bug in the fake must not hang the client
                    reply = owner.error_reply(500, "api_error", f"loopback bug: {exc!r}")
                if fault is not None and isinstance(reply, SSEReply):
                    logged.fault = fault.kind
                    self._send_sse(reply, fault, owner)
                    logged.status = 200
                    return
        logged.status = reply.status if isinstance(reply, JSONReply) else 200
        if isinstance(reply, JSONReply):
            self._send_json(reply, owner)
        else:
            self._send_sse(reply, None, owner)

    def _send_json(self, reply: JSONReply, owner: LoopbackServer) -> None:
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in {**owner.common_headers(), **reply.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, reply: SSEReply, fault: Fault | None, owner: LoopbackServer) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        for name, value in {**owner.common_headers(), **reply.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        for sent, (name, data) in enumerate(reply.events):
            if fault is not None and sent >= fault.after_events:
                if fault.kind == "stream_error" and reply.error_event is not None:
                    self._chunk(_sse_bytes(*reply.error_event(sent, fault)))
                    break
                # A cut: stop mid-body (no terminating chunk) and drop the connection.
                self.wfile.flush()
                self.close_connection = True
                return
            if sent and owner.event_delay:
                time.sleep(owner.event_delay)  # pacing like a model that takes its time
            self._chunk(_sse_bytes(*owner.outgoing_event(name, data)))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _sse_bytes(name: str | None, data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return ((f"event: {name}\n" if name else "") + f"data: {payload}\n\n").encode()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a burst of new connections (hundreds of replies
    # starting at once) would overflow it and see resets, which a real API never shows.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], owner: LoopbackServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up is normal for a streaming server; anything else is not."""
        if isinstance(sys.exc_info()[1], ConnectionResetError | BrokenPipeError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class LoopbackServer:
    """Base of the fakes. Use as a context manager; `base_url` is what an SDK client takes.

    Fault knobs apply to the next requests in order: `fail_next` (an HTTP error status,
    e.g. 429 with Retry-After), `cut_next` (close the stream after K events), and
    `error_event_next` (an in-band error event after K events).
    """

    path_prefix = ""  # added to the root URL to form base_url (OpenAI's "/v1")

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        models: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
        event_delay: float = 0.0,
    ) -> None:
        self.host = host
        self.event_delay = event_delay  # seconds between streamed events
        self.requested_port = port
        self.api_key = api_key
        self.models = frozenset(models) if models is not None else None
        self.clock = clock
        self.requests: list[LoggedRequest] = []
        self._faults: deque[Fault] = deque()
        self._lock = threading.RLock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0

    # -- lifecycle

    def start(self) -> LoopbackServer:
        if self._httpd is not None:
            raise RuntimeError("already started")
        self._httpd = _HTTPServer((self.host, self.requested_port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=10)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def join(self) -> None:
        """Block until the server thread ends (it ends when `stop()` is called)."""
        thread = self._thread
        if thread is not None:
            thread.join()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("not started")
        return int(self._httpd.server_address[1])

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + self.path_prefix

    # -- faults and log

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 429,
        retry_after: str | None = None,
        headers: Mapping[str, str] | None = None,
        message: str = "",
    ) -> None:
        extra = dict(headers or {})
        if retry_after is not None:
            extra["retry-after"] = retry_after
        with self._lock:
            for _ in range(n):
                self._faults.append(Fault("status", status=status, headers=extra, message=message))

    def cut_next(self, n: int = 1, *, after_events: int = 3) -> None:
        with self._lock:
            for _ in range(n):
                self._faults.append(Fault("cut", after_events=after_events))

    def error_event_next(self, n: int = 1, *, after_events: int = 3, message: str = "") -> None:
        with self._lock:
            for _ in range(n):
                self._faults.append(
                    Fault("stream_error", after_events=after_events, message=message)
                )

    def ignore_stream_next(self, n: int = 1) -> None:
        """The next streaming requests get a plain JSON reply, as from a non-streaming server."""
        with self._lock:
            for _ in range(n):
                self._faults.append(Fault("no_stream"))

    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def _take_fault(self, *, streaming: bool) -> Fault | None:
        with self._lock:
            if not self._faults:
                return None
            head = self._faults[0]
            if head.kind != "status" and not streaming:
                return None  # stream faults wait for a streaming request
            return self._faults.popleft()

    def _log(self, request: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def posts(self, path_suffix: str) -> list[LoggedRequest]:
        """Logged POSTs whose path ends with `path_suffix` (e.g. "/responses")."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith(path_suffix)]

    def new_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}_{self._ids:04d}{uuid.uuid4().hex[:12]}"

    # -- to be provided by each vendor's fake

    def handle(self, request: LoggedRequest) -> JSONReply | SSEReply:
        raise NotImplementedError

    def error_reply(self, status: int, kind: str, message: str, **extra: Any) -> JSONReply:
        raise NotImplementedError

    def fault_reply(self, fault: Fault) -> JSONReply:
        raise NotImplementedError

    def common_headers(self) -> dict[str, str]:
        return {}

    def outgoing_event(self, name: str | None, data: Any) -> SSEEventSpec:
        """Each streamed event just before it is written; a subclass may rewrite it (e.g. a
        benchmark stamps the send time into text deltas, to measure token-to-screen delay)."""
        return name, data


def run_until_interrupted(server: LoopbackServer, env_var: str) -> None:
    """The `python -m` entry points: serve, print the base URL as an env assignment, wait."""
    server.start()
    print(f"{env_var}={server.base_url}", flush=True)
    try:
        server.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
