"""A page of a local web UI as a PNG, once its scripts have drawn it: headless Chromium driven over
the DevTools protocol (a plain --screenshot fires before a single-page app has fetched its data).
Optionally types a filter into the page's first search box, closes a side panel and scrolls to a
heading.

    python examples/trackers/screenshot.py URL OUT.png [--search TEXT] [--scroll-to TEXT] [--wait SECONDS]
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import tempfile
import time
import urllib.request
from itertools import count
from typing import Any

from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars", "--window-size=1400,900"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--search", default=None)
    parser.add_argument("--scroll-to", default=None, help="the text of an element to scroll to the top")
    parser.add_argument("--wait", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=9333)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(["chromium", *FLAGS, f"--user-data-dir={profile}",
                                    f"--remote-debugging-port={args.port}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            page = _page(args.port)
            with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                ids = count(1)

                def call(method: str, **params: Any) -> dict[str, Any]:
                    n = next(ids)
                    ws.send(json.dumps({"id": n, "method": method, "params": params}))
                    while True:
                        reply = json.loads(ws.recv())
                        if reply.get("id") == n:
                            return reply.get("result", {})

                call("Page.enable")
                call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
                call("Page.navigate", url=args.url)
                # drawn: the page's search box is there (a loaded machine may take a minute), then its charts load
                deadline = time.monotonic() + 4 * args.wait
                while time.monotonic() < deadline and not call("Runtime.evaluate", returnByValue=True, expression=(
                        "!!document.querySelector('input[type=search], input[placeholder*=earch]')")).get(
                        "result", {}).get("value"):
                    time.sleep(1)
                time.sleep(args.wait / 2)
                if args.search:
                    call("Runtime.evaluate", expression="document.querySelector('input[type=search], "
                                                        "input[placeholder*=earch]').focus()")
                    call("Input.insertText", text=args.search)
                # a side panel (MLflow's assistant) takes a third of the page: closed by its close button
                call("Runtime.evaluate", expression="[...document.querySelectorAll('aside button, [role=complementary] "
                                                    "button, button[aria-label*=lose]')].slice(-1).forEach(b => b.click())")
                time.sleep(args.wait / 4)
                if args.scroll_to:
                    text = json.dumps(args.scroll_to)
                    call("Runtime.evaluate", expression="[...document.querySelectorAll('*')].find(e => "
                                                        f"e.childElementCount == 0 && e.textContent.trim() == {text})"
                                                        "?.scrollIntoView()")
                time.sleep(args.wait / 4)
                shot = call("Page.captureScreenshot", format="png")
                with open(args.out, "wb") as f:
                    f.write(base64.b64decode(shot["data"]))
        finally:
            browser.terminate()
            browser.wait(timeout=30)
    print(f"wrote {args.out}")


def _page(port: int) -> dict[str, Any]:
    """The browser's page target, once its DevTools endpoint answers."""
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("chromium's DevTools endpoint did not answer")


if __name__ == "__main__":
    main()
