"""The web client's built files, shipped inside the package (design §6, "Web client").

The sources live in `web/` at the top of the repository and are bundled from npm by
`web/build.mjs` into `crdtchat/web/static/`, so a pip install needs no node. The build records
the hash of its inputs; `source_hash` computes the same hash from a source tree, and a test
compares the two, since file times say nothing after a clone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
BUILD_INPUTS = ("build.mjs", "package.json", "package-lock.json")
BUILD_DIRS = ("src", "public")


def source_hash(web_dir: Path) -> str:
    """sha256 over "path NUL sha256(content) LF" of each build input, sorted by path.

    The same definition as `sourceHash` in web/build.mjs: the two must agree byte for byte.
    """
    paths = [web_dir / name for name in BUILD_INPUTS]
    for name in BUILD_DIRS:
        paths.extend(p for p in (web_dir / name).rglob("*") if p.is_file())
    lines = sorted(
        f"{path.relative_to(web_dir).as_posix()}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n"
        for path in paths
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def recorded_hash() -> str:
    """The source hash the shipped bundle was built from (build.json)."""
    return json.loads((STATIC / "build.json").read_text())["source_hash"]
