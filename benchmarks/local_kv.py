"""Prompt evaluation of the local model per turn, with KV checkpoints and without.

Builds a conversation of `--turns` turns with the embedded SmolLM2 model, every turn resuming
from the previous turn's checkpoint file (the live context is ignored, as for a worker that
serves many rooms, so every turn really loads a file). Then, for a few sample turns, the same
request is timed again with the checkpoint (`with`) and as a full prefill (`without`), and the
median of `--repeats` runs is shown side by side (one run for the long full prefills). Target:
turn N with checkpoints at most 1.3x turn 1; without, the cost grows with the thread.

While building, every turn records the tokens it evaluated against the tokens that are new
to it: its prompt minus the tokens the previous turn's checkpoint holds (that turn's prompt
and the tokens the model generated and evaluated there). Target: the new ones only. It also
records the size of each turn's checkpoint file (the worker keeps only the last one of each
branch).

Times are wall clock and CPU time of the evaluating thread. The model runs on one thread by
default (`--threads`): llama.cpp then computes in that thread, so its CPU time is the cost of
the evaluation even on a machine busy with other work, where wall times (and multi-threaded
llama.cpp, whose threads spin at barriers) swing widely.

    .venv/bin/python benchmarks/local_kv.py [--turns 50] [--max-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio

from crdtchat.kvcache import KVCheckpointStore
from crdtchat.prefix import prefix_hashes
from crdtchat.providers.base import Finished, TextDelta, TurnRequest
from crdtchat.providers.local import DEFAULT_MODEL, LocalProvider
from crdtchat.schema import DerivedEntry, Message

SYSTEM = "You are a concise assistant. Answer in one short sentence."
TOPICS = ("the sea", "bread", "owls", "trains", "copper", "tea", "maps", "snow", "bees", "clocks")


@dataclass(frozen=True)
class Sample:
    input_tokens: int
    evaluated: int
    eval_seconds: float
    eval_cpu: float
    load_seconds: float
    load_cpu: float


async def turn(provider: LocalProvider, request: TurnRequest) -> tuple[str, Finished]:
    text, finished = "", None
    async for event in provider.stream_turn(request):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Finished):
            finished = event
    if finished is None or finished.status == "error":
        raise SystemExit(f"turn failed: {finished}")
    return text, finished


def make_request(thread: list[Message], derived: Mapping[str, DerivedEntry], max_tokens: int):
    return TurnRequest(
        conversation_id="bench",
        model=DEFAULT_MODEL,
        system=SYSTEM,
        tools={},
        thread=list(thread),
        prefix_hashes=prefix_hashes(SYSTEM, {}, thread),
        derived=dict(derived),
        params={"max_tokens": max_tokens},
    )


def sample_of(finished: Finished) -> Sample:
    raw = finished.usage.raw
    return Sample(
        input_tokens=finished.usage.input_tokens,
        evaluated=int(raw["prompt_eval_tokens"]),
        eval_seconds=float(raw["prompt_eval_seconds"]),
        eval_cpu=float(raw["prompt_eval_cpu_seconds"]),
        load_seconds=float(raw.get("kv_load_seconds", 0.0)),
        load_cpu=float(raw.get("kv_load_cpu_seconds", 0.0)),
    )


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(
        input_tokens=samples[0].input_tokens,
        evaluated=samples[0].evaluated,
        eval_seconds=statistics.median(s.eval_seconds for s in samples),
        eval_cpu=statistics.median(s.eval_cpu for s in samples),
        load_seconds=statistics.median(s.load_seconds for s in samples),
        load_cpu=statistics.median(s.load_cpu for s in samples),
    )


async def main(turns: int, max_tokens: int, repeats: int, threads: int, kv_dir: Path) -> None:
    store = KVCheckpointStore(kv_dir)
    with_kv = LocalProvider(kv_store=store, reuse_live_state=False, n_threads=threads)
    without_kv = LocalProvider(checkpoints=False, reuse_live_state=False, n_threads=threads)
    await with_kv.warm_up()

    # Build the conversation; requests[k] is turn k+1 as the worker would send it.
    thread: list[Message] = []
    entry: DerivedEntry | None = None
    requests: list[TurnRequest] = []
    parent: str | None = None
    built: list[tuple[int, int, int, int]] = []  # (prompt, new, evaluated, checkpoint bytes)
    previous_total = 0
    for number in range(1, turns + 1):
        topic = TOPICS[number % len(TOPICS)]
        asked = Message(
            id=f"u{number}",
            role="user",
            author="bench",
            parent=parent,
            content=f"Question {number}: tell me one fact about {topic}.",
        )
        thread.append(asked)
        request = make_request(thread, {"kv": entry} if entry else {}, max_tokens)
        requests.append(request)
        text, finished = await turn(with_kv, request)
        reply = Message(
            id=f"u{number}~a1", role="assistant", author="worker", parent=asked.id, content=text
        )
        thread.append(reply)
        parent = reply.id
        (checkpoint,) = [d for d in finished.derived if d.kind == "kv_checkpoint"]
        prompt = finished.usage.input_tokens
        built.append(
            (
                prompt,
                prompt - previous_total,
                int(finished.usage.raw["prompt_eval_tokens"]),
                int(finished.usage.raw["kv_checkpoint_bytes"]),
            )
        )
        previous_total = int(checkpoint.data["n_tokens"])  # what the next turn can resume
        entry = DerivedEntry(
            kind="kv_checkpoint",
            message_id=reply.id,
            prefix_hash=prefix_hashes(SYSTEM, {}, thread)[-1],
            provider=with_kv.name,
            api=with_kv.api,
            model=DEFAULT_MODEL,
            data=dict(checkpoint.data),
        )
        print(
            f"\rbuilt turn {number}/{turns} ({finished.usage.input_tokens} prompt tokens)",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)

    print("\nper turn while building (each turn resumes from the previous checkpoint file):\n")
    print(f"{'turn':>4} {'prompt':>6} {'new':>4} {'evaluated':>9} {'x new':>6} {'checkpoint':>11}")
    for number, (prompt, new, evaluated, size) in enumerate(built, start=1):
        if number in {1, 2, 3, 5, 10, 20, 30, 40, 50, turns}:
            print(
                f"{number:>4} {prompt:>6} {new:>4} {evaluated:>9} {evaluated / new:>6.2f} "
                f"{size / 1e6:>8.2f} MB"
            )
    later = built[1:]
    if later:
        exact = sum(evaluated == new for _, new, evaluated, _ in later)
        worst = max(evaluated / new for _, new, evaluated, _ in later)
        print(
            f"turns 2-{turns}: evaluated == new on {exact} of {len(later)} turns, worst "
            f"{worst:.2f}x new; evaluated {sum(e for _, _, e, _ in later)} of "
            f"{sum(p for p, _, _, _ in later)} prompt tokens in all; checkpoint of turn {turns} "
            f"{built[-1][3] / 1e6:.2f} MB, {built[-1][3] / built[-1][0] / 1e3:.1f} kB per token "
            f"(kept: one per live branch; all {turns} would take "
            f"{sum(b for _, _, _, b in built) / 1e6:.0f} MB)"
        )

    points = sorted({1, *range(10, turns + 1, 10), turns})
    rows: dict[int, tuple[Sample, Sample]] = {}
    for number in points:
        request = requests[number - 1]
        print(f"measuring turn {number}", file=sys.stderr, flush=True)
        with_samples = [sample_of((await turn(with_kv, request))[1]) for _ in range(repeats)]
        full_runs = repeats if number == 1 else 1
        without_samples = [
            sample_of((await turn(without_kv, request))[1]) for _ in range(full_runs)
        ]
        rows[number] = (median_sample(with_samples), median_sample(without_samples))

    print(
        f"\nlocal model {DEFAULT_MODEL}, {threads} thread(s), max_tokens {max_tokens}, "
        f"median of {repeats} runs; ms as wall/cpu\n"
    )
    print(
        f"{'turn':>4} {'prompt':>6} | {'with: eval tok':>14} {'eval':>13} {'load':>11} "
        f"{'eval+load':>13} | {'without: eval tok':>17} {'eval':>15}"
    )

    def ms(wall: float, cpu: float) -> str:
        return f"{wall * 1e3:.1f}/{cpu * 1e3:.1f}"

    for number, (w, wo) in rows.items():
        print(
            f"{number:>4} {w.input_tokens:>6} | {w.evaluated:>14} "
            f"{ms(w.eval_seconds, w.eval_cpu):>13} {ms(w.load_seconds, w.load_cpu):>11} "
            f"{ms(w.eval_seconds + w.load_seconds, w.eval_cpu + w.load_cpu):>13} | "
            f"{wo.evaluated:>17} {ms(wo.eval_seconds, wo.eval_cpu):>15}"
        )
    first, last = rows[1], rows[turns]
    print()
    for label, pick in (
        ("wall", lambda x: (x.eval_seconds, x.load_seconds)),
        ("cpu", lambda x: (x.eval_cpu, x.load_cpu)),
    ):
        (w1, l1), (wn, ln) = pick(first[0]), pick(last[0])
        ratio_eval, ratio_total = wn / w1, (wn + ln) / (w1 + l1)
        ratio_without = pick(last[1])[0] / pick(first[1])[0]
        verdict = "meets" if ratio_eval <= 1.3 else "MISSES"
        print(
            f"{label:>4}: turn {turns} / turn 1 with checkpoints {ratio_eval:.2f}x prompt eval "
            f"({verdict} 1.3x), {ratio_total:.2f}x with the checkpoint load; "
            f"without checkpoints {ratio_without:.2f}x"
        )
    print(f"checkpoint files: {len(store.files())}, {store.total_bytes() / 1e6:.1f} MB")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    parser.add_argument("--kv-dir", type=Path, help="checkpoint directory (default: a temp dir)")
    args = parser.parse_args()
    if min(args.turns, args.repeats, args.max_tokens, args.threads) < 1:
        parser.error("--turns, --repeats, --max-tokens and --threads must be positive")
    settings = (args.turns, args.max_tokens, args.repeats, args.threads)
    if args.kv_dir is not None:
        anyio.run(main, *settings, args.kv_dir)
        return
    with tempfile.TemporaryDirectory(prefix="crdtchat-kv-bench-") as directory:
        anyio.run(main, *settings, Path(directory))


if __name__ == "__main__":
    cli()
