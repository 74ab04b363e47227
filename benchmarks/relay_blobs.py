"""Blob transfers through the relay: time of a large upload and download, memory of stalled ones.

Side by side in one run: the relay of this tree and, with `--old-src`, an earlier relay (a
checkout of a commit before blobs were streamed, e.g. `git worktree add /tmp/old 69f173e`; it
serves `/blobs/<sha256>`, this one `/blobs/<room>/<sha256>`). The anchor for time is the least
any upload costs: hashing the same bytes and writing them to a file with fsync, in this process,
on the same file system, in the same run. Memory is the relay's VmRSS growth while six uploads
stall after `--stalled` MiB each (Content-Length one byte more), then while six downloads of a
blob of that size stall (the client reads the status line only).

Run: .venv/bin/python benchmarks/relay_blobs.py [--old-src DIR] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import httpx
from pycrdt import Array, Doc, Map, Text

from benchmarks._support import SECRET, Server, running_relay, write_acked
from crdtchat import schema
from crdtchat.tokens import mint_token

MIB = 1024 * 1024
ROOM = "bench-blobs"
STALLS = 6


def token(role: str = "writer", sub: str = "bench") -> str:
    return mint_token(SECRET, ROOM, role, sub, 3600)


class Target:
    """One relay under test and the URL form it serves."""

    def __init__(self, name: str, server: Server, scoped: bool) -> None:
        self.name = name
        self.server = server
        self.scoped = scoped
        self.http = server.url.replace("ws://", "http://")
        self.doc: Doc = Doc()
        self.messages = self.doc.get(schema.MESSAGES, type=Array)
        self.referenced = 0

    def url(self, sha: str, tok: str) -> str:
        room = f"{ROOM}/" if self.scoped else ""
        return f"{self.http}/blobs/{room}{sha}?token={tok}"

    def path(self, sha: str, tok: str) -> str:
        return self.url(sha, tok).removeprefix(self.http)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.server.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        response = httpx.put(self.url(sha, token()), content=data, timeout=600)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"{self.name}: upload refused: {response.text}")
        return sha

    def reference(self, sha: str) -> None:
        """A message in the room that references `sha` (what the scoped relay serves by)."""
        self.referenced += 1
        item = Map(
            {
                "id": f"m{self.referenced}",
                "role": "user",
                "author": "bench",
                "parent": None,
                "created_at": 0.0,
                "content": Text("file"),
            }
        )

        def append() -> None:
            with self.doc.transaction():
                self.messages.append(item)
                item["files"] = [{"sha256": sha, "name": "f", "mime": "x/y", "size": 1}]

        ws_url = f"{self.server.url}/{ROOM}?token={token()}&ext=ack"
        anyio.run(write_acked, ws_url, self.doc, append)

    def get(self, sha: str) -> bytes:
        response = httpx.get(self.url(sha, token("reader")), timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"{self.name}: download refused: {response.text}")
        return response.content


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def anchor_write(directory: Path, data: bytes) -> None:
    """The least an upload costs: hash the bytes, write them to a file, fsync."""
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=directory) as file:
        for at in range(0, len(data), MIB):
            chunk = data[at : at + MIB]
            digest.update(chunk)
            file.write(chunk)
        file.flush()
        os.fsync(file.fileno())


def wait_until(condition: Callable[[], bool], timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stalled_uploads(target: Target, size: int) -> float:
    """RSS growth (bytes) of a fresh relay while six uploads stall after `size` bytes."""
    base = target.rss()
    blob = os.urandom(size)
    with ExitStack() as stack:
        for i in range(STALLS):
            tok = mint_token(SECRET, ROOM, "writer", f"stall-{i}", 3600)
            sock = stack.enter_context(socket.create_connection(_address(target), timeout=120))
            head = f"PUT {target.path('b' * 64, tok)} HTTP/1.1\r\nHost: x\r\n"
            sock.sendall(f"{head}Content-Length: {size + 1}\r\n\r\n".encode() + blob)
        # The relay has read them when its temporary files or its memory say so.
        temp = target.server.log_path.parent / "data" / "blobs" / "tmp"

        def arrived() -> bool:
            on_disk = sum(f.stat().st_size for f in temp.iterdir()) if temp.exists() else 0
            return on_disk >= STALLS * size or target.rss() - base >= STALLS * size * 0.9

        if not wait_until(arrived):
            raise RuntimeError(f"{target.name}: the stalled uploads did not arrive")
        return target.rss() - base


def stalled_downloads(target: Target, size: int) -> float:
    """RSS growth (bytes) while six downloads of a `size` blob read nothing after the head."""
    sha = target.put(os.urandom(size))
    target.reference(sha)
    base = target.rss()
    with ExitStack() as stack:
        for _ in range(STALLS):
            sock = stack.enter_context(socket.create_connection(_address(target), timeout=120))
            request = f"GET {target.path(sha, token('reader'))} HTTP/1.1\r\nHost: x\r\n\r\n"
            sock.sendall(request.encode())
            if not sock.recv(12).startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{target.name}: stalled download refused")
        # No event says "the relay holds all it will": give it a second to fill its buffers.
        time.sleep(1.0)
        return target.rss() - base


def _address(target: Target) -> tuple[str, int]:
    host, port = target.http.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", type=Path, help="a checkout of an earlier relay")
    parser.add_argument("--size", type=int, default=64, help="MiB uploaded and downloaded")
    parser.add_argument("--stalled", type=int, default=8, help="MiB each stalled transfer holds")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = args.size * MIB
    stalled = args.stalled * MIB
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    rows: list[tuple[str, float, float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        extra = ["--max-blob", str(max(size, stalled) + MIB)]
        targets: list[Target] = []
        sources: list[tuple[str, Path | None, bool]] = [("this tree", None, True)]
        if args.old_src is not None:
            sources.insert(0, (f"old ({args.old_src.name})", args.old_src.resolve(), False))
        for index, (name, src, scoped) in enumerate(sources):
            (Path(tmp) / f"r{index}").mkdir()
            data = Path(tmp) / f"r{index}" / "data"
            kwargs = {} if src is None else {"src": src}
            extra_args = extra + (["--blob-stall-timeout", "600"] if scoped else [])
            server = stack.enter_context(running_relay(data, extra_args, **kwargs))
            targets.append(Target(name, server, scoped))
        memory = {t.name: stalled_uploads(t, stalled) for t in targets}
        memory_down = {t.name: stalled_downloads(t, stalled) for t in targets}
        uploads: dict[str, list[float]] = {t.name: [] for t in targets}
        downloads: dict[str, list[float]] = {t.name: [] for t in targets}
        anchors: list[float] = []
        for _ in range(args.repeats):
            for target in targets:  # interleaved, so that load changes hit every column
                blob = os.urandom(size)
                anchors.append(timed(lambda b=blob: anchor_write(Path(tmp), b)))
                sha = ""

                def upload(t: Target = target, b: bytes = blob) -> None:
                    nonlocal sha
                    sha = t.put(b)

                uploads[target.name].append(timed(upload))
                target.reference(sha)
                got: list[bytes] = []

                def download(t: Target = target, s: str = sha, into: list[bytes] = got) -> None:
                    into.append(t.get(s))

                downloads[target.name].append(timed(download))
                assert got[0] == blob
        anchor = statistics.median(anchors)
        for target in targets:
            rows.append(
                (
                    target.name,
                    statistics.median(uploads[target.name]),
                    statistics.median(downloads[target.name]),
                    anchor,
                    memory[target.name],
                    memory_down[target.name],
                )
            )
    print(f"{args.size} MiB blob, median of {args.repeats}; anchor (sha256 + write + fsync here)")
    print(f"{STALLS} stalled transfers of {args.stalled} MiB each ({STALLS * args.stalled} MiB)")
    print()
    print(
        "| relay | upload s | × anchor | download s | × anchor | RSS growth, stalled uploads "
        "| RSS growth, stalled downloads |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, up, down, anch, grow_up, grow_down in rows:
        print(
            f"| {name} | {up:.2f} | {up / anch:.2f} | {down:.2f} | {down / anch:.2f} "
            f"| {grow_up / MIB:.0f} MiB | {grow_down / MIB:.0f} MiB |"
        )
    if len(rows) == 2:
        old, new = rows
        print()
        print(f"new / old: upload {new[1] / old[1]:.2f}, download {new[2] / old[2]:.2f}")


if __name__ == "__main__":
    main()
