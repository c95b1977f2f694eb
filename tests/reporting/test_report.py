"""The report: its content, and the page itself in real headless Chromium.

Playwright drives the system Chromium (`support.browser`, no browser download): the test
sees every network request the page makes, every script error, every
Content-Security-Policy violation, and takes a screenshot. The browser tests are skipped
only where Chromium or Playwright is missing (scripts/check.sh installs both).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import os
import re
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
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
    assert "[CLS]│the│cat│sat│on│the│mat│[SEP]" in summary and "P̃" in summary


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
    # raw, effective, norm-based; shares, identifiability, attribution (2); flow (2)
    assert rep.html().count('class="cv"') == 3 * 3 + 4 + 2


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
    assert page.clipped == []  # every head and layer name whole in its selector
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
    base = tiny_report()
    flow = dataclasses.replace(base.flow, tokens=tokens)
    rep = dataclasses.replace(base, text=f"the {EVIL} sat", model_name=EVIL, tokens=tokens,
                              flow=flow)  # fmt: skip
    path = tmp_path / "evil.html"
    rep.write(path)
    page = load(path)
    save_screenshot(page.png, "markup.png")
    assert_page_ok(page, path)  # no img element, no alert, no extra script, no request
    text = page.text.replace("\xa0", " ")  # circuitsvis shows spaces in tokens as &nbsp;
    assert text.count(EVIL) >= 4  # heading, text, and the tokens of the coloured views
    token_views = [c for c in page.dom["components"] if c["name"] == "ColoredTokensMulti"]
    assert len(token_views) == 4  # shares, identifiability, attribution of one query, flow
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
    assert "[CLS]│the│cat│sat│on│the│mat│.│[SEP]" in out and f"wrote {path}" in out
    report_seconds = float(re.search(r"self-contained\) in ([0-9.]+) s", out).group(1))
    assert report_seconds < 60, f"the report took {report_seconds:.0f} s"
    assert seconds < 120  # with loading MiniLM
    page = load(path)
    save_screenshot(page.png, "minilm.png")
    assert_page_ok(page, path)
    assert_not_blank(page.png)
    heads = [c for c in page.dom["components"] if c["name"] == "AttentionHeads"]
    # raw, effective, norm-based for 6 blocks; attribution; the flow's routes
    assert len(heads) == 3 * 6 + 1 + 1
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


# -- the report at scale: what the defaults draw ----------------------------------------------
def test_spread_picks_evenly_with_both_ends():
    from tl_decomp.reporting._report import _spread

    for n in range(1, 12):
        for k in range(0, 14):
            got = _spread(range(n), k)
            assert len(got) == min(k, n) and list(got) == sorted(set(got))
            if k >= 2:
                assert got[0] == 0 and got[-1] == n - 1
            if k == 1:
                assert got == (n - 1,)


def test_defaults_fit_the_budgets_of_a_deep_decoder():
    """SmolLM2's shape (30 blocks of 9 heads, d_model 576) at 99 tokens: a few attention
    blocks, no attribution or flow, 6 layers of shares; each cut named with what adds it."""
    from types import SimpleNamespace

    from tl_decomp.reporting import _report as R

    block = SimpleNamespace(pattern="blocks.L.attn.hook_pattern", mixer=None)  # attention
    spec = SimpleNamespace(n_layers=30, n_heads=9, d_model=576, blocks=[block] * 30)
    left: list[str] = []
    plan = R._Plan(spec, 99, "estimate", 8, left)
    blocks = plan.blocks()
    assert 3 * 9 * 99 * 99 * len(blocks) <= R.ATTENTION_VALUES
    assert 3 * 9 * 99 * 99 * (len(blocks) + 1) > R.ATTENTION_VALUES  # as many as fit
    assert blocks[0] == 0 and blocks[-1] == 29
    assert plan.attribution() == () and plan.flow() is False
    layers = [*range(31), "final"]
    assert plan.shares(layers) == R._spread(layers, 6) and len(plan.shares(layers)) == 6
    flags = ["--attention-blocks", "--attribution-layers", "--flow", "--share-layers"]
    assert all(flag in note for flag, note in zip(flags, left[:3] + left[-1:], strict=True))
    # a short text fits everything up to the budgets: attribution over the whole depth
    plan = R._Plan(spec, 10, "estimate", 8, [])
    deepest = min(30, R.ATTRIBUTION_COST // (10 * 10 * 8))
    assert plan.attribution() == R._spread(range(1, deepest + 1), 3) and plan.flow() is True
    assert R._Plan(SimpleNamespace(n_layers=6, n_heads=12, d_model=384), 10, "estimate", 8,
                   []).attribution() == (1, 3, 6)  # fmt: skip


def test_tokens_are_text_not_byte_level_glyphs():
    """A byte-level BPE tokenizer (GPT-2's scheme) writes ' keeper' as 'Ġkeeper'; the report
    shows the text each token stands for, and the tokens join back into the text."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tl_decomp.reporting._report import token_strings

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = "The keeper climbed the stairs; café\nnaïve"
    bpe.train_from_iterator([text] * 4, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = torch.tensor(tok(text)["input_ids"])
    raw = tok.convert_ids_to_tokens(ids.tolist())
    assert any(t.startswith("Ġ") for t in raw)  # what the page showed before
    shown = token_strings(SimpleNamespace(tokenizer=tok), ids)
    assert "".join(shown) == text and not any("Ġ" in t or "Ċ" in t for t in shown)
    assert " keeper" in shown or any(t.startswith(" ") for t in shown)


def test_report_says_what_it_left_out(monkeypatch):
    """Budgets shrunk to the tiny model's size: the page and the terminal list each cut with
    the argument that adds it, and the page draws only what was kept."""
    from tl_decomp.reporting import _report as R

    for name, value in [("ATTENTION_VALUES", 3 * 4 * 7 * 7), ("ATTRIBUTION_COST", 0),
                        ("FLOW_COST", 0)]:  # fmt: skip
        monkeypatch.setattr(R, name, value)
    rep = report(cached_model("gpt2"), "the cat sat on the mat", progress=False)
    assert rep.attention_blocks == (2,) and rep.attribution is None and rep.flow is None
    assert len(rep.left_out) == 3 and rep.share_layers == (0, 1, 2, 3, "final")
    page, summary = rep.html(), rep.summary()
    for note in rep.left_out:
        assert html.escape(note) in page and note in summary
    assert "Information flow" not in page and "Hidden Token Attribution</h2>" not in page
    assert "naive map (g = identity)" in page  # the identifiability curve explained


def test_flow_panel_and_share_selector():
    rep = tiny_report("gpt2", corpus=0)
    flow = rep.flow
    assert flow.position == len(rep.tokens) - 1 and flow.tokens == rep.tokens
    model = cached_model("gpt2")
    ids = model.to_tokens("the cat sat on the mat")
    predicted = int(model(ids)[0, -1].argmax())
    assert flow.target == model.tokenizer.convert_tokens_to_string(
        model.tokenizer.convert_ids_to_tokens([predicted]))  # fmt: skip
    # exact: at the last layer the tokens' logits and the bias sum to the model's own logit
    logit = model(ids)[0, -1, predicted].item()
    total = (flow.contributions[-1].sum() + flow.bias[-1]).item()
    assert total == pytest.approx(logit, rel=1e-6, abs=1e-6)
    data = re.search(r'id="tl-decomp-props">(.*?)</script>', rep.html(), re.S).group(1)
    names = [m["name"] for m in json.loads(data)]
    assert names[-2:] == ["ColoredTokensMulti", "AttentionHeads"]  # the flow's two panels
    shares = json.loads(data)[0]["props"]
    assert len(shares["labels"]) == 4 * len(rep.share_layers) <= 4 * 6


def test_state_cosines_against_pairwise_loop():
    """The naive-map note's figure: the mean cosine over every ordered pair of two different
    tokens' states, against a loop over the pairs."""
    rep = tiny_report("gpt2", corpus=0)
    got = dict(rep.state_cosines())
    assert list(got) == [d.layer for d in rep.decompositions]
    for d in rep.decompositions:
        e = d.target[0][d.mask()[0]].double()
        pairs = [torch.nn.functional.cosine_similarity(e[i], e[j], dim=0).item()
                 for i in range(len(e)) for j in range(len(e)) if i != j]  # fmt: skip
        assert got[d.layer] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


# -- the report on a real 30-layer decoder (issue 20) -----------------------------------------
PARAGRAPH = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He carried a small "
    "lamp, a notebook and a thermos of tea. From the top he could see the fishing boats "
    "returning to the harbour, their lights scattered across the dark water like stars. "
    "Some nights the wind was so strong that the whole tower seemed to sway, but he never "
    "missed a single evening. When he finally retired, the town gave him a brass telescope, "
    "and he still watches the boats from his kitchen window."
)


@pytest.mark.bundled
@browser
@needs_chromium
def test_smollm2_paragraph_report_from_the_cli(tmp_path, capsys):
    """SmolLM2 (30 blocks) on a 99-token paragraph with every default: a page of at most 8 MiB
    that Chromium draws whole, tokens as text in the page and the terminal, selectors that fit,
    and what was left out said in both. (Its time is benchmarks/bench_report.py's figure.)"""
    path = tmp_path / "smollm2.html"
    rc = cli.main(["report", PARAGRAPH, "--model", "smollm2", "-o", str(path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "│ lighthouse│ keeper│ climbed│" in out and "Ġ" not in out and "Ċ" not in out
    assert "left out: attention of 28 of 30 blocks (shown: 0, 29)" in out
    assert path.stat().st_size <= 8 * 2**20
    source = path.read_text()
    assert "Ġ" not in source and "\\u0120" not in source
    mounts = json.loads(re.search(r'id="tl-decomp-props">(.*?)</script>', source, re.S).group(1))
    shares = mounts[0]["props"]
    assert len(shares["labels"]) == 4 * 6 and len(shares["tokens"]) == 99  # not 4 x 32 buttons
    assert "naive map (g = identity)" in source and "mean cosine" in source
    page = load(path, timeout=240)
    save_screenshot(page.png, "smollm2.png")
    assert_page_ok(page, path, plots=2)  # shares and identifiability: no attribution
    assert_not_blank(page.png)
    assert page.clipped == []
    heads = [c for c in page.dom["components"] if c["name"] == "AttentionHeads"]
    assert len(heads) == 3 * 2  # raw, effective, norm-based of blocks 0 and 29
    for c, block in zip(heads, [0, 0, 0, 29, 29, 29], strict=True):
        assert all(f"L{block}H{h}" in c["text"].split() for h in range(9))
    assert " keeper" in page.text.replace("\xa0", " ")
