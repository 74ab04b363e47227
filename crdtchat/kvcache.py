"""Local KV checkpoints: a local model's saved attention state, content-addressed on disk.

A `kv_checkpoint` derived entry holds only a reference (`{"ref", "n_tokens", "sha256"}`); the
bytes stay in a bounded cache directory on the machine that produced them. Anything may go
wrong with such a file (another machine, a cleaned cache, a torn write, a different model
build), so every failure to load is a `CheckpointUnavailable` that the provider turns into a
full prefill, never into an error for the user.

The file format is a sans-I/O pair (`encode_snapshot` / `decode_snapshot`); `KVCheckpointStore`
is the thin layer that writes, verifies, touches (LRU) and prunes files.

The directory is a cache, so a full one is never an error: a save first makes room under
`max_bytes` by evicting the least recently used files, and when the disk itself is full
(ENOSPC, EDQUOT) it evicts more and tries once again. Only if that fails too does `save`
raise, and the provider then goes on without a checkpoint for that turn (the next one pays a
prefill). The worker also removes checkpoints that nothing can use any more: only the last
one on each live branch of a conversation is worth keeping (`crdtchat.worker.checkpoints`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdtchat.errors import StorageError

MAGIC = b"CRDTCHAT-KV\x00\x01\n"
FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 2 * 1024**3
# A reference comes from a shared document: only our own file names are ever opened.
# (fullmatch, and \Z rather than "$", which matches before a final newline too.)
_REF = re.compile(r"\A([0-9a-f]{64})\.kv\Z")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0
# Errors that mean "the disk is full": evicting our own files may fix them.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

log = logging.getLogger(__name__)


class CheckpointUnavailable(StorageError):
    """The checkpoint cannot be used (missing, corrupt, other model): do a full prefill."""


@dataclass(frozen=True)
class KVSnapshot:
    """What a llama.cpp context needs to resume: the tokens it holds and its state bytes.

    `model` fingerprints the model file and context settings; a state only loads into a
    context built the same way.
    """

    model: str
    tokens: Sequence[int]
    state: bytes
    seed: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class CheckpointRef:
    """The reference a `kv_checkpoint` entry carries; `ref` is the file name in the store."""

    ref: str
    n_tokens: int
    sha256: str

    def as_data(self) -> dict[str, Any]:
        return {"ref": self.ref, "n_tokens": self.n_tokens, "sha256": self.sha256}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> CheckpointRef:
        """Validate an entry's `data`; anything a peer could have planted is rejected here."""
        ref, n_tokens, sha = data.get("ref"), data.get("n_tokens"), data.get("sha256")
        if not isinstance(ref, str) or not (match := _REF.fullmatch(ref)):
            raise CheckpointUnavailable(f"not a checkpoint file name: {ref!r}")
        if not isinstance(sha, str) or sha != match.group(1):
            raise CheckpointUnavailable("sha256 does not match the file name")
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
            raise CheckpointUnavailable(f"bad n_tokens: {n_tokens!r}")
        return cls(ref=ref, n_tokens=n_tokens, sha256=sha)


def _tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    packed = array("i", tokens)
    if packed.itemsize != 4:  # pragma: no cover - every platform llama.cpp runs on has 32-bit int
        raise RuntimeError("array('i') is not 32-bit here")
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def _tokens_from_bytes(raw: bytes) -> list[int]:
    packed = array("i")
    packed.frombytes(raw)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tolist()


