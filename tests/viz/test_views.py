"""Views: the components and props circuitsvis receives; the bundle once per session; save."""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import os
import re
import stat
import sys
import time
import types
import warnings

import pytest
import torch
from circuitsvis.utils.render import RenderedHTML
from support.browser import Chromium, load, needs_chromium
from support.models import cached_model

import tl_decomp as td
from tl_decomp import decompose, decompose_layers, model_spec, views
from tl_decomp._core import convention
from tl_decomp.attention import effective_attention
from tl_decomp.identifiability import hidden_token_attribution, token_identifiability
from tl_decomp.viz import _html

EVIL = "<img src=x onerror=alert(1)>"
TEXTS = ["the cat sat on the mat", "a dog ran"]


def shown(view: views.View) -> list[tuple[str, dict]]:
    """(component name, props) of each component a view mounts, left to right."""
    assert isinstance(view, views.View) and isinstance(view, RenderedHTML)
    return [(c.name, c.props) for c in view.components]


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
def test_attention_view_props(arch):
    spec, raw, eff = attention_case(arch)
    tokens = [f"t{i}" for i in range(10)] + [EVIL, "end"]
    out = views.attention_view(raw, eff, tokens, block=1, causal=spec.causal)
    calls = shown(out)
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
    assert [c.title for c in out.components] == ["raw attention A", "effective attention A·P"]
    for src in (out.local_src, out.cdn_src):
        assert src.index("raw attention") < src.index("effective attention")
        assert src.count('data-component="AttentionHeads"') == 2


def test_attention_view_crops_to_tokens():
    _, raw, eff = attention_case("bert")
    calls = shown(views.attention_view(raw, eff, ["a", "b", "c"], block=1, causal=False))
    assert torch.tensor(calls[0][1]["attention"]).shape == (4, 3, 3)
    with pytest.raises(ValueError, match="13 token strings for 12 positions"):
        views.attention_view(raw, eff, ["a"] * 13, block=1, causal=False)


def test_shares_view_one_decomposition():
    d = decompose(cached_model("bert"), TEXTS, layer=2)
    tokens = ["[CLS]", "the", "cat", EVIL, "on", "the", "mat", "[SEP]"]
    [(name, props)] = shown(views.shares_view(d, tokens))
    assert name == "ColoredTokensMulti"
    assert props["labels"] == ["i", "h", "f", "c"]
    assert props["values"] == d.shares()[:, 0].T.tolist()
    # circuitsvis writes these tokens with innerHTML: they must arrive escaped
    assert props["tokens"][3] == "&lt;img src=x onerror=alert(1)&gt;"
    assert [html.unescape(t) for t in props["tokens"]] == tokens


def test_shares_view_layers_drop_padding():
    ds = decompose_layers(cached_model("bert"), TEXTS)
    [(_, props)] = shown(views.shares_view(ds, batch=1))
    n = int(ds[0].mask()[1].sum())  # [CLS] a dog ran [SEP]
    assert n == 5 and len(props["tokens"]) == n
    assert props["tokens"] == [str(i) for i in ds[0].tokens[1, :n].tolist()]
    # the residual-stream index as it is: layer 0 is the layer-0 input, no renumbering
    assert [d.layer for d in ds] == [0, 1, 2, 3]
    assert props["labels"][:5] == ["layer 0: i", "layer 0: h", "layer 0: f", "layer 0: c",
                                   "layer 1: i"]  # fmt: skip
    assert props["labels"][-1] == "layer 3: c"
    expected = torch.cat([d.shares()[:, 1, :n].T for d in ds], dim=1)
    assert props["values"] == expected.tolist()
    with pytest.raises(ValueError, match="no decompositions"):
        views.shares_view([])


def test_shares_view_labels_a_decoders_final_embedding():
    ds = decompose_layers(cached_model("gpt2"), TEXTS)
    [(_, props)] = shown(views.shares_view(ds))
    assert [d.layer for d in ds] == [0, 1, 2, 3, "final"]
    assert props["labels"][-4:] == ["final: i", "final: h", "final: f", "final: c"]
    assert convention.name(0, title=True) == "layer 0" and convention.name("final") == "final"


