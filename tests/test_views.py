"""Views: the component name and props circuitsvis receives, read off its own render call."""

from __future__ import annotations

import functools
import html

import pytest
import torch
from circuitsvis.utils import render as cv_render
from circuitsvis.utils.render import RenderedHTML
from conftest import cached_model

from tl_decomp import decompose, decompose_layers, model_spec, views
from tl_decomp.attention import effective_attention
from tl_decomp.attribution import hidden_token_attribution
from tl_decomp.identifiability import token_identifiability

EVIL = "<img src=x onerror=alert(1)>"
TEXTS = ["the cat sat on the mat", "a dog ran"]


@pytest.fixture
def calls(monkeypatch):
    """Every ``render(name, **props)`` call circuitsvis receives, instead of rendering."""
    seen: list[tuple[str, dict]] = []

    def fake(name, **props):
        seen.append((name, props))
        return RenderedHTML(f"<local {name}>", f"<cdn {name}>")

    monkeypatch.setattr(cv_render, "render", fake)
    return seen


@functools.cache
def attention_case(arch):
    model = cached_model(arch)
    spec = model_spec(model)
    _, cache = model.run_with_cache(
        torch.arange(5, 17)[None], names_filter=spec.names_filter(attention=True)
    )
    return spec, cache["blocks.1.attn.hook_pattern"], effective_attention(cache, 1)


@functools.cache
def attribution_case():
    # estimated: views show whatever numbers they get; exactness is test_attribution's
    return hidden_token_attribution(
        cached_model("bert"), TEXTS, layers=[0, 2, 3], method="estimate", n_probes=4
    )


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_attention_view_props(calls, arch):
    spec, raw, eff = attention_case(arch)
    tokens = [f"t{i}" for i in range(10)] + [EVIL, "end"]
    out = views.attention_view(raw, eff, tokens, layer=1, causal=spec.causal)
    assert [name for name, _ in calls] == ["AttentionHeads", "AttentionHeads"]
    (_, left), (_, right) = calls
    assert left["attention"] == raw[0].double().tolist()
    assert right["attention"] == eff[0].tolist()
    assert left["maskUpperTri"] is right["maskUpperTri"] is spec.causal
    assert left["attentionHeadNames"] == [f"L1H{h}" for h in range(spec.n_heads)]
    bound = max(raw.abs().max().item(), eff.abs().max().item())
    assert left["maxValue"] == right["maxValue"] == pytest.approx(bound)
    assert left["minValue"] == -left["maxValue"]
    assert left["tokens"] == tokens  # drawn on a canvas by chart.js: text, not markup
    assert isinstance(out, RenderedHTML)
    assert out.local_src.index("raw attention") < out.local_src.index("effective attention")
    assert out.local_src.count("<local AttentionHeads>") == 2
    assert out.cdn_src.count("<cdn AttentionHeads>") == 2


def test_attention_view_crops_to_tokens(calls):
    _, raw, eff = attention_case("bert")
    views.attention_view(raw, eff, ["a", "b", "c"], layer=1, causal=False)
    assert torch.tensor(calls[0][1]["attention"]).shape == (4, 3, 3)
    with pytest.raises(ValueError, match="13 token strings for 12 positions"):
        views.attention_view(raw, eff, ["a"] * 13, layer=1, causal=False)


def test_shares_view_one_decomposition(calls):
    d = decompose(cached_model("bert"), TEXTS, layer=1)
    tokens = ["[CLS]", "the", "cat", EVIL, "on", "the", "mat", "[SEP]"]
    out = views.shares_view(d, tokens)
    assert isinstance(out, RenderedHTML)
    [(name, props)] = calls
    assert name == "ColoredTokensMulti"
    assert props["labels"] == ["i", "h", "f", "c"]
    assert props["values"] == d.shares()[:, 0].T.tolist()
    # circuitsvis writes these tokens with innerHTML: they must arrive escaped
    assert props["tokens"][3] == "&lt;img src=x onerror=alert(1)&gt;"
    assert [html.unescape(t) for t in props["tokens"]] == tokens


def test_shares_view_layers_drop_padding(calls):
    ds = decompose_layers(cached_model("bert"), TEXTS)
    views.shares_view(ds, batch=1)
    [(_, props)] = calls
    n = int(ds[0].mask()[1].sum())  # [CLS] a dog ran [SEP]
    assert n == 5 and len(props["tokens"]) == n
    assert props["tokens"] == [str(i) for i in ds[0].tokens[1, :n].tolist()]
    assert props["labels"][:5] == [
        "layer 1: i",
        "layer 1: h",
        "layer 1: f",
        "layer 1: c",
        "layer 2: i",
    ]
    expected = torch.cat([d.shares()[:, 1, :n].T for d in ds], dim=1)
    assert props["values"] == expected.tolist()
    with pytest.raises(ValueError, match="no decompositions"):
        views.shares_view([])


