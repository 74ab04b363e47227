"""Opening a 10,000-message conversation in the web client (Chromium), from the relay and again
from IndexedDB: time until the latest messages are on screen, and the page's JS heap.

Anchor, in the same run: the Python client opening the same document (`Conversation.from_update`
of its state) and reading the end of the current thread it would draw (the last 60 messages);
the browser figures are reported as ratios to it. Three figures per open: the wall time from
`page.goto` until the last message is on the page (polled every animation frame); the CPU time
of the page's main thread meanwhile (Chromium's `ThreadTime` metric, which a loaded machine
hardly changes, unlike the wall time); and the page's own `crdtchat:latest-drawn` mark (time
since navigation start at which the latest message was laid out). From the relay, the page's
marks split it into: connecting, the relay's state received, applied, drawn. The relay is
restarted before each open from it, so that each finds the room unloaded: what a person
opening a conversation nobody had open meets (`benchmarks/relay_cold_open.py` times the
relay's part alone).

Scrolling back: the thread is a virtual list; the page is scrolled up one screen at a time
from the end to the first message, and each draw (DOM and layout) is timed; the number of
message nodes in the DOM is recorded at the top.

Run: .venv/bin/python benchmarks/browser_open.py [--messages 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
from playwright.sync_api import CDPSession, Page, expect, sync_playwright

from benchmarks._support import long_chat
from crdtchat.document import Conversation
from crdtchat.replica import Replica
from crdtchat.stack import RelaySubprocess
from tests.support import REPO
from tests.support.browser import CHROMIUM, FLAGS
from tests.support.relay import SECRET, token

ROOM = "bench-open"


async def upload(url: str, state: bytes) -> None:
    conversation = Conversation.from_update(state, author="alice")
    async with Replica(url, ROOM, token(ROOM, "writer", "alice"), doc=conversation.doc) as r:
        await r.wait_until(lambda status: status.durable, timeout=300)


def anchor(state: bytes) -> float:
    start = time.perf_counter()
    conversation = Conversation.from_update(state, author="alice")
    last = conversation.view.last()
    assert last is not None
    tail = conversation.thread(last.id)[-60:]
    assert tail[-1].content.startswith("message")
    return time.perf_counter() - start


MARKS = """() => Object.fromEntries(performance.getEntriesByType('mark')
  .filter((m) => m.name.startsWith('crdtchat:')).map((m) => [m.name, m.startTime]))"""

# Scroll up one screen, wait for the virtual list's draw, and collect each draw's duration,
# until the first message is drawn.
SCROLL_BACK = """async () => {
  const page = window.crdtchat
  const view = page.view
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()))
  const times = []
  for (let step = 0; step < 100000 && view.range[0] > 0; step++) {
    const draws = view.draws
    page.scroller.scrollTop -= page.scroller.clientHeight
    for (let k = 0; k < 10 && view.draws === draws; k++) await frame()
    if (view.draws !== draws) times.push(view.drawMs)
  }
  return { times, nodes: page.list.querySelectorAll('article').length, first: view.range[0] }
}"""


# True once the last article on the page shows `text`; polled every animation frame, so the
# wall time is not rounded up to Playwright's `expect` polling intervals (100 ms to 1 s).
SHOWN = """(text) => {
  const articles = document.querySelectorAll('article')
  return articles.length > 0 && articles[articles.length - 1].textContent.includes(text)
}"""


def open_until_shown(
    page: Page, cdp: CDPSession, action: Callable[[], object], last: str
) -> tuple[float, float]:
    """Seconds from `action` (goto or reload) until the last message is on the page, and the
    CPU seconds the new document's main thread had spent by then (Chromium's `ThreadTime`
    metric, which starts again with each document: CPU time, so it hardly grows when other
    processes load the machine, unlike the wall time)."""
    start = time.perf_counter()
    action()
    page.wait_for_function(SHOWN, arg=last, polling="raf", timeout=120_000)
    return time.perf_counter() - start, thread_time(cdp)


def thread_time(cdp: CDPSession) -> float:
    metrics = cdp.send("Performance.getMetrics")["metrics"]
    return next(m["value"] for m in metrics if m["name"] == "ThreadTime")


def scroll_back(page: Page) -> tuple[list[float], int]:
    """Scroll from the end to the first message; each draw's ms and the nodes at the top."""
    result = page.evaluate(SCROLL_BACK)
    assert result["first"] == 0, result
    expect(page.get_by_role("article").first).to_contain_text("message 0:")
    return result["times"], result["nodes"]


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms" if values else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-scroll", action="store_true", help="only the two opens")
    args = parser.parse_args()
    state = long_chat(args.messages)
    last = f"message {args.messages - 1}:"
    relay = RelaySubprocess(Path(tempfile.mkdtemp()) / "data", SECRET, cwd=REPO).start()
    relay_times, idb_times, anchors, heaps = [], [], [], []
    relay_cpu: list[float] = []
    idb_cpu: list[float] = []
    drawn, connecting, received, applied, painted, idb_drawn = [], [], [], [], [], []
    scroll_draws: list[float] = []
    dom_nodes: list[int] = []
    try:
        anyio.run(upload, f"ws://127.0.0.1:{relay.port}", state)
        relay.kill()  # every open from the relay is a cold one: the room is loaded for it
        relay.start()
        link = f"http://127.0.0.1:{relay.port}/c/{ROOM}#token={token(ROOM, 'writer', 'alice')}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
            for _ in range(args.repeats):
                anchors.append(anchor(state))
                context = browser.new_context()
                page = context.new_page()
                cdp = context.new_cdp_session(page)
                cdp.send("Performance.enable")
                wall, cpu = open_until_shown(page, cdp, partial(page.goto, link), last)
                relay_times.append(wall)
                relay_cpu.append(cpu)
                marks = page.evaluate(MARKS)
                if "crdtchat:latest-drawn" in marks:  # pages before the virtual list had no marks
                    drawn.append(marks["crdtchat:latest-drawn"])
                    connecting.append(marks["crdtchat:connecting"])
                    received.append(marks["crdtchat:relay-state-received"])
                    applied.append(
                        marks["crdtchat:relay-state-applied"]
                        - marks["crdtchat:relay-state-received"]
                    )
                    painted.append(
                        marks["crdtchat:latest-drawn"] - marks["crdtchat:relay-state-applied"]
                    )
                page.evaluate("navigator.serviceWorker.ready.then(() => true)")
                expect(page.locator(".connection")).to_have_text("online, all stored")
                heaps.append(page.evaluate("performance.memory.usedJSHeapSize") / 2**20)
                relay.kill()  # from IndexedDB alone now
                wall, cpu = open_until_shown(page, cdp, page.reload, last)
                idb_times.append(wall)
                idb_cpu.append(cpu)
                marks = page.evaluate(MARKS)
                if "crdtchat:latest-drawn" in marks:
                    idb_drawn.append(marks["crdtchat:latest-drawn"])
                if not args.no_scroll and page.evaluate("Boolean(window.crdtchat.view)"):
                    draws, nodes = scroll_back(page)
                    scroll_draws.extend(draws)
                    dom_nodes.append(nodes)
                context.close()
                relay.start()
            browser.close()
    finally:
        relay.stop()
    a = statistics.median(anchors)
    r = statistics.median(relay_times)
    i = statistics.median(idb_times)
    print(f"{args.messages} messages, {args.repeats} repeats (medians)")
    print(f"anchor: Python opens the document and reads the last 60: {a * 1000:.0f} ms")
    print(
        f"browser, from the relay: latest on screen in {r * 1000:.0f} ms wall "
        f"({r / a:.1f}x anchor); page mark {median_ms(drawn)}"
    )
    print(
        f"  of which: connecting at {median_ms(connecting)}, "
        f"relay's state received at {median_ms(received)}, "
        f"applied in {median_ms(applied)}, drawn {median_ms(painted)} later"
    )
    print(
        f"browser, from IndexedDB: latest on screen in {i * 1000:.0f} ms wall "
        f"({i / a:.1f}x anchor); page mark {median_ms(idb_drawn)}"
    )
    cpu_relay, cpu_idb = statistics.median(relay_cpu), statistics.median(idb_cpu)
    print(
        f"page main-thread CPU until shown: from the relay {cpu_relay * 1000:.0f} ms, "
        f"from IndexedDB {cpu_idb * 1000:.0f} ms"
    )
    print(f"JS heap after opening: {statistics.median(heaps):.0f} MiB")
    if scroll_draws:
        scroll_draws.sort()
        p95 = scroll_draws[int(0.95 * (len(scroll_draws) - 1))]
        print(
            f"scrolling back a screen at a time to the first message: {len(scroll_draws)} "
            f"draws, median {statistics.median(scroll_draws):.1f} ms, p95 {p95:.1f} ms, "
            f"max {scroll_draws[-1]:.1f} ms; message nodes in the DOM at the top: "
            f"{max(dom_nodes)}"
        )


if __name__ == "__main__":
    main()
