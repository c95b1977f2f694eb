"""The report: its content, and the page itself in real headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), with
no Python driver: the test sees every network request the page makes, every script error,
every Content-Security-Policy violation, and takes a screenshot. The browser tests are
skipped only where no Chromium is installed (scripts/check.sh installs Debian's).
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import functools
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support.models import KINDS, cached_model

from tl_decomp import cli
from tl_decomp.reporting import report

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


def _save_screenshot(png: bytes, name: str) -> None:
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


# -- the report's content (no browser) --------------------------------------------------------
SHORT = ["the cat sat on the mat", "a dog ran", "the big dog is on a mat", "a cat and a dog sat",
         "the mat is big", "a dog sat on the cat", "the cat ran and the dog sat"]  # fmt: skip


@functools.cache
def tiny_report(arch: str = "bert", corpus: int = 7):
    with pytest.MonkeyPatch.context() as mp:  # the shipped corpus is too long for tiny models
        mp.setattr("tl_decomp.datasets.load_corpus", lambda n: SHORT[:n])
        return report(
            cached_model(arch), "the cat sat on the mat", corpus_sentences=corpus, progress=False
        )


def test_report_content():
    rep = tiny_report()
    rows = rep.layer_rows()
    assert [r["layer"] for r in rows] == ["0", "1", "2", "3"]  # residual-stream indices
    assert list(rows[1]) == [
        "layer", "i", "h", "f", "c", "rel. error", "identified", "identified (corpus)", "own", "P̃"
    ]  # fmt: skip
    for r in rows:
        assert sum(r[k] for k in "ihfc") == pytest.approx(1.0)
        assert r["rel. error"] < 1e-9
    assert rows[0]["h"] == rows[0]["f"] == 0 and rows[0]["identified"] == 1.0
    assert rep.attribution.layers == (1, 2, 3) and rows[1]["own"] is not None
    assert [r["block"] for r in rep.attention_rows()] == [0, 1, 2]
    summary = rep.summary()
    assert "[CLS] the cat sat on the mat [SEP]" in summary and "P̃" in summary


def test_report_with_corpus_identifiability():
    rep = tiny_report()
    assert rep.corpus_identifiability.mapping == "linear"
    assert len(rep.corpus_identifiability.train) + len(rep.corpus_identifiability.test) == 7
    rows = rep.layer_rows()
    assert [r["identified (corpus)"] for r in rows] == rep.corpus_identifiability.rates.tolist()
    assert 'data-component="ColoredTokens"' in rep.html()


def test_report_decoder_has_final_row():
    rep = tiny_report("gpt2", corpus=0)
    assert rep.layer_rows()[-1]["layer"] == "final"
    assert rep.causal and rep.patterns.shape == rep.effective.shape


class _Tags(HTMLParser):
    """Every start tag the way a browser's tokenizer sees it (script bodies are not markup)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.mark.parametrize("kind", KINDS)
def test_report_on_each_model_class(kind):
    """Llama: grouped-query attention, RMSNorm, rotary; HookedTransformer on TL 3.x."""
    rep = report(cached_model("llama", kind), "the cat sat", progress=False)
    assert rep.tokens == ("[BOS]", "the", "cat", "sat") and rep.causal
    assert rep.patterns.shape == rep.effective.shape == (3, 4, 4, 4)
    assert rep.html().count('class="cv"') == 3 * 3 + 4  # raw, effective, norm-based; the rest


def test_page_is_self_contained():
    page = tiny_report().html()
    assert page.count("var CircuitsVis=") == 1  # one bundle, however many components
    assert "unpkg.com" not in page and "sourceMappingURL" not in page
    parser = _Tags()
    parser.feed(page)
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts == [{}, {"type": "application/json", "id": "tl-decomp-props"}, {}]
    links = [v for _, a in parser.tags for k, v in a.items() if k in ("src", "href", "xlink:href")]
    assert links and all(v.startswith("#") for v in links)  # the SVG glyphs' own references
    csp = next(
        a["content"] for t, a in parser.tags if a.get("http-equiv") == "Content-Security-Policy"
    )
    assert csp.startswith("default-src 'none';")


def test_markup_is_escaped_in_the_source():
    rep = dataclasses.replace(tiny_report(), text=EVIL, model_name=EVIL, tokens=(EVIL,) * 8)
    page = rep.html()
    assert EVIL not in page  # not in the markup, not in the JSON, not in the title
    data = re.search(r'id="tl-decomp-props">(.*?)</script>', page, re.S).group(1)
    assert (
        "<" not in data
        and json.loads(data)[0]["props"]["tokens"][0] == "&lt;img src=x onerror=alert(1)&gt;"
    )


