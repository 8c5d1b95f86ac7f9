"""Open a report in headless Chromium and say what a person would see: for the tests, the bench and the README.

    seen = open_page("report/index.html", screenshot="docs/report.png")
    seen.errors, seen.requests, seen.drawn, seen.first_screen, seen.seconds

Drives Debian's ``chromium`` over the DevTools protocol (a websocket, ``websocket-client``): it loads
the page from ``file://``, records every console error and uncaught exception (``errors``) and every
request for anything but the page itself and ``data:`` URIs (``requests``), waits until each plotly
figure has been drawn (``drawn``: the ids of the figure divs whose plot is done; the report draws the
first screen at once and the figures below the fold when they near the viewport or in idle time, so
waiting is enough) and takes a PNG screenshot. Two times: ``first_screen``, from the navigation to the
first screen shown with its figures (the page's own clock, ``performance.now()``: the frame after its
first-screen figures were drawn), and ``seconds``, from the navigation to every figure drawn (this
side's clock, polled every 50 ms). Each call starts Chromium with a new, empty profile: no page cache or
code cache is kept between calls. WebGL runs on SwiftShader, Chromium's software renderer, so a machine
without a GPU draws the WebGL traces too.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@dataclasses.dataclass
class Seen:
    url: str
    seconds: float  # from navigation to every figure drawn
    first_screen: float | None  # from navigation to the first screen shown, its figures drawn (None: the page does not say)
    first_figures: list[str]  # ids of the figure divs drawn for the first screen
    drawn_by: dict  # figure div id -> why the page drew it: 'screen', 'near' (scrolled close), 'idle' or 'control'
    errors: list[str]
    requests: list[str]
    drawn: list[str]  # ids of the figure divs plotly has drawn
    figures: list[str]  # ids of every figure div on the page
    text: str  # the page's visible text
    screenshot: Path | None
    values: list  # what each of ``evaluate``'s expressions gave, once every figure was drawn


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class _Session:
    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")


def open_page(path: str | os.PathLike, *, screenshot: str | os.PathLike | None = None, width: int = 1400, height: int = 1000,
              timeout: float = 60.0, browser: str | None = None, evaluate: list[str] = (), scroll: bool = False,
              before: str | None = None) -> Seen:
    """Load ``path`` in headless Chromium; raise RuntimeError if no browser is installed or it does not start.

    ``evaluate``: JavaScript expressions run in the page once it is drawn (before the screenshot); one that
    gives a Promise is awaited. ``scroll``: while waiting, scroll the first figure not yet drawn into view,
    as a reader would (then back to the top). ``before``: a script run in the page before its own."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)}): apt-get install chromium")
    url = Path(path).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="mimetic-chromium-")
    process = subprocess.Popen(
        [browser, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run",
         "--no-default-browser-check", "--no-sandbox", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        session = _Session(_page_socket(Path(profile), process, timeout))
        for domain in ("Runtime", "Log", "Network", "Page"):
            session.call(f"{domain}.enable")
        session.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        if before:
            session.call("Page.addScriptToEvaluateOnNewDocument", source=before)
        started = time.perf_counter()
        session.call("Page.navigate", url=url)
        state = {"all": [], "drawn": [], "by": {}, "first": None, "firstFigures": ""}
        deadline = started + timeout
        while time.perf_counter() < deadline:
            polled = session.evaluate(
                "document.readyState === 'complete' ? JSON.stringify({all: [...document.querySelectorAll('.figure')].map(d => d.id),"
                " drawn: [...document.querySelectorAll('.figure[data-drawn]')].map(d => d.id),"
                " by: Object.fromEntries([...document.querySelectorAll('.figure[data-drawn]')].map(d => [d.id, d.dataset.drawnBy])),"
                " first: document.body.dataset.firstScreen || null, firstFigures: document.body.dataset.firstScreenFigures || ''}) : null")
            if polled:
                state = json.loads(polled)
                if len(state["drawn"]) == len(state["all"]):  # every figure div drawn (a page without figures too)
                    break
                if scroll and state["first"]:
                    session.evaluate("document.querySelector('.figure:not([data-drawn])').scrollIntoView()")
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        if scroll:
            session.evaluate("window.scrollTo(0, 0)")
        figures, drawn = state["all"], state["drawn"]
        first_screen = int(state["first"]) / 1000 if state["first"] else None
        values = [session.evaluate(expression) for expression in evaluate]
        text = session.evaluate("document.body.innerText") or ""
        shot = None
        if screenshot is not None:
            image = session.call("Page.captureScreenshot", format="png")["data"]
            shot = Path(screenshot)
            shot.parent.mkdir(parents=True, exist_ok=True)
            shot.write_bytes(base64.b64decode(image))
        session.evaluate("1")  # collect the events that arrived meanwhile
        errors, requests = _problems(session.events, url)
        try:
            session.call("Browser.close")
        except Exception:  # it may close the socket before it answers
            pass
        return Seen(url, seconds, first_screen, state["firstFigures"].split(), state["by"], errors, requests, drawn, figures, text,
                    shot, values)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _page_socket(profile: Path, process: subprocess.Popen, timeout: float) -> str:
    """The websocket of the browser's first page, once Chromium has written its DevTools port."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Chromium exited at start (status {process.returncode})")
        if port_file.is_file() and port_file.read_text().strip():
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                pages = [t for t in json.loads(answer.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    raise RuntimeError(f"Chromium did not start within {timeout:.0f} s")


def _problems(events: list[dict], url: str) -> tuple[list[str], list[str]]:
    errors, requests = [], []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            requested = params.get("request", {}).get("url", "")
            if requested != url and not requested.startswith(("data:", "about:")):
                requests.append(requested)
    return errors, requests
