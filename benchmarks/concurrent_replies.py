"""Many replies at once: one `crdtchat worker` process streaming N replies through a relay,
against a stateless proxy that forwards the same tokens to the same devices.

Processes (all on 127.0.0.1):

- the loopback OpenAI server (Responses API), in its own process, pacing its events
  (`--rate` tokens per second per reply) and stamping each text delta with the CLOCK_MONOTONIC
  time it was written: the reply's words are those stamps;
- crdtchat: our relay (`python -m crdtchat.relay.main`) and one `crdtchat worker --provider openai`
  process, which learns of the N rooms from the relay's feed and answers them all at once,
  flushing streamed text into `transport.streams` every 100 ms;
- the floor: a minimal stateless chat proxy (`--serve-proxy`, in this file): a websocket
  server that, for each device, POSTs the same request to the same loopback server with one
  pooled httpx client, decodes the SSE events, and forwards the text deltas to the device
  over a plain websocket, batched every 100 ms like the worker. No document, no store.

This process plays the devices: per conversation a writer that sends the question and an
observer that stamps each frame with its arrival time and finds the stamps in it (the first
sighting of each; the committed message repeats them). Token-to-screen latency = arrival -
stamp. CPU per token = the process's user+system CPU time from the moment the questions go
out until every reply is committed (crdtchat: a message with status `complete` reached the
observer; floor: the proxy said so) / tokens delivered. The two phases run one after the
other in the same run (`--rounds` alternates them), with the same questions and pacing.

    .venv/bin/python benchmarks/concurrent_replies.py [--conversations 200] [--tokens 100]
        [--rate 20] [--rounds 1] [--limit 100,200,300,400] [--profile-worker FILE]

`--limit` runs the crdtchat phase alone at each number of conversations and reports p99,
to find where it passes 250 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import (
    REPO,
    SECRET,
    LightClient,
    cpu_seconds,
    open_light_client,
    percentile,
    running_relay,
)

from crdtchat.document import Conversation
from crdtchat.tokens import mint_token
from crdtchat.wire import SyncStep1, SyncUpdate, encode_message
from crdtchat.worker.titles import TITLE_PROMPT

MODEL = "gpt-4.1"
KEY = "sk-bench"
FLUSH_SECONDS = 0.1  # the worker's TurnSettings.flush_interval; the floor batches the same
# Delimited: a bare number could run into a digit-valued byte before it (a length prefix).
STAMP = re.compile(rb"<(\d{1,9}\.\d{6})>")
PLACEHOLDER = "@"
P99_LIMIT_MS = 250.0
TITLE_PROMPT_START = TITLE_PROMPT.split("{", 1)[0]


# ---------------------------------------------------------------- the stamping loopback


def serve_loopback(rate: float) -> None:
    """`--serve-loopback`: the loopback OpenAI server, stamping each `@` delta as it goes."""
    from crdtchat.loopback.http import ScriptedReply, SSEEventSpec, run_until_interrupted
    from crdtchat.loopback.openai_server import OpenAILoopback

    class Stamping(OpenAILoopback):
        @staticmethod
        def _script(context: list[dict[str, Any]], tool_names: list[str]) -> Any:
            # The worker's title request (crdtchat.worker.titles) quotes the question: the
            # echo rule would stream those 100 placeholders back, paced, as a second reply.
            # A model answers it in a few words, and so does this server.
            users = [i for i in context if i["type"] == "message" and i["role"] == "user"]
            if users and users[-1]["text"].startswith(TITLE_PROMPT_START):
                return ScriptedReply(text="Placeholders in a row")
            return OpenAILoopback._script(context, tool_names)

        def outgoing_event(self, name: str | None, data: Any) -> SSEEventSpec:
            if (
                isinstance(data, dict)
                and data.get("type") == "response.output_text.delta"
                and data.get("delta", "").startswith(PLACEHOLDER)
            ):
                data = {**data, "delta": f"<{time.monotonic():.6f}> "}
            return name, data

    run_until_interrupted(Stamping(api_key=KEY, event_delay=1.0 / rate), "OPENAI_BASE_URL")


# ---------------------------------------------------------------- the floor: a stateless proxy


def serve_proxy(upstream: str, loop: str) -> None:
    """`--serve-proxy URL --floor-loop LOOP`: the stateless chat proxy (the floor), on the
    event loop named (uvloop by default, as `crdtchat worker` runs). Prints its ws:// URL."""
    import httpx
    from websockets.asyncio.server import ServerConnection, serve

    from crdtchat.providers.sse import SSEDecoder

    async def main() -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:

            async def handle(ws: ServerConnection) -> None:
                prompt = await ws.recv()
                body = {
                    "model": MODEL,
                    "input": [{"type": "message", "role": "user", "content": prompt}],
                    "stream": True,
                    "store": False,
                }
                pending: list[str] = []
                done = asyncio.Event()

                async def flusher() -> None:
                    while not done.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(done.wait(), FLUSH_SECONDS)
                        if pending:
                            text = "".join(pending)
                            pending.clear()
                            await ws.send(text.encode())

                flushing = asyncio.create_task(flusher())
                headers = {"authorization": f"Bearer {KEY}"}
                async with client.stream(
                    "POST", f"{upstream}/responses", json=body, headers=headers
                ) as response:
                    decoder = SSEDecoder()
                    async for chunk in response.aiter_bytes():
                        for event in decoder.feed(chunk):
                            data = json.loads(event.data)
                            if data.get("type") == "response.output_text.delta":
                                pending.append(data["delta"])
                done.set()
                await flushing
                await ws.send(b"complete")
                await ws.wait_closed()

            async with serve(handle, "127.0.0.1", 0, max_size=None, compression=None) as server:
                port = next(iter(server.sockets)).getsockname()[1]
                print(f"proxy listening on ws://127.0.0.1:{port}", flush=True)
                await asyncio.Future()

    with contextlib.suppress(KeyboardInterrupt):
        if loop == "uvloop":
            import uvloop

            uvloop.run(main())
        else:
            asyncio.run(main())