def test_identifiability_view(calls):
    corpus = ["the cat sat on the mat", "a dog ran", "the mat is big", "a cat and a dog"]
    res = token_identifiability(
        cached_model("bert"), corpus, mapping="naive", test_fraction=0.5, progress=False
    )
    views.identifiability_view(res)
    name, props = calls[-1]
    assert name == "ColoredTokens"
    assert props["tokens"] == ["layer 0", "layer 1", "layer 2", "layer 3"]
    assert props["values"] == res.rates.tolist()
    assert (props["minValue"], props["maxValue"]) == (0.0, 1.0)

    seq = res.test[0]
    mine = (res.sequences == seq).nonzero()[:, 0]
    strings = [f"w{i}" for i in range(len(mine) - 1)] + [EVIL]
    views.identifiability_view(res, strings, sequence=seq)
    name, props = calls[-1]
    assert name == "ColoredTokensMulti"
    assert props["labels"] == ["layer 0", "layer 1", "layer 2", "layer 3"]
    assert props["values"] == res.correct[:, mine].T.double().tolist()
    assert props["tokens"][-1] == html.escape(EVIL, quote=False)
    with pytest.raises(ValueError, match="not in the test split"):
        views.identifiability_view(res, sequence=res.train[0])


def test_attribution_view_query(calls):
    hta = attribution_case()
    views.attribution_view(hta, query=2, batch=1)
    [(name, props)] = calls
    assert name == "ColoredTokensMulti"
    n = 5  # [CLS] a dog ran [SEP]
    assert props["labels"] == ["layer 0", "layer 2", "layer 3"]
    assert props["values"] == hta.contributions[:, 1, 2, :n].double().T.tolist()
    assert props["tokens"] == [str(i) for i in hta.tokens[1, :n].tolist()]
    with pytest.raises(ValueError, match="query 5 out of range"):
        views.attribution_view(hta, query=5, batch=1)


def test_attribution_view_matrices(calls):
    hta = attribution_case()
    tokens = ["[CLS]", "the", EVIL, "sat", "on", "the", "mat", "[SEP]"]
    views.attribution_view(hta, tokens)
    [(name, props)] = calls
    assert name == "AttentionHeads"
    assert props["attention"] == hta.contributions[:, 0].double().tolist()
    assert props["attentionHeadNames"] == ["layer 0", "layer 2", "layer 3"]
    assert props["tokens"] == tokens and props["maskUpperTri"] is False


def test_views_render_with_circuitsvis():
    """Unpatched: circuitsvis's own RenderedHTML, props inlined in its local source."""
    d = decompose(cached_model("bert"), "the cat sat")
    out = views.shares_view(d, ["[CLS]", "the", "cat", "sat", "[SEP]"])
    assert type(out) is RenderedHTML
    assert "CircuitsVis.ColoredTokensMulti" in out.local_src
    assert '"labels": ["i", "h", "f", "c"]' in out.local_src


def test_tokens_must_be_strings_one_per_position(calls):
    d = decompose(cached_model("bert"), "the cat sat")  # 5 positions with [CLS] and [SEP]
    with pytest.raises(TypeError):  # ours, or the runtime type checker's first
        views.shares_view(d, torch.tensor([2, 5, 6, 7, 3]))
    with pytest.raises(TypeError, match="list of token strings"):
        views.shares_view(d, "the cat sat")
    with pytest.raises(ValueError, match="6 token strings for 5 positions"):
        views.shares_view(d, ["[CLS]", "the", "cat", "sat", "[SEP]", "extra"])
    _, raw, eff = attention_case("bert")
    with pytest.raises(TypeError):
        views.attention_view(raw, eff, torch.arange(12), layer=1, causal=False)


def test_props_cannot_close_the_script():
    evil = "</script><script>window.__pwned = 1</script>"
    _, raw, eff = attention_case("bert")
    out = views.attention_view(raw, eff, [evil] * 12, layer=1, causal=False)
    for src in (out.local_src, out.cdn_src):
        # circuitsvis strips "</script>" from its bundle: one closing tag per component.
        assert src.count("</script>") == 2 and "\\u003c/script\\u003e" in src


@pytest.mark.browser
def test_notebook_views_run_no_script_from_tokens(tmp_path):
    """Every notebook view, written as a page, in headless Chromium: no token runs script."""
    import time

    from test_report import CHROMIUM, Chromium

    if CHROMIUM is None:
        pytest.skip("needs Chromium (scripts/check.sh installs it)")
    evil = "</script><script>window.__pwned = 1</script>"
    bert = cached_model("bert")
    d = decompose(bert, "the cat sat")  # [CLS] the cat sat [SEP]
    tokens = ["[CLS]", evil, EVIL, "sat", "[SEP]"]
    spec, raw, eff = attention_case("bert")
    hta = attribution_case()
    rendered = [
        views.shares_view(d, tokens),
        views.attention_view(raw, eff, [evil] * 12, layer=1, causal=False),
        views.attribution_view(hta, ["[CLS]", "the", evil, "sat", "on", "the", "mat", "[SEP]"]),
        views.attribution_view(hta, tokens, query=1, batch=1),
    ]
    path = tmp_path / "views.html"
    path.write_text("<!doctype html><html><body>" + "".join(r.local_src for r in rendered))
    chrome = Chromium()
    try:
        chrome.send("Page.navigate", chrome.session, url=path.resolve().as_uri())
        ready = "document.readyState === 'complete' && location.href.endsWith('views.html')"
        end = time.monotonic() + 60
        while not chrome.js(ready) and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(1)  # module scripts run after parsing
        pwned = chrome.js("window.__pwned === undefined ? 0 : 1")
        imgs = chrome.js("document.images.length")
        text = chrome.js("document.body.innerText")
    finally:
        chrome.close()
    assert pwned == 0 and imgs == 0
    assert text.count("Head Selector") == 3  # both attention panels and the attribution matrix
    assert "window.__pwned" in text  # shown as text by the token views
