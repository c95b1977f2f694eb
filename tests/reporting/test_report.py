"""The report: its content, and the page itself in real headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``), with
no Python driver: the test sees every network request the page makes, every script error,
every Content-Security-Policy violation, and takes a screenshot. The browser tests are
skipped only where no Chromium is installed (scripts/check.sh installs Debian's).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support.browser import (
    EVIL,
    assert_not_blank,
    assert_page_ok,
    browser,
    load,
    needs_chromium,
    save_screenshot,
)
from support.models import KINDS, cached_model

from tl_decomp import cli
from tl_decomp.reporting import report

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
    save_screenshot(page.png, "tiny_bert.png")
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
    save_screenshot(page.png, "markup.png")
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
    save_screenshot(page.png, "minilm.png")
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
