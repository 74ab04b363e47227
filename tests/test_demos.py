"""Every script in demos/ runs end to end as its own process and shows what it says it shows.

Each demo checks its own claims and exits 1 with a reason when one fails; this test runs it
as a user would (`python demos/NAME.py`), and checks the exit status, the key lines of what it
printed, and that it left nothing behind in the temporary directory it was given.
Select them with `pytest -m demo`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

DEMOS = REPO / "demos"
JS_DIR = REPO / "tests" / "js"
TIMEOUT = 180  # seconds; each demo takes 5 to 15 s on an idle 2-core machine

pytestmark = pytest.mark.demo

# Lines (or parts of lines) each demo must print, in this order.
EXPECTED: dict[str, list[str]] = {
    "two_devices": [
        "phone is online and sees sam's other devices: laptop",
        "laptop sees the reply streaming: '[turn 1] ",
        "laptop sees the committed answer by worker-1: '[turn 1] You said: What should I pack",
        "phone  sees the laptop's question: 'And if it rains?'",
        "phone  sees the answer: '[turn 2] You said: And if it rains?'",
        "both devices show the same thread:",
    ],
    "offline_merge": [
        "the relay is down",
        "desktop starts offline from its file (1 message), adds 'bread and olives'",
        "tablet starts offline from its file (1 message), adds 'coffee beans'",
        "the relay is back on",
        "desktop starts again from its file: ['Things to buy for the weekend:', 'bread and",
        "tablet starts again from its file: ['Things to buy for the weekend:', 'coffee beans']",
        "desktop: ['Things to buy for the weekend:', ",
        "tablet: ['Things to buy for the weekend:', ",
        "every replica picks the same current thread",
    ],
    "worker_takeover": [
        "was streaming the reply; killed it (SIGKILL) at '[turn 1] You said: Please",
        "lease expired; worker-",
        "committed the reply: '[turn 1] You said: Please explain",
        "exactly one reply: the document holds 2 messages",
    ],
    "provider_switch": [
        "1  openai / responses / gpt-4.1-mini",
        "2  openai / responses / gpt-4.1-mini",
        "switches the conversation to anthropic / claude-sonnet-4-5",
        "3  anthropic / messages / claude-sonnet-4-5",
        "4  anthropic / messages / claude-sonnet-4-5",
        "5  openai / responses / gpt-4.1-mini",
        "turn 1 left a provider_state entry: {'response_id': 'resp_",
        "turn 2 continued from it and sent 5 tokens: the new question only",
        "turn 3 on Anthropic replayed the whole thread as text",
        "turn 4 read",
        "turn 5, back on OpenAI, continued from turn 2's response",
    ],
    "discard_derived": [
        "turn 2: usage entry says",
        "derived entries now: ['provider_state', 'provider_state', 'title', 'usage', 'usage']",
        "discards all derived state; entries left: []",
        "turn 3: usage entry says 44 input tokens, 0 of them from the stored response: 44 sent",
        "right after it turn 3 replayed the whole thread (44 tokens)",
    ],
    "js_client": [
        "jo joins from node with y-websocket's WebsocketProvider",
        "jo (JS) reads  user      by ada: 'What is the capital of Portugal?'",
        "jo (JS) reads  assistant by worker-1: '[turn 1]",
        "ada sees jo online (device 'node') through awareness",
        "ada (Python) sees jo's message: 'hola, what did Ada ask you?'",
        "jo (JS) sees the worker's reply: '[turn 2] You said: hola, what did Ada ask you?'",
    ],
}


def ensure_js_packages() -> None:
    """The JS demo needs node and tests/js/node_modules (what `make js` installs)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    modules = JS_DIR / "node_modules"
    if all((modules / name).is_dir() for name in ("yjs", "y-websocket", "ws")):
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is needed to install tests/js/node_modules (make js)")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stderr}"


def test_every_demo_is_run_here() -> None:
    scripts = {path.stem for path in DEMOS.glob("*.py") if not path.name.startswith("_")}
    assert scripts == set(EXPECTED)
    listed = (DEMOS / "README.md").read_text()
    assert all(f"`{name}.py`" in listed for name in scripts)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_demo_runs_and_shows_what_it_claims(name: str, tmp_path: Path) -> None:
    if name == "js_client":
        ensure_js_packages()
    done = subprocess.run(
        [sys.executable, str(DEMOS / f"{name}.py")],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    report = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report
    assert "FAILED" not in done.stderr and "Traceback" not in done.stderr, report
    lines = done.stdout.splitlines()
    assert lines[-1] == "OK", report
    position = 0
    for wanted in EXPECTED[name]:
        found = next((i for i in range(position, len(lines)) if wanted in lines[i]), None)
        assert found is not None, f"missing, or out of order: {wanted!r}\n{report}"
        position = found + 1
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"
