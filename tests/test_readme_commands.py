"""The README's two set-up commands, `make demo` and `make test`, work on a fresh checkout.

The tracked files are copied into an empty directory (no `.venv`, no `node_modules`), and
there: `make -n test` must show that it creates the environment, installs the npm packages,
lints and runs pytest; `make install` must build a fresh `.venv` (pip reuses the machine's
wheel cache, so the local model's bindings are not compiled again); `echo hello | make demo`
must start the relay and the local-model worker and print the reply; `make lint` must pass.
`make test` itself is not run here: it would run this suite inside itself.

Slow (minutes): runs only with CRDTCHAT_README_TEST=1, which CI sets.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import REPO

ENABLED = os.environ.get("CRDTCHAT_README_TEST") == "1"


def copy_tracked_files(destination: Path) -> None:
    """What a fresh clone holds: the tracked files, as they are in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not source.is_file():  # deleted in the working tree, not yet committed
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def clean_env(**more: str) -> dict[str, str]:
    """This environment minus any sign of the repository's own virtual environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    own_venv = str(REPO / ".venv")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(own_venv)]
    env["PATH"] = os.pathsep.join(path)
    env.update(more)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make(
    checkout: Path, *args: str, timeout: float, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = subprocess.run(
        ["make", *args],
        cwd=checkout,
        env=clean_env(**env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    took = time.monotonic() - started
    print(f"make {' '.join(args)}: exit {done.returncode} in {took:.0f} s")
    return done


def report(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr}"


def test_the_readme_names_make_demo_and_make_test() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert "make demo" in commands and "make test" in commands


@pytest.mark.slow
@pytest.mark.skipif(not ENABLED, reason="set CRDTCHAT_README_TEST=1 (slow: a fresh install)")
@pytest.mark.timeout(1800)
def test_readme_commands_work_on_a_fresh_checkout(tmp_path: Path) -> None:
    checkout = tmp_path / "crdtchat"
    copy_tracked_files(checkout)
    assert not (checkout / ".venv").exists()

    plan = make(checkout, "-n", "test", timeout=60)
    assert plan.returncode == 0, report(plan)
    for step in ("-m venv .venv", "pip install", "npm ci", "ruff check", ".venv/bin/pytest"):
        assert step in plan.stdout, f"`make -n test` does not show {step!r}\n{report(plan)}"

    install = make(checkout, "install", timeout=1500)
    assert install.returncode == 0, report(install)
    assert (checkout / ".venv" / "bin" / "crdtchat").exists()

    data = tmp_path / "demo-data"
    demo = make(
        checkout,
        "demo",
        timeout=600,
        stdin="hello\n",
        CRDTCHAT_DEMO_DATA=str(data),
        CRDTCHAT_DEMO_PORT=str(free_port()),
    )
    assert demo.returncode == 0, report(demo)
    assert "you> hello" in demo.stdout, report(demo)
    replies = [line for line in demo.stdout.splitlines() if line.startswith("assistant>")]
    assert replies and replies[0].removeprefix("assistant>").strip(), report(demo)
    assert (data / "relay").is_dir(), "the demo's relay stored nothing where it was told to"

    lint = make(checkout, "lint", timeout=300)
    assert lint.returncode == 0, report(lint)