def test_identifiability_view():
    corpus = ["the cat sat on the mat", "a dog ran", "the mat is big", "a cat and a dog"]
    res = token_identifiability(
        cached_model("bert"), corpus, mapping="naive", test_fraction=0.5, progress=False
    )
    [(name, props)] = shown(views.identifiability_view(res))
    assert name == "ColoredTokens"
    assert props["tokens"] == ["layer 0", "layer 1", "layer 2", "layer 3"]
    assert props["values"] == res.rates.tolist()
    assert (props["minValue"], props["maxValue"]) == (0.0, 1.0)

    seq = res.test[0]
    mine = (res.sequences == seq).nonzero()[:, 0]
    strings = [f"w{i}" for i in range(len(mine) - 1)] + [EVIL]
    [(name, props)] = shown(views.identifiability_view(res, strings, sequence=seq))
    assert name == "ColoredTokensMulti"
    assert props["labels"] == ["layer 0", "layer 1", "layer 2", "layer 3"]
    assert props["values"] == res.correct[:, mine].T.double().tolist()
    assert props["tokens"][-1] == html.escape(EVIL, quote=False)
    with pytest.raises(ValueError, match="not in the test split"):
        views.identifiability_view(res, sequence=res.train[0])


def test_attribution_view_query():
    hta = attribution_case()
    [(name, props)] = shown(views.attribution_view(hta, query=2, batch=1))
    assert name == "ColoredTokensMulti"
    n = 5  # [CLS] a dog ran [SEP]
    assert props["labels"] == ["layer 0", "layer 2", "layer 3"]
    assert props["values"] == hta.contributions[:, 1, 2, :n].double().T.tolist()
    assert props["tokens"] == [str(i) for i in hta.tokens[1, :n].tolist()]
    with pytest.raises(ValueError, match="query 5 out of range"):
        views.attribution_view(hta, query=5, batch=1)


def test_attribution_view_matrices():
    hta = attribution_case()
    tokens = ["[CLS]", "the", EVIL, "sat", "on", "the", "mat", "[SEP]"]
    [(name, props)] = shown(views.attribution_view(hta, tokens))
    assert name == "AttentionHeads"
    assert props["attention"] == hta.contributions[:, 0].double().tolist()
    assert props["attentionHeadNames"] == ["layer 0", "layer 2", "layer 3"]
    assert props["tokens"] == tokens and props["maskUpperTri"] is False


def test_component_render_is_circuitsvis_own():
    """`Component.render`: circuitsvis's own RenderedHTML, props inlined in its local source."""
    d = decompose(cached_model("bert"), "the cat sat")
    [c] = views.shares_view(d, ["[CLS]", "the", "cat", "sat", "[SEP]"]).components
    out = c.render()
    assert type(out) is RenderedHTML
    assert "CircuitsVis.ColoredTokensMulti" in out.local_src
    assert '"labels": ["i", "h", "f", "c"]' in out.local_src


def test_tokens_must_be_strings_one_per_position():
    d = decompose(cached_model("bert"), "the cat sat")  # 5 positions with [CLS] and [SEP]
    with pytest.raises(TypeError):  # ours, or the runtime type checker's first
        views.shares_view(d, torch.tensor([2, 5, 6, 7, 3]))
    with pytest.raises(TypeError, match="list of token strings"):
        views.shares_view(d, "the cat sat")
    with pytest.raises(ValueError, match="6 token strings for 5 positions"):
        views.shares_view(d, ["[CLS]", "the", "cat", "sat", "[SEP]", "extra"])
    _, raw, eff = attention_case("bert")
    with pytest.raises(TypeError):
        views.attention_view(raw, eff, torch.arange(12), block=1, causal=False)


BUNDLE = "var CircuitsVis="  # the bundle's first statement: how many times it is inlined


@pytest.fixture
def session(monkeypatch):
    """A fresh Python session as far as the bundle goes: nothing sent yet, not on Colab."""
    fresh = _html._Session()
    monkeypatch.setattr(_html, "_SESSION", fresh)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    return fresh


@functools.cache
def four_views() -> tuple[views.View, ...]:
    """The issue's four views: shares, attention (two panels), identifiability, attribution."""
    bert = cached_model("bert")
    _, raw, eff = attention_case("bert")
    corpus = ["the cat sat on the mat", "a dog ran", "the mat is big", "a cat and a dog"]
    res = token_identifiability(bert, corpus, mapping="naive", test_fraction=0.5, progress=False)
    return (
        views.shares_view(decompose_layers(bert, TEXTS)),
        views.attention_view(raw, eff, block=1, causal=False),
        views.identifiability_view(res),
        views.attribution_view(attribution_case()),
    )