def test_report_arguments():
    model = cached_model("bert")
    with pytest.raises(ValueError, match="empty"):
        report(model, "  ", progress=False)
    with pytest.raises(ValueError, match="it is a directory"):
        report(model, "the cat", Path(tempfile.gettempdir()), progress=False)
    with pytest.raises(ValueError, match="no directory"):
        report(model, "the cat", "/nonexistent/dir/r.html", progress=False)
    with pytest.raises(ValueError, match="limit is 4"):
        report(model, "the cat sat on the mat", max_tokens=4, progress=False)
    with pytest.raises(ValueError, match="attribution_layers=9 is out of range"):
        report(model, "the cat", attribution_layers=[1, 9], progress=False)
    with pytest.raises(ValueError, match="attention_blocks=3 is out of range"):
        report(model, "the cat", attention_blocks=[3], progress=False)


# -- the page in Chromium ---------------------------------------------------------------------
@browser
@needs_chromium
def test_page_in_chromium(tmp_path):
    path = tmp_path / "report.html"
    tiny_report().write(path)  # every kind of component the page has
    page = load(path)
    _save_screenshot(page.png, "tiny_bert.png")
    assert_page_ok(page, path)
    assert_not_blank(page.png)
    assert "the cat sat on the mat" in page.text


@browser
@needs_chromium
def test_markup_in_tokens_runs_nothing(tmp_path):
    tokens = (
        "[CLS]",
        "the",
        EVIL,
        "</script><script>alert(2)</script>",
        "on",
        "&amp;",
        "mat",
        "[SEP]",
    )
    rep = dataclasses.replace(tiny_report(), text=f"the {EVIL} sat", model_name=EVIL, tokens=tokens)
    path = tmp_path / "evil.html"
    rep.write(path)
    page = load(path)
    _save_screenshot(page.png, "markup.png")
    assert_page_ok(page, path)  # no img element, no alert, no extra script, no request
    text = page.text.replace("\xa0", " ")  # circuitsvis shows spaces in tokens as &nbsp;
    assert text.count(EVIL) >= 4  # heading, text, and the tokens of the coloured views
    token_views = [c for c in page.dom["components"] if c["name"] == "ColoredTokensMulti"]
    assert len(token_views) == 3  # shares, identifiability, attribution of one query
    for c in token_views:
        assert EVIL in c["text"].replace("\xa0", " ") and "&amp;" in c["text"]


@pytest.mark.bundled
@browser
@needs_chromium
def test_minilm_report_from_the_cli(tmp_path, capsys):
    path = tmp_path / "minilm.html"
    start = time.perf_counter()
    rc = cli.main(["report", "The cat sat on the mat.", "-o", str(path), "--no-progress"])
    seconds = time.perf_counter() - start
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[CLS] the cat sat on the mat . [SEP]" in out and f"wrote {path}" in out
    report_seconds = float(re.search(r"self-contained\) in ([0-9.]+) s", out).group(1))
    assert report_seconds < 60, f"the report took {report_seconds:.0f} s"
    assert seconds < 120  # with loading MiniLM
    page = load(path)
    _save_screenshot(page.png, "minilm.png")
    assert_page_ok(page, path)
    assert_not_blank(page.png)
    heads = [c for c in page.dom["components"] if c["name"] == "AttentionHeads"]
    assert len(heads) == 3 * 6 + 1  # raw, effective, norm-based for 6 blocks; attribution
    assert all(c["canvases"] == 13 for c in heads[:12])  # 12 heads and the zoomed one


def test_write_is_atomic_replaces_files_and_refuses_links(tmp_path, monkeypatch):
    # Report.write truncated in place: a failure mid-write left a page with no </html>.
    rep = tiny_report()
    path = tmp_path / "r.html"
    path.write_text("old page")
    assert rep.write(path) == path and path.read_text(encoding="utf-8").endswith("</html>\n")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # fails after the bytes went out
    before = path.read_bytes()
    with pytest.raises(OSError, match="No space"):
        rep.write(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    link = tmp_path / "link.html"
    link.symlink_to(path)
    with pytest.raises(ValueError, match="symbolic link"):
        rep.write(link)
    with pytest.raises(ValueError, match="directory"):
        rep.write(tmp_path)