# ---------------------------------------------------------------- subprocesses


@dataclass
class Child:
    proc: subprocess.Popen[str]
    line: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def child(command: list[str], env: dict[str, str], log: Path, ready: str) -> Iterator[Child]:
    """A subprocess whose stdout says `ready...` once it serves; stopped on exit."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{command[1:3]} exited: {log.read_text()[-2000:]}")
            if line.startswith(ready):
                break
        else:
            raise RuntimeError(f"{command[1:3]} did not start")
        yield Child(proc, line.strip())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# ---------------------------------------------------------------- the devices


@dataclass
class Observed:
    """What one device's screen received for one reply."""

    latencies_ms: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # the stamps, beside latencies_ms
    seen: set[bytes] = field(default_factory=set)
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def on_frame(self, payload: bytes, arrived_ns: int) -> None:
        arrived = arrived_ns / 1e9
        for match in STAMP.finditer(payload):
            stamp = match.group(1)
            if stamp not in self.seen:
                self.seen.add(stamp)
                self.latencies_ms.append((arrived - float(stamp)) * 1e3)
                self.sent_at.append(float(stamp))
        if b"complete" in payload:
            self.complete.set()


@dataclass
class Phase:
    name: str
    conversations: int
    tokens: int
    cpu: dict[str, float]
    seconds: float
    latencies_ms: list[float]
    # (seconds from the questions going out to the token's send stamp, latency ms)
    timeline: list[tuple[float, float]] = field(default_factory=list)
    store_wait: str = ""  # crdtchat: the relay's queue-to-commit time of its writes
    # crdtchat: updates the relay stored during the phase. A loaded worker packs more tokens
    # into each flush, so the relay's CPU per token moves with the load; per update it does not.
    updates: int = 0

    def over_time(self, bucket: float = 0.5) -> str:
        """p50/p99/max of the tokens sent in each `bucket` seconds: where the tail comes from."""
        buckets: dict[int, list[float]] = {}
        for at, ms in self.timeline:
            buckets.setdefault(int(at // bucket), []).append(ms)
        lines = [f"{self.name}, by send time:  from s  tokens  p50 ms  p99 ms  max ms"]
        for index in sorted(buckets):
            values = sorted(buckets[index])
            lines.append(
                f"{'':>24}{index * bucket:>6.1f} {len(values):>7} "
                f"{percentile(values, 0.5):>7.1f} {percentile(values, 0.99):>7.1f} "
                f"{values[-1]:>7.1f}"
            )
        return "\n".join(lines)

    def cpu_us_per_token(self, process: str) -> float:
        return self.cpu[process] / max(self.tokens, 1) * 1e6

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 0.99)


def question(tokens: int) -> str:
    return " ".join([PLACEHOLDER] * tokens)


def token(room: str, role: str, sub: str) -> str:
    return mint_token(SECRET, room, role, sub, 3600)


async def crdtchat_phase(
    n: int,
    tokens: int,
    openai_url: str,
    work: Path,
    timeout: float,
    profile: Path | None = None,
    worker_count: int = 1,
    profile_relay: Path | None = None,
) -> Phase:
    """N rooms on a fresh relay, one worker process, N writers and N observers here."""
    data = work / f"relay-{n}-{time.monotonic_ns()}"
    data.mkdir()
    # The relay allows 128 connections per token subject (design §7.4): one worker holding N
    # rooms needs N, so a deployment raises it for its workers (or runs more worker subjects).
    with running_relay(data, ["--subject-connections", str(max(128, 2 * n))]) as relay:
        rooms = [f"reply-{i:04d}" for i in range(n)]
        writers: list[tuple[LightClient, Conversation]] = []
        observed = {room: Observed() for room in rooms}
        clients: list[LightClient] = []
        try:
            for room in rooms:
                conversation = Conversation.create(author=f"person-{room}")
                conversation.set_settings(provider="openai", model=MODEL)
                # One person per conversation, as in real use (quotas are per subject).
                person = f"person-{room}"
                url = f"{relay.url}/{room}?token={token(room, 'writer', person)}"
                writer = await open_light_client(url, lambda c, p, t: None)
                writer.send(encode_message(SyncStep1(b"\x00")))
                writer.send(encode_message(SyncUpdate(conversation.encode_state())))
                writers.append((writer, conversation))
                watch = observed[room]
                url = f"{relay.url}/{room}?token={token(room, 'reader', f'screen-{room}')}"
                screen = await open_light_client(
                    url, lambda c, p, t, watch=watch: watch.on_frame(p, t)
                )
                screen.send(encode_message(SyncStep1(b"\x00")))
                clients += [writer, screen]
            env = {
                **os.environ,
                "CRDTCHAT_TOKEN": token("*", "worker", "worker-1"),
                "OPENAI_BASE_URL": openai_url,
                "OPENAI_API_KEY": KEY,
                "PYTHONUNBUFFERED": "1",
            }
            command = [sys.executable, "-m", "crdtchat.cli", "worker", "--relay", relay.url]
            command += ["--provider", "openai", "--model", MODEL, "--idle-after", "5"]
            # Several workers share the rooms through leases: each claims, waits until the
            # relay stored its lease, and only the holder streams.
            joined = feed_connections(work / "worker.log")
            workers = [
                subprocess.Popen(
                    [*command, "--lease-ttl", "30"],
                    cwd=REPO,
                    env={**env, "CRDTCHAT_TOKEN": token("*", "worker", f"worker-{i + 1}")},
                    stdout=subprocess.DEVNULL,
                    stderr=open_log(work),
                )
                for i in range(worker_count)
            ]
            spies: list[subprocess.Popen[bytes]] = []

            def worker_cpu() -> float:
                return sum(cpu_seconds(w.pid) for w in workers)

            try:
                # Until every worker is on the feed: its start-up (imports) is not per token.
                await feeds_connected(work / "worker.log", joined + worker_count, timeout)
                # py-spy must be installed (pip install py-spy), started here so the profiles
                # cover the measured phase only; the relay's includes its store thread, where
                # SQLite commits run.
                spies = [
                    subprocess.Popen(
                        [
                            *("py-spy", "record", "--pid", str(pid), "--threads"),
                            *("--output", str(output), "--format", "raw", "--rate", "250"),
                            "--nonblocking",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for pid, output in ((workers[0].pid, profile), (relay.pid, profile_relay))
                    if output is not None
                ]
                before = {"worker": worker_cpu(), "relay": relay.cpu()}
                stored_before = read_counter(relay.url, "crdtchat_updates_stored_total")
                started = time.monotonic()
                for writer, conversation in writers:
                    vector = conversation.state_vector()
                    conversation.append("user", question(tokens))
                    writer.send(encode_message(SyncUpdate(conversation.update_since(vector))))
                async with asyncio.timeout(timeout):
                    for watch in observed.values():
                        await watch.complete.wait()
                seconds = time.monotonic() - started
                cpu = {
                    "worker": worker_cpu() - before["worker"],
                    "relay": relay.cpu() - before["relay"],
                }
                store_wait = read_store_wait(relay.url)
                stored = read_counter(relay.url, "crdtchat_updates_stored_total") - stored_before
            finally:
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
                for worker in workers:
                    worker.send_signal(signal.SIGINT)
                for worker in workers:
                    try:
                        worker.wait(20)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        worker.wait(10)
        finally:
            for client in clients:
                client.close()
    phase = collect("crdtchat", n, tokens, observed, cpu, seconds, started)
    phase.store_wait = store_wait
    phase.updates = stored
    return phase


def read_counter(ws_url: str, name: str) -> int:
    """One counter of the relay's `/metrics`."""
    url = ws_url.replace("ws://", "http://", 1).rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return int(float(line.split()[-1]))
    raise RuntimeError(f"the relay's /metrics has no {name}")


def read_store_wait(ws_url: str) -> str:
    """The relay's `crdtchat_store_write_seconds` histogram (`/metrics`) as mean and the
    bucket bound under which 99% of writes were committed: the durable commit's share of
    the latency (a write is broadcast only after it)."""
    url = ws_url.replace("ws://", "http://", 1).rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    buckets: list[tuple[float, int]] = []
    total = count = commits = 0.0
    for line in text.splitlines():
        if line.startswith('crdtchat_store_write_seconds_bucket{le="'):
            bound = line.split('"')[1]
            buckets.append(
                (float("inf") if bound == "+Inf" else float(bound), int(line.split()[-1]))
            )
        elif line.startswith("crdtchat_store_write_seconds_sum "):
            total = float(line.split()[-1])
        elif line.startswith("crdtchat_store_write_seconds_count "):
            count = float(line.split()[-1])
        elif line.startswith("crdtchat_store_commits_total "):
            commits = float(line.split()[-1])
    if not count:
        return "store wait: no writes"
    p99 = next(bound for bound, cumulative in buckets if cumulative >= 0.99 * count)
    return (
        f"store wait mean {total / count * 1e3:.2f} ms, p99 <= {p99 * 1e3:g} ms, {count:.0f} writes"
        f" in {commits:.0f} commits"
    )


def open_log(work: Path) -> Any:
    return open(work / "worker.log", "a")  # handed to the child; closed when we exit


FEED_CONNECTED = "connected to the room feed"  # crdtchat/worker/feed.py logs it


def feed_connections(log: Path) -> int:
    """How many times the workers writing `log` (shared by every phase) joined the feed."""
    return log.read_text().count(FEED_CONNECTED) if log.exists() else 0


async def feeds_connected(log: Path, count: int, timeout: float) -> None:
    """Until the workers' log shows `count` feed connections. Polled: the children write the
    file, nothing here can wait on it."""
    async with asyncio.timeout(timeout):
        while feed_connections(log) < count:
            await asyncio.sleep(0.05)


async def floor_phase(n: int, tokens: int, proxy_url: str, proxy_pid: int, timeout: float) -> Phase:
    observed = [Observed() for _ in range(n)]
    clients: list[LightClient] = []
    try:
        for watch in observed:
            screen = await open_light_client(
                proxy_url, lambda c, p, t, watch=watch: watch.on_frame(p, t)
            )
            clients.append(screen)
        before = cpu_seconds(proxy_pid)
        started = time.monotonic()
        for client in clients:
            client.protocol.send_text(question(tokens).encode())
            client._flush()
        try:
            async with asyncio.timeout(timeout):
                for watch in observed:
                    await watch.complete.wait()
        except TimeoutError:
            done = sum(w.complete.is_set() for w in observed)
            seen = sum(len(w.seen) for w in observed)
            raise RuntimeError(f"floor: {done}/{n} replies complete, {seen} tokens") from None
        seconds = time.monotonic() - started
        cpu = {"proxy": cpu_seconds(proxy_pid) - before}
    finally:
        for client in clients:
            client.close()
    return collect("floor", n, tokens, dict(enumerate(observed)), cpu, seconds, started)


def collect(
    name: str,
    n: int,
    tokens: int,
    observed: dict[Any, Observed],
    cpu: dict[str, float],
    s: float,
    started: float,
) -> Phase:
    latencies = sorted(ms for watch in observed.values() for ms in watch.latencies_ms)
    timeline = [
        (at - started, ms)
        for watch in observed.values()
        for at, ms in zip(watch.sent_at, watch.latencies_ms, strict=True)
    ]
    delivered = sum(len(watch.seen) for watch in observed.values())
    if delivered != n * tokens:
        print(f"{name}: {delivered} tokens seen, expected {n * tokens}", file=sys.stderr)
    return Phase(name, n, delivered, cpu, s, latencies, timeline)


# ---------------------------------------------------------------- the run


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(pairs: list[tuple[Phase, Phase]]) -> None:
    print(
        f"\n{'phase':<9} {'conv':>5} {'tokens':>7} {'s':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} | CPU µs/token"
    )
    for ours, floor in pairs:
        for phase in (ours, floor):
            parts = ", ".join(
                f"{process} {phase.cpu_us_per_token(process):.1f}" for process in phase.cpu
            )
            if phase.updates and "relay" in phase.cpu:
                per_update = phase.cpu["relay"] / phase.updates * 1e6
                parts += f" (relay {per_update:.1f} µs per stored update, {phase.updates})"
            print(
                f"{phase.name:<9} {phase.conversations:>5} {phase.tokens:>7} "
                f"{phase.seconds:>6.1f} {phase.p50:>7.1f} {phase.p99:>7.1f} "
                f"{phase.latencies_ms[-1] if phase.latencies_ms else float('nan'):>7.1f} | "
                f"{parts}" + (f"; {phase.store_wait}" if phase.store_wait else "")
            )
    print()
    for ours, floor in pairs:
        proxy = floor.cpu_us_per_token("proxy")
        worker = ours.cpu_us_per_token("worker")
        both = worker + ours.cpu_us_per_token("relay")
        print(
            f"ratios crdtchat/floor: worker CPU per token {worker / proxy:.2f}x, worker+relay "
            f"{both / proxy:.2f}x (target 2x); p50 {ours.p50 / floor.p50:.2f}x, p99 "
            f"{ours.p99 / floor.p99:.2f}x (target 1.5x)"
        )


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="crdtchat-replies-") as directory:
        work = args.work or Path(directory)
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        here = str(Path(__file__).resolve())
        print(f"load before: {load()}; {os.cpu_count()} cores", file=sys.stderr)
        with child(
            [sys.executable, here, "--serve-loopback", "--rate", str(args.rate)],
            env,
            work / "loopback.log",
            "OPENAI_BASE_URL=",
        ) as loopback:
            openai_url = loopback.line.split("=", 1)[1]
            if args.limit:
                for n in args.limit:
                    phase = await crdtchat_phase(
                        n,
                        args.tokens,
                        openai_url,
                        work,
                        args.timeout,
                        args.profile,
                        args.workers,
                        args.profile_relay,
                    )
                    verdict = "over" if phase.p99 > P99_LIMIT_MS else "within"
                    print(
                        f"limit search: {args.workers} worker(s), {n} conversations: "
                        f"p50 {phase.p50:.1f} ms, p99 "
                        f"{phase.p99:.1f} ms ({verdict} {P99_LIMIT_MS:.0f} ms), worker "
                        f"{phase.cpu_us_per_token('worker'):.1f} µs/token, relay "
                        f"{phase.cpu_us_per_token('relay'):.1f} µs/token "
                        f"({phase.cpu['relay'] / max(phase.updates, 1) * 1e6:.1f} µs per stored "
                        f"update, {phase.updates}), {phase.seconds:.1f} s; "
                        f"{phase.store_wait}; load {load()}",
                        flush=True,
                    )
                    if args.over_time:
                        print(phase.over_time(), flush=True)
                return
            with child(
                [
                    sys.executable,
                    here,
                    "--serve-proxy",
                    openai_url,
                    "--floor-loop",
                    args.floor_loop,
                ],
                env,
                work / "proxy.log",
                "proxy listening on ",
            ) as proxy:
                proxy_url = proxy.line.rsplit(" ", 1)[1] + "/reply"
                pairs = []
                for round_ in range(args.rounds):
                    n, k = args.conversations, args.tokens
                    print(f"round {round_ + 1}: crdtchat, load {load()}", file=sys.stderr)
                    ours = await crdtchat_phase(
                        n,
                        k,
                        openai_url,
                        work,
                        args.timeout,
                        args.profile,
                        args.workers,
                        args.profile_relay,
                    )
                    print(f"round {round_ + 1}: floor, load {load()}", file=sys.stderr)
                    floor = await floor_phase(n, k, proxy_url, proxy.pid, args.timeout)
                    pairs.append((ours, floor))
                    if args.over_time:
                        print(f"{ours.over_time()}\n{floor.over_time()}", flush=True)
        print(
            f"\n{args.conversations} conversations x {args.tokens} tokens at {args.rate:g} "
            f"tokens/s each, flush every {FLUSH_SECONDS * 1e3:.0f} ms; load after: {load()}"
        )
        report(pairs)
        if args.rounds > 1:
            ratios = [
                ours.cpu_us_per_token("worker") / floor.cpu_us_per_token("proxy")
                for ours, floor in pairs
            ]
            both = [
                (ours.cpu_us_per_token("worker") + ours.cpu_us_per_token("relay"))
                / floor.cpu_us_per_token("proxy")
                for ours, floor in pairs
            ]
            p99s = [ours.p99 / floor.p99 for ours, floor in pairs]
            print(
                f"median over {args.rounds} rounds: worker CPU/token "
                f"{statistics.median(ratios):.2f}x, worker+relay {statistics.median(both):.2f}x "
                f"(target 2x), p99 {statistics.median(p99s):.2f}x (target 1.5x)"
            )


def cli() -> None:
    if "--serve-loopback" in sys.argv:
        rate = float(sys.argv[sys.argv.index("--rate") + 1])
        serve_loopback(rate)
        return
    if "--serve-proxy" in sys.argv:
        loop = sys.argv[sys.argv.index("--floor-loop") + 1]
        serve_proxy(sys.argv[sys.argv.index("--serve-proxy") + 1], loop)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per reply")
    parser.add_argument("--rate", type=float, default=20.0, help="tokens per second per reply")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="crdtchat worker processes")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--floor-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the floor proxy's event loop (the worker and the relay run on uvloop)",
    )
    parser.add_argument(
        "--profile-worker",
        "--profile",
        dest="profile",
        type=Path,
        help="py-spy the (first) worker during the measured phase to FILE (raw format)",
    )
    parser.add_argument(
        "--profile-relay", type=Path, help="py-spy the relay during the measured phase to FILE"
    )
    parser.add_argument(
        "--over-time", action="store_true", help="latency by send time, per phase: the tail's when"
    )
    parser.add_argument("--work", type=Path, help="keep logs and stores here (default: a temp dir)")
    parser.add_argument(
        "--limit",
        type=lambda text: [int(x) for x in text.split(",")],
        help="comma-separated conversation counts: crdtchat alone, p99 at each",
    )
    args = parser.parse_args()
    if min(args.conversations, args.tokens, args.rounds) < 1 or args.rate <= 0:
        parser.error("counts and --rate must be positive")
    asyncio.run(run(args))


if __name__ == "__main__":
    cli()