def test_notebook_outputs_carry_the_bundle_once_a_session(session):
    vs = four_views()
    # circuitsvis's RenderedHTML, as views returned before: one bundle per component
    before = [sum(len(c.render()._repr_html_().encode()) for c in v.components) for v in vs]
    outputs = [v._repr_html_() for v in vs]
    after = [len(o.encode()) for o in outputs]
    bundle = len(_html.bundle().encode())
    print(f"notebook output of four views: {sum(before)} bytes before, {sum(after)} after "
          f"(bundle {bundle}; per view before {before}, after {after})")  # fmt: skip
    assert [o.count(BUNDLE) for o in outputs] == [1, 0, 0, 0]
    assert sum(before) > 5 * bundle and sum(after) < bundle + 100_000
    for o, v in zip(outputs, vs, strict=True):
        assert o.count('class="cv"') == len(v.components)
        assert "tlDecompWaiting" in o  # a view whose bundle comes later mounts then
    assert all(v.local_src.count(BUNDLE) == 1 for v in vs)  # self-contained on demand
    assert vs[0]._repr_html_() != vs[0]._repr_html_()  # fresh element ids on every display
    views.resend_bundle()
    assert [vs[1]._repr_html_().count(BUNDLE) for _ in range(2)] == [1, 0]


def test_rerunning_the_cell_that_carried_the_bundle_carries_it_again(session, monkeypatch):
    # (request id, cell id) as ipykernel reports them; JupyterLab and VS Code send a cell id
    asks = iter([("r1", "a"), ("r1", "a"), ("r2", "b"), ("r3", "a"), ("r3", "a"), ("r4", None)])
    monkeypatch.setattr(_html, "_request", lambda: next(asks))
    view = four_views()[2]
    assert [view._repr_html_().count(BUNDLE) for _ in range(6)] == [1, 0, 0, 1, 0, 0]
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert view._repr_html_().count(BUNDLE) == 1  # Colab: every output is its own iframe


def test_outside_a_kernel_there_is_no_request():
    assert _html._request() == (None, None)


def test_props_cannot_close_the_script(session):
    evil = "</script><script>window.__pwned = 1</script>"
    _, raw, eff = attention_case("bert")
    out = views.attention_view(raw, eff, [evil] * 12, block=1, causal=False)
    first, later = out._repr_html_(), out._repr_html_()
    for src, scripts in ((out.local_src, 2), (out.cdn_src, 2), (first, 2), (later, 1),
                         (out.html(), 3)):  # fmt: skip
        assert len(re.findall("</script", src, re.IGNORECASE)) == scripts
        assert "\\u003c/script\\u003e" in src


def page_mounts(text: str) -> list[dict]:
    return json.loads(re.search(r'id="tl-decomp-props">(.*?)</script>', text).group(1))


def test_save_writes_one_offline_page(tmp_path):
    view = four_views()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new file: nothing replaced, nothing said
        path = view.save(tmp_path / "attention.html")
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "attention.html" and text.startswith("<!doctype html>")
    assert text.endswith("</html>\n") and text.count(BUNDLE) == 1
    assert "default-src 'none'" in text and "unpkg" not in text and "tlDecompWaiting" not in text
    assert text.count('data-component="AttentionHeads"') == 2
    mounts = page_mounts(text)
    assert [m["name"] for m in mounts] == ["AttentionHeads"] * 2
    assert mounts[0]["props"]["attentionHeadNames"] == ["L1H0", "L1H1", "L1H2", "L1H3"]
    print(f"saved attention view: {len(text.encode())} bytes")