def encode_snapshot(snapshot: KVSnapshot) -> bytes:
    """MAGIC, u32 header length, JSON header, int32 LE tokens, state bytes."""
    header = json.dumps(
        {
            "version": FORMAT_VERSION,
            "model": snapshot.model,
            "n_tokens": snapshot.n_tokens,
            "seed": snapshot.seed,
            "state_size": len(snapshot.state),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return b"".join(
        (
            MAGIC,
            len(header).to_bytes(4, "little"),
            header,
            _tokens_to_bytes(snapshot.tokens),
            snapshot.state,
        )
    )


def decode_snapshot(blob: bytes) -> KVSnapshot:
    """The inverse of `encode_snapshot`; any inconsistency is `CheckpointUnavailable`."""
    if not blob.startswith(MAGIC):
        raise CheckpointUnavailable("not a crdtchat KV checkpoint (bad magic)")
    offset = len(MAGIC)
    if len(blob) < offset + 4:
        raise CheckpointUnavailable("truncated header")
    header_len = int.from_bytes(blob[offset : offset + 4], "little")
    offset += 4
    try:
        header = json.loads(blob[offset : offset + header_len])
        model = header["model"]
        n_tokens = header["n_tokens"]
        seed = header["seed"]
        state_size = header["state_size"]
        version = header["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointUnavailable(f"unreadable header: {exc}") from exc
    if version != FORMAT_VERSION:
        raise CheckpointUnavailable(f"unsupported checkpoint format {version!r}")
    if not (
        isinstance(model, str)
        and all(isinstance(v, int) and v >= 0 for v in (n_tokens, seed, state_size))
    ):
        raise CheckpointUnavailable("header fields have wrong types")
    offset += header_len
    if len(blob) != offset + 4 * n_tokens + state_size:
        raise CheckpointUnavailable("file length does not match its header")
    tokens = _tokens_from_bytes(blob[offset : offset + 4 * n_tokens])
    state = blob[offset + 4 * n_tokens :]
    return KVSnapshot(model=model, tokens=tokens, state=state, seed=seed)


def default_directory() -> Path:
    """`$CRDTCHAT_KV_DIR`, else `$XDG_CACHE_HOME/crdtchat/kv`, else `~/.cache/crdtchat/kv`."""
    if configured := os.environ.get("CRDTCHAT_KV_DIR"):
        return Path(configured).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "crdtchat" / "kv"


def default_max_bytes() -> int:
    """`$CRDTCHAT_KV_MAX_BYTES` (an integer number of bytes), else 2 GiB."""
    configured = os.environ.get("CRDTCHAT_KV_MAX_BYTES")
    if not configured:
        return DEFAULT_MAX_BYTES
    try:
        value = int(configured)
    except ValueError as exc:
        raise ValueError(f"CRDTCHAT_KV_MAX_BYTES must be an integer, not {configured!r}") from exc
    if value < 0:
        raise ValueError("CRDTCHAT_KV_MAX_BYTES must not be negative")
    return value


class KVCheckpointStore:
    """A directory of content-addressed checkpoint files, kept under `max_bytes` (LRU by mtime).

    Safe to share between processes: files are written to a temporary name and renamed into
    place, a file's name is its own SHA-256, and pruning tolerates files vanishing under it.
    """

    def __init__(self, directory: Path | str | None = None, max_bytes: int | None = None):
        self.directory = Path(directory) if directory is not None else default_directory()
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        if self.max_bytes < 0:
            raise ValueError("max_bytes must not be negative")

    def path_of(self, ref: str) -> Path:
        if not _REF.fullmatch(ref):
            raise CheckpointUnavailable(f"not a checkpoint file name: {ref!r}")
        return self.directory / ref

    def save(self, snapshot: KVSnapshot) -> CheckpointRef | None:
        """Write the snapshot; None when it alone would exceed the size bound.

        Room is made first (LRU files go until the new one fits under `max_bytes`), so the
        directory stays within the bound. Raises OSError only when the file cannot be
        written even after evicting every other checkpoint.
        """
        blob = encode_snapshot(snapshot)
        if len(blob) > self.max_bytes:
            return None
        sha = hashlib.sha256(blob).hexdigest()
        ref = f"{sha}.kv"
        path = self.directory / ref
        self.directory.mkdir(parents=True, exist_ok=True)
        if path.exists():
            os.utime(path)  # same content already there: just mark it recently used
        else:
            self.prune(room_for=len(blob))
            try:
                self._write(path, blob)
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise
                # The disk is fuller than our bound assumed (other files share it): our own
                # files are a cache, so they go first, oldest first, then one more try.
                freed = self._evict_for_disk(len(blob))
                log.warning(
                    "KV checkpoint directory %s is full (%s): evicted %d bytes",
                    self.directory,
                    exc.strerror,
                    freed,
                )
                if not freed:
                    raise
                self._write(path, blob)
        self.prune(keep={ref})
        return CheckpointRef(ref=ref, n_tokens=snapshot.n_tokens, sha256=sha)

    def _write(self, path: Path, blob: bytes) -> None:
        """Write to a temporary name and rename: readers never see a partial file."""
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(blob)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _evict_for_disk(self, needed: int) -> int:
        """Delete LRU files until the disk has `needed` bytes free; returns bytes freed."""
        freed = 0
        for path, stat in self.files():
            try:
                if shutil.disk_usage(self.directory).free >= needed:
                    break
            except OSError:
                pass
            if self._unlink(path):
                freed += stat.st_size
        return freed

    def remove(self, data: Mapping[str, Any]) -> int:
        """Delete the file an entry's `data` names (no longer useful); returns bytes freed."""
        try:
            path = self.path_of(CheckpointRef.from_data(data).ref)
            size = path.stat().st_size
        except (CheckpointUnavailable, OSError):
            return 0
        return size if self._unlink(path) else 0

    @staticmethod
    def _unlink(path: Path) -> bool:
        """Delete a cache file; another process deleting it first, or a read-only
        directory, is not an error here (the cache just stays bigger)."""
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot delete KV checkpoint %s: %s", path, exc)
            return False
        return True

    def load(self, data: Mapping[str, Any], *, model: str | None = None) -> KVSnapshot:
        """Read and verify the file an entry's `data` points at.

        Raises `CheckpointUnavailable` when it is missing, fails its hash (the file is then
        deleted: a corrupt cache file helps nobody), or belongs to another `model`.
        """
        ref = CheckpointRef.from_data(data)
        path = self.path_of(ref.ref)
        try:
            blob = path.read_bytes()
        except FileNotFoundError as exc:
            raise CheckpointUnavailable(f"checkpoint {ref.ref} is not in {self.directory}") from exc
        except OSError as exc:
            raise CheckpointUnavailable(f"checkpoint {ref.ref} unreadable: {exc}") from exc
        if hashlib.sha256(blob).hexdigest() != ref.sha256:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            raise CheckpointUnavailable(f"checkpoint {ref.ref} is corrupt (hash mismatch)")
        snapshot = decode_snapshot(blob)
        if snapshot.n_tokens != ref.n_tokens:
            raise CheckpointUnavailable("entry and file disagree on n_tokens")
        if model is not None and snapshot.model != model:
            raise CheckpointUnavailable("checkpoint was made by another model or context size")
        with contextlib.suppress(OSError):  # LRU order is a hint; a read-only cache still works
            os.utime(path)
        return snapshot

    def files(self) -> list[tuple[Path, os.stat_result]]:
        """Checkpoint files with their stat, least recently used first."""
        found = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not _REF.fullmatch(entry.name):
                continue
            try:
                found.append((Path(entry.path), entry.stat()))
            except FileNotFoundError:
                continue
        found.sort(key=lambda item: item[1].st_mtime)
        return found

    def total_bytes(self) -> int:
        return sum(stat.st_size for _, stat in self.files())

    def prune(self, keep: Iterable[str] = (), *, room_for: int = 0) -> int:
        """Delete least recently used files until the total plus `room_for` fits
        `max_bytes`; files named in `keep` are never deleted here. Returns bytes freed."""
        self._remove_stale_temporaries()
        kept = {keep} if isinstance(keep, str) else set(keep)
        files = self.files()
        total = sum(stat.st_size for _, stat in files)
        freed = 0
        for path, stat in files:
            if total + room_for <= self.max_bytes:
                break
            if path.name in kept:
                continue
            self._unlink(path)
            total -= stat.st_size
            freed += stat.st_size
        return freed

    def _remove_stale_temporaries(self) -> None:
        """Temporaries left by a process killed mid-write."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.startswith(_TMP_PREFIX):
                continue
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:  # gone already, or a read-only directory
                continue
