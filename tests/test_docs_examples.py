"""The Python examples of the docs run, so the docs cannot drift from the code.

Every ```python block of a listed document runs, in order, in one namespace (later blocks use
what earlier ones defined), as a reader would paste them. A block that is illustration rather
than a program belongs in another fence (```text, ```sh) or in a document not listed here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import REPO

DOCS = REPO / "docs"
RUN = ["api.md"]

_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block of `path`."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def test_blocks_are_found() -> None:
    """The extraction itself works: it would otherwise pass by running nothing."""
    blocks = python_blocks(DOCS / "api.md")
    assert len(blocks) >= 5
    assert all(source.strip() and "```" not in source for _, source in blocks)


@pytest.mark.parametrize("name", RUN)
def test_the_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    namespace: dict[str, object] = {"__name__": f"docs_{name.removesuffix('.md')}"}
    for line, source in python_blocks(DOCS / name):
        # Padding the source keeps tracebacks pointing at the line in the document.
        code = compile("\n" * (line - 1) + source, str(DOCS / name), "exec")
        exec(code, namespace)