@pytest.mark.parametrize("crash", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_save_is_atomic_replaces_files_and_refuses_links(tmp_path, monkeypatch, crash):
    view = four_views()[2]
    path = tmp_path / "v.html"
    path.write_text("old page")
    path.chmod(0o640)
    with pytest.warns(UserWarning, match=f"replaced the existing file {path}"):
        assert view.save(path) == path
    assert path.read_text(encoding="utf-8").endswith("</html>\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a replaced file keeps its mode

    fdopen = os.fdopen

    class HalfWrite:  # the temporary file gets half the page, then the write fails
        def __init__(self, fd, *args, **kwargs):
            self.f = fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise crash

    monkeypatch.setattr(os, "fdopen", HalfWrite)
    before = path.read_bytes()
    with pytest.raises(type(crash)):
        view.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old page, whole; no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.html"]

    link, dangling = tmp_path / "link.html", tmp_path / "dangling.html"
    link.symlink_to(path)
    dangling.symlink_to(tmp_path / "nowhere.html")
    refused = [(link, "symbolic link"), (dangling, "symbolic link"), (tmp_path, "directory"),
               (tmp_path / "no" / "v.html", "no directory")]  # fmt: skip
    for bad, why in refused:
        with pytest.raises(ValueError, match=f"cannot write the view to .*: .*{why}"):
            view.save(bad)
    assert path.read_bytes() == before and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.html", "link.html", "v.html"]


@pytest.mark.browser
@needs_chromium
def test_saved_views_open_offline_in_chromium(tmp_path):
    """Every component of the four views, saved as one page: drawn, with no request."""
    view = views.View([c for v in four_views() for c in v.components])
    path = view.save(tmp_path / "views.html")
    page = load(path)
    assert page.requests == [path.resolve().as_uri()], "the page asked for more than itself"
    assert page.problems == [] and page.dom["alerts"] == [] and page.dom["scripts"] == 3
    names = [c["name"] for c in page.dom["components"]]
    assert names == ["ColoredTokensMulti", "AttentionHeads", "AttentionHeads", "ColoredTokens",
                     "AttentionHeads"]  # fmt: skip
    for c in page.dom["components"]:
        assert c["mounted"], c["name"]
        if c["name"] == "AttentionHeads":
            assert c["drawn"] == c["canvases"] > 1
        else:
            assert c["spans"] > 0 and c["text"].strip()


def open_fragments(path, wait: float = 1.0) -> dict:
    """Open a page of notebook outputs in Chromium: after `wait` seconds, once every
    component shows something (or 30 s more), what mounted and what the page says."""
    probe = """({pwned: window.__pwned === undefined ? 0 : 1, imgs: document.images.length,
      text: document.body.innerText, cv: document.querySelectorAll("div.cv").length,
      shown: [...document.querySelectorAll("div.cv")].filter((d) => d.innerText.trim()).length,
      mounted: document.querySelectorAll('div.cv[data-mounted="1"]').length})"""
    with Chromium() as chrome:
        chrome.open(path, 60)
        time.sleep(wait)
        end = time.monotonic() + 30
        while (got := chrome.js(probe))["shown"] < got["cv"] and time.monotonic() < end:
            time.sleep(0.2)
        return got


@pytest.mark.browser
@needs_chromium
def test_notebook_views_run_no_script_from_tokens(tmp_path, session):
    """Notebook outputs of every view, in headless Chromium, the bundle in the second: all
    mount, and no token runs script."""
    evil = "</script><script>window.__pwned = 1</script>"
    bert = cached_model("bert")
    d = decompose(bert, "the cat sat")  # [CLS] the cat sat [SEP]
    tokens = ["[CLS]", evil, EVIL, "sat", "[SEP]"]
    spec, raw, eff = attention_case("bert")
    hta = attribution_case()
    vs = [
        views.shares_view(d, tokens),
        views.attention_view(raw, eff, [evil] * 12, block=1, causal=False),
        views.attribution_view(hta, ["[CLS]", "the", evil, "sat", "on", "the", "mat", "[SEP]"]),
        views.attribution_view(hta, tokens, query=1, batch=1),
    ]
    outputs = [v._repr_html_() for v in vs]
    assert [o.count(BUNDLE) for o in outputs] == [1, 0, 0, 0]
    # out of order: the output carrying the bundle renders after one that needs it
    outputs[0], outputs[1] = outputs[1], outputs[0]
    path = tmp_path / "views.html"
    path.write_text("<!doctype html><html><body>" + "".join(outputs))
    got = open_fragments(path)
    assert got["pwned"] == 0 and got["imgs"] == 0
    assert got["cv"] == got["mounted"] == 5
    assert got["text"].count("Head Selector") == 3  # both attention panels, the matrix
    assert "window.__pwned" in got["text"]  # shown as text by the token views


@pytest.mark.browser
@needs_chromium
def test_a_view_without_the_bundle_says_how_to_get_it(tmp_path, session):
    view = four_views()[2]
    view._repr_html_()  # the session's first output, not on the page
    path = tmp_path / "alone.html"
    path.write_text("<!doctype html><html><body>" + view._repr_html_())
    got = open_fragments(path, wait=4)  # 3 s for a bundle, then circuitsvis's CDN
    # offline (CI): the note; online: mounted from the CDN. Never a blank output.
    assert got["mounted"] == 1 or "resend_bundle()" in got["text"]


def test_attention_view_shows_norm_based_attention_as_a_third_panel():
    model = cached_model("gpt2")
    _, cache = model.run_with_cache(
        torch.arange(5, 17)[None], names_filter=td.source_names_filter(model)
    )
    raw, eff = cache["pattern", 1], td.effective_attention(cache, 1)
    nb = td.norm_based_attention(cache, 1)
    shown_ = shown(views.attention_view(raw, eff, block=1, causal=True, norm_based=nb))
    assert [name for name, _ in shown_] == ["AttentionHeads"] * 3
    third = shown_[2][1]
    assert third["minValue"] == 0 and third["attentionHeadNames"][0] == "L1H0"
    assert torch.tensor(third["attention"]).sub(nb[0].float()).abs().max() < 1e-4  # 4 decimals


def test_str_of_a_view_says_what_it_is():
    view = views.shares_view(decompose(cached_model("bert", dtype=torch.float32), "the cat"))
    assert str(view).startswith("View(ColoredTokensMulti") and "save(path)" in str(view)


def test_saved_pages_get_the_permissions_open_would_give(tmp_path):
    view = views.shares_view(decompose(cached_model("bert", dtype=torch.float32), "the cat"))
    old = os.umask(0o077)
    try:
        path = view.save(tmp_path / "v.html")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_flow_view_props_are_the_kept_edges():
    """The routes panel holds exactly the edges `InformationFlow.edges` keeps (heads summed
    per block, the residual on the diagonal), against a loop over every block, head and pair;
    the token panel is the contributions, one button per layer."""
    flow = td.information_flow(cached_model("gpt2"), "the cat sat on the mat")
    cut = flow.attention.abs().max().item() / 4  # a random tiny model's heads write little
    flow = dataclasses.replace(flow, threshold=cut)
    (routes_name, routes), (tokens_name, contributions) = shown(views.flow_view(flow))
    assert (routes_name, tokens_name) == ("AttentionHeads", "ColoredTokensMulti")
    n_blocks, n_heads, n, _ = flow.attention.shape
    expected = torch.zeros(n_blocks, n, n, dtype=torch.float64)
    alive = {flow.position}
    for b in reversed(range(n_blocks)):  # followed back from the last block, as edges() says
        reached = set()
        for i in alive:
            if abs(flow.residual[b, i]) >= cut:
                expected[b, i, i] += flow.residual[b, i].item()
                reached.add(i)
            for h in range(n_heads):
                for j in range(n):
                    if abs(flow.attention[b, h, i, j]) >= cut:
                        expected[b, i, j] += flow.attention[b, h, i, j].item()
                        reached.add(j)
        alive = reached
    assert (expected != 0).sum() > n_blocks  # attention edges as well as residual ones
    assert torch.allclose(torch.tensor(routes["attention"], dtype=torch.float64), expected)
    assert routes["attentionHeadNames"] == [f"block {b}" for b in range(n_blocks)]
    assert contributions["values"] == flow.contributions.T.tolist()
    assert contributions["labels"] == [f"layer {L}" for L in range(n_blocks + 1)]


@pytest.mark.browser
@needs_chromium
def test_flow_view_saved_opens_offline_and_token_markup_stays_text(tmp_path):
    """`flow.view().save()`: both panels drawn in headless Chromium, no request beyond the
    page, and tokens carrying markup shown as text, never run."""
    flow = td.information_flow(cached_model("gpt2"), "the cat sat on the mat")
    evil = "</script><script>window.__pwned = 1</script>"
    tokens = (EVIL, evil, "&amp;", *flow.tokens[3:])
    path = dataclasses.replace(flow, tokens=tokens).view().save(tmp_path / "flow.html")
    page = load(path)
    assert page.requests == [path.resolve().as_uri()], "the page asked for more than itself"
    assert page.problems == [] and page.dom["alerts"] == [] and page.dom["imgs"] == 0
    assert page.dom["scripts"] == 3  # the bundle, the props, the mount: nothing injected
    assert [c["name"] for c in page.dom["components"]] == ["AttentionHeads", "ColoredTokensMulti"]
    heads, colored = page.dom["components"]
    assert heads["mounted"] and heads["drawn"] == heads["canvases"] > 1
    text = colored["text"].replace("\xa0", " ")
    assert colored["mounted"] and EVIL in text and evil in text and "&amp;" in text
