"""Real headless Chromium for the page tests, over the DevTools protocol on a pipe
(``--remote-debugging-pipe``), with no Python driver: every network request a page makes,
every script error and every Content-Security-Policy violation is seen, and a screenshot
taken. Tests using it skip only where no Chromium is installed (scripts/check.sh installs
Debian's; ``TL_DECOMP_REQUIRE_BROWSER=1`` makes a missing one a failure)."""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

EVIL = "<img src=x onerror=alert(1)>"
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
browser = pytest.mark.browser
# scripts/check.sh installs Chromium and sets TL_DECOMP_REQUIRE_BROWSER=1: there, no skip.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("TL_DECOMP_REQUIRE_BROWSER") != "1",
    reason="needs Chromium (Debian: apt-get install chromium; scripts/check.sh installs it)",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
    "--remote-debugging-pipe",
]
# Runs before any script of the page: records alerts, CSP violations and script errors.
PROBE = """window.__alerts = []; window.__csp = []; window.__errors = [];
window.alert = (m) => window.__alerts.push(String(m));
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));"""


class Chromium:
    """Headless Chromium over the DevTools protocol: JSON messages ending in NUL, fds 3/4."""

    def __init__(self) -> None:
        assert CHROMIUM is not None, "no chromium on PATH (TL_DECOMP_REQUIRE_BROWSER=1)"
        self.profile = tempfile.mkdtemp(prefix="tl_decomp_chromium_")
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()

        def child() -> None:  # the protocol's fixed descriptors: 3 = commands, 4 = replies
            a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, res_w))
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=child,
            close_fds=False,  # close_fds would shut 3 and 4 after preexec_fn
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        self.buf, self.next_id, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable", self.session)
        self.send("Page.addScriptToEvaluateOnNewDocument", self.session, source=PROBE)

    def _message(self, timeout: float) -> dict:
        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.res_r], [], [], max(timeout, 0))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.res_r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params):
        self.next_id += 1
        msg: dict = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while True:
            m = self._message(end - time.monotonic())
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        end = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._message(end - time.monotonic()))
        return next(e for e in self.events if e.get("method") == method)

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"])
        return res["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
            self.proc.wait(10)
        except (OSError, RuntimeError, TimeoutError, EOFError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.res_r)
        shutil.rmtree(self.profile, ignore_errors=True)


@dataclasses.dataclass
class Loaded:
    requests: list[str]
    dom: dict
    png: bytes
    text: str
    problems: list[str]  # exceptions, console errors, CSP violations


# What each component must have put in the DOM once React has committed it.
DOM_PROBE = """(() => {
  const cv = [...document.querySelectorAll("div.cv")];
  return {
    components: cv.map((d) => ({
      name: d.dataset.component, mounted: d.dataset.mounted === "1",
      canvases: d.querySelectorAll("canvas").length,
      drawn: [...d.querySelectorAll("canvas")].filter((c) => c.width > 0).length,
      spans: d.querySelectorAll("span").length, text: d.innerText })),
    props: JSON.parse(document.getElementById("tl-decomp-props").textContent).length,
    imgs: document.images.length, scripts: document.scripts.length,
    alerts: window.__alerts, csp: window.__csp, errors: window.__errors,
    svgs: document.querySelectorAll("figure svg").length };
})()"""


def _ready(dom: dict) -> bool:
    return all(
        c["mounted"] and (c["drawn"] > 1 if c["name"] == "AttentionHeads" else c["spans"] > 0)
        for c in dom["components"]
    )


def load(path: Path, timeout: float = 30) -> Loaded:
    """Open `path` in a fresh Chromium, wait until every component is drawn, screenshot."""
    chrome = Chromium()
    try:
        chrome.send("Page.navigate", chrome.session, url=path.resolve().as_uri())
        chrome.wait_for("Page.loadEventFired", timeout)
        end = time.monotonic() + timeout
        while not _ready(dom := chrome.js(DOM_PROBE)) and time.monotonic() < end:
            time.sleep(0.2)
        # A viewport as tall as the page, so the capture needs no resize: chart.js redraws
        # its canvases after every resize, and a capture mid-redraw shows them blank.
        height = chrome.send("Page.getLayoutMetrics", chrome.session)["cssContentSize"]["height"]
        chrome.send("Emulation.setDeviceMetricsOverride", chrome.session, width=1280,
                    height=int(height), deviceScaleFactor=1, mobile=False)  # fmt: skip
        time.sleep(1.0)
        shot = chrome.send("Page.captureScreenshot", chrome.session, format="png")
        text = chrome.js("document.body.innerText")
    finally:
        chrome.close()
    requests = [
        e["params"]["request"]["url"]
        for e in chrome.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    problems = [
        json.dumps(e["params"])[:300]
        for e in chrome.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    problems += dom["errors"] + dom["csp"]
    return Loaded(requests, dom, base64.b64decode(shot["data"]), text, problems)


def save_screenshot(png: bytes, name: str) -> None:
    """Keep a copy where TL_DECOMP_SCREENSHOTS points (to look at by eye)."""
    folder = os.environ.get("TL_DECOMP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(png)


def assert_page_ok(page: Loaded, path: Path) -> None:
    assert page.requests == [path.resolve().as_uri()], "the page asked for more than itself"
    assert page.problems == []
    comps = page.dom["components"]
    assert len(comps) == page.dom["props"] > 0
    for c in comps:
        assert c["mounted"], c["name"]
        if c["name"] == "AttentionHeads":  # one thumbnail per head and the zoomed pattern
            assert c["drawn"] == c["canvases"] > 1
        else:
            assert c["spans"] > 0 and c["text"].strip()
    assert page.dom["scripts"] == 3  # the bundle, the props, the mount: nothing injected
    assert page.dom["imgs"] == 0 and page.dom["alerts"] == []
    assert page.dom["svgs"] >= 3  # the matplotlib plots


def assert_not_blank(png: bytes) -> None:
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    assert im.width == 1280 and im.height > 2000
    small = im.resize((im.width // 4, im.height // 4))
    pixels = list(small.getdata())
    colours = len(set(pixels))
    inked = sum(1 for p in pixels if sum(p) < 600) / len(pixels)
    assert colours > 100, f"only {colours} colours"
    assert inked > 0.03, f"only {inked:.1%} of the page is drawn on"
