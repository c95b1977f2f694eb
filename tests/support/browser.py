"""Real headless Chromium for the page tests, driven by Playwright's Python package.

Playwright launches the system Chromium (``executable_path``: no browser download) and sees
every network request a page makes, every script error and console error, and takes a
screenshot; a script run before the page's own records alerts and Content-Security-Policy
violations. Tests using it skip only where Chromium or Playwright is missing (scripts/check.sh
installs Debian's Chromium and the ``dev`` extra); ``TL_DECOMP_REQUIRE_BROWSER=1`` makes a
missing one a failure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

EVIL = "<img src=x onerror=alert(1)>"
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
REQUIRED = os.environ.get("TL_DECOMP_REQUIRE_BROWSER") == "1"
browser = pytest.mark.browser
# scripts/check.sh installs Chromium and sets TL_DECOMP_REQUIRE_BROWSER=1: there, no skip
# (Chromium() then fails, naming what is missing).
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and PLAYWRIGHT) and not REQUIRED,
    reason="needs Chromium and Playwright (Debian: apt-get install chromium; "
    "pip install -e '.[dev]'; scripts/check.sh installs both)",
)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
# Runs before any script of the page: records alerts, CSP violations and script errors.
PROBE = """window.__alerts = []; window.__csp = []; window.__errors = [];
window.alert = (m) => window.__alerts.push(String(m));
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));"""


class Chromium:
    """One headless system Chromium with one page (1280 x 900), the probe installed, and
    every request, page error and console error recorded."""

    def __init__(self) -> None:
        assert CHROMIUM is not None, "no chromium on PATH (TL_DECOMP_REQUIRE_BROWSER=1)"
        assert PLAYWRIGHT, "no playwright (pip install -e '.[dev]'; TL_DECOMP_REQUIRE_BROWSER=1)"
        from playwright.sync_api import sync_playwright

        self._driver = sync_playwright().start()
        try:
            self._browser = self._driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception:
            self._driver.stop()
            raise
        self.page = self._browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.add_init_script(PROBE)
        self.requests: list[str] = []
        self.problems: list[str] = []  # uncaught exceptions and console errors
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.problems.append(f"pageerror: {e}"[:300]))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text}"[:300])

    def open(self, path: Path, timeout: float = 30) -> None:
        self.page.goto(path.resolve().as_uri(), wait_until="load", timeout=timeout * 1000)

    def js(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def close(self) -> None:
        try:
            self._browser.close()
        finally:
            self._driver.stop()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Loaded:
    requests: list[str]
    dom: dict
    png: bytes
    text: str
    problems: list[str]  # exceptions, console errors, CSP violations
    seconds: float  # from navigation until every component was drawn
    clipped: list[str]  # selector labels cut by their box (CLIPPED_PROBE)


# What each component must have put in the DOM once React has committed it.
DOM_PROBE = """(() => {
  const cv = [...document.querySelectorAll("div.cv")];
  return {
    components: cv.map((d) => ({
      name: d.dataset.component, mounted: d.dataset.mounted === "1",
      canvases: d.querySelectorAll("canvas").length,
      drawn: [...d.querySelectorAll("canvas")].filter((c) => c.width > 0).length,
      spans: d.querySelectorAll("span").length, text: d.innerText,
      buttons: [...d.querySelectorAll("button")].map((b) => b.innerText) })),
    props: JSON.parse(document.getElementById("tl-decomp-props").textContent).length,
    imgs: document.images.length, scripts: document.scripts.length,
    alerts: window.__alerts, csp: window.__csp, errors: window.__errors,
    svgs: document.querySelectorAll("figure svg").length };
})()"""


# Once drawn: the names on the AttentionHeads selector's thumbnails (circuitsvis 1.43, pinned,
# writes each as an <h4> over the thumbnail's canvas) wider than their thumbnail, which the
# next one then covers: "L23 L23 …" for "L23H0 L23H1".
CLIPPED_PROBE = """(() => {
  const cut = (e) => {
    const r = e.getBoundingClientRect(), box = e.parentElement.getBoundingClientRect();
    return e.scrollWidth > e.clientWidth + 1 || r.left < box.left - 1 || r.right > box.right + 1;
  };
  return [...document.querySelectorAll('div.cv[data-component="AttentionHeads"] *')]
    .filter((e) => e.tagName === "H4" && e.parentElement.querySelector("canvas") && cut(e))
    .map((e) => e.innerText.trim());
})()"""


def _ready(dom: dict) -> bool:
    return all(
        c["mounted"] and (c["drawn"] > 1 if c["name"] == "AttentionHeads" else c["spans"] > 0)
        for c in dom["components"]
    )


def load(path: Path, timeout: float = 30) -> Loaded:
    """Open `path` in a fresh Chromium, wait until every component is drawn, screenshot."""
    with Chromium() as chrome:
        start = time.perf_counter()
        chrome.open(path, timeout)
        end = time.monotonic() + timeout
        while not _ready(dom := chrome.js(DOM_PROBE)) and time.monotonic() < end:
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        clipped = chrome.js(CLIPPED_PROBE)
        # A viewport as tall as the page, so the capture needs no resize: chart.js redraws
        # its canvases after every resize, and a capture mid-redraw shows them blank.
        height = chrome.js("document.documentElement.scrollHeight")
        chrome.page.set_viewport_size({"width": 1280, "height": int(height)})
        time.sleep(1.0)
        png = chrome.page.screenshot(timeout=timeout * 1000)
        text = chrome.js("document.body.innerText")
        problems = chrome.problems + dom["errors"] + dom["csp"]
        return Loaded(chrome.requests, dom, png, text, problems, seconds, clipped)


def save_screenshot(png: bytes, name: str) -> None:
    """Keep a copy where TL_DECOMP_SCREENSHOTS points (to look at by eye)."""
    folder = os.environ.get("TL_DECOMP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(png)


def assert_page_ok(page: Loaded, path: Path, plots: int = 3) -> None:
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
    assert page.dom["svgs"] >= plots  # the matplotlib plots


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
