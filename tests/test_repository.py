"""The repository stands on its own: nothing tracked refers to a path outside it.

A clone holds only the tracked files, so a link or a "see" that points beside the checkout
(the old contract file next to it) is a dead reference for everyone else; the design lives in
docs/design.md, and code and docs cite it as "design §N", a section that must exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

# Spelled in pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared/" + "DESIGN")
# How the outside contract used to be cited; the design is cited as "design §N" now.
CONTRACT_CITATIONS = ("DESIGN" + " §", "DESIGN" + ".md")
TEXT_SUFFIXES = {".py", ".md", ".mjs", ".js", ".toml", ".txt", ""}


def tracked_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [REPO / name for name in listed.split("\0") if name]


def test_no_tracked_file_refers_outside_the_repository() -> None:
    files = tracked_files()
    assert any(path.name == "README.md" for path in files)  # the listing found the tree
    found = []
    for path in files:
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(outside in line for outside in (*OUTSIDE, *CONTRACT_CITATIONS)):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "references outside the repository:\n" + "\n".join(found)


def design_sections() -> set[str]:
    """The numbers of the sections of docs/design.md: "2", "7", "7.4", ..."""
    text = (REPO / "docs" / "design.md").read_text()
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", text, flags=re.MULTILINE))


def test_design_references_name_sections_that_exist() -> None:
    """Code and docs cite docs/design.md as "design §N"; N must be a section of it."""
    sections = design_sections()
    assert {"1", "2", "3", "4", "5", "6", "7"} <= sections
    dangling = []
    for path in tracked_files():
        if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
            continue
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for cited in re.findall(r"design §(\d+(?:\.\d+)*)", line):
                if cited not in sections:
                    dangling.append(f"{path.relative_to(REPO)}:{number}: §{cited}")
    assert not dangling, "references to sections docs/design.md does not have:\n" + "\n".join(
        dangling
    )


def test_the_relay_is_part_of_the_package_and_no_top_level_server_is_installed(
    tmp_path: Path,
) -> None:
    """The relay's code is `crdtchat.relay`; `server/` holds deployment files only (design, layout).

    Run from an empty directory, so the checkout's own `server/` folder is not on `sys.path`:
    what is importable there is what the installed distribution provides.
    """
    assert not list((REPO / "server").rglob("*.py")), "server/ must hold no Python code"
    probe = (
        "import importlib.util, crdtchat.relay.main, crdtchat.relay.room\n"
        "print(importlib.util.find_spec('server'))\n"
        "print(crdtchat.relay.room.__file__)\n"
    )
    # Without PYTHONPATH: a worktree's own checkout on it would put its `server/` folder there.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    spec, room_file = result.stdout.splitlines()
    assert spec == "None", f"a top-level `server` module is importable: {spec}"
    assert Path(room_file).parts[-3:] == ("crdtchat", "relay", "room.py")
