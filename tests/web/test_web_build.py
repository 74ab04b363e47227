"""The web client shipped in the package is the one built from the sources in web/.

`crdtchat/web/static` is committed, so a pip user needs no node; these tests make sure it was
built from the current sources and lockfile (the hash web/build.mjs records, recomputed here
from the files' contents: file times mean nothing after a clone), and that it stays small.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from crdtchat.web import STATIC, recorded_hash, source_hash
from tests.support import REPO

WEB = REPO / "web"
BUDGET = 150 * 1024  # gzipped JavaScript, bytes (design §6, Web client)


def test_the_shipped_bundle_was_built_from_the_current_sources() -> None:
    current = source_hash(WEB)
    assert recorded_hash() == current, (
        "crdtchat/web/static was built from other sources: run `make web` and commit the result"
    )
    for name in ("app.js", "sw.js"):
        banner = (STATIC / name).read_text()[:200]
        assert f"crdtchat-web source-hash: {current}" in banner, name


def test_the_hash_covers_the_sources_and_the_lockfile(tmp_path: Path) -> None:
    """A change to any input changes the hash; so a stale bundle cannot pass the test above."""
    copy = tmp_path / "web"
    for path in [*(WEB / n for n in ("build.mjs", "package.json", "package-lock.json"))]:
        (copy / path.relative_to(WEB)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(WEB)).write_bytes(path.read_bytes())
    for folder in ("src", "public"):
        for path in (WEB / folder).rglob("*"):
            if path.is_file():
                (copy / path.relative_to(WEB)).parent.mkdir(parents=True, exist_ok=True)
                (copy / path.relative_to(WEB)).write_bytes(path.read_bytes())
    assert source_hash(copy) == source_hash(WEB)
    lock = copy / "package-lock.json"
    lock.write_text(lock.read_text().replace('"yjs"', '"yjs" ', 1))
    assert source_hash(copy) != source_hash(WEB)
    lock.write_bytes((WEB / "package-lock.json").read_bytes())
    (copy / "src" / "new.js").write_text("export {}\n")
    assert source_hash(copy) != source_hash(WEB)


def test_the_lockfile_pins_the_yjs_client_stack() -> None:
    packages = json.loads((WEB / "package-lock.json").read_text())["packages"]
    for name in ("yjs", "y-websocket", "y-indexeddb", "esbuild", "marked", "dompurify"):
        assert f"node_modules/{name}" in packages, name


def test_the_javascript_is_under_150_kb_gzipped() -> None:
    total = sum(len(gzip.compress((STATIC / n).read_bytes(), 9)) for n in ("app.js", "sw.js"))
    assert total < BUDGET, f"{total} bytes gzipped"


def test_the_page_has_no_inline_script() -> None:
    """The Content-Security-Policy allows none, so the page must not need any."""
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(" src=" in tag for tag in scripts)
    assert not re.search(r"\son[a-z]+=", html)
