"""The report's HTML page: one circuitsvis bundle, the props as JSON data, plots, tables.

Everything a reader's text can reach is escaped: markup with `html.escape`, the JSON data
block with ``<``, ``>`` and ``&`` as ``\\u`` escapes (no string can end the element), and the
tokens circuitsvis writes with ``innerHTML`` arrive HTML-escaped from `tl_decomp.views`. A
Content Security Policy allows the page's two scripts, by hash, and no request of any kind.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from tl_decomp._core.results import columns, format_cell
from tl_decomp.reporting._result import COLUMNS
from tl_decomp.viz import Component, document, plots, views
from tl_decomp.viz import row as html_row

if TYPE_CHECKING:
    from tl_decomp.reporting._result import Report

_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 24px;
color:#222}h1{margin-bottom:4px}blockquote{background:#f6f6f6;border-left:4px solid #888;
margin:8px 0;padding:8px 12px;white-space:pre-wrap}table{border-collapse:collapse;margin:8px 0}
th,td{border-bottom:1px solid #ddd;padding:2px 10px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}.cv{margin:4px 0 16px}.row{display:flex;gap:16px}
.row>div{flex:1 1 0;min-width:0}.note{color:#555;font-size:13px}svg{max-width:100%;height:auto}
section{border-top:1px solid #ccc;margin-top:24px}
.cv>div[style*=padding-bottom]{padding-bottom:16px!important}
.cv[data-component^=ColoredTokens] span[style*=inline-block]{margin-right:3px!important}
ul.note{margin:4px 0}"""
# circuitsvis pads ColoredTokensMulti by 20 px per value for its tooltip (480 px for 24
# values); the tooltip floats, so the page drops the padding. Tokens get a gap between them.


def _rows(rep: Report) -> list[tuple[str, Sequence[Component]]]:
    """(section, components shown side by side in one row), in page order."""
    tokens, a = rep.tokens, rep.attribution
    shown = [d for d in rep.decompositions if d.layer in rep.share_layers] or rep.decompositions
    rows: list[tuple[str, Sequence[Component]]] = [
        ("decomposition", views.shares_components(shown, tokens))
    ]
    for i, L in enumerate(rep.attention_blocks):
        nb = None if rep.norm_based is None else rep.norm_based[i]
        panels = views.attention_components(rep.patterns[i], rep.effective[i], tokens, block=L,
                                            causal=rep.causal, norm_based=nb)  # fmt: skip
        # one panel a row: the head selector gets the page's width, its labels whole
        rows += [(f"attention{L}", (panel,)) for panel in panels]
    ident = rep.identifiability
    rows.append(
        ("identifiability", views.identifiability_components(ident, tokens, sequence=ident.test[0]))
    )
    if rep.corpus_identifiability is not None:
        rows.append(
            ("identifiability", views.identifiability_components(rep.corpus_identifiability))
        )
    if a is not None:
        rows.append(("attribution", views.attribution_components(a, tokens, query=rep.query)))
        rows.append(("attribution", views.attribution_components(a, tokens)))
    if rep.flow is not None:
        routes, contributions = views.flow_components(rep.flow)
        rows += [("flow", (contributions,)), ("flow", (routes,))]
    return rows


def page(rep: Report) -> str:
    """The whole page for `rep`."""
    mounts: list[dict[str, Any]] = []
    slots: dict[str, list[str]] = {}
    for k, (section, components) in enumerate(_rows(rep)):
        row, more = html_row(components, f"cv-{k}-")
        mounts += more
        slots.setdefault(section, []).append(row)
    body = _body(rep, {k: "".join(v) for k, v in slots.items()})
    return document(f"tl_decomp report: {rep.model_name}", body, mounts, _CSS)


def _body(rep: Report, slots: dict[str, str]) -> str:
    a = rep.attribution
    parts = [
        f"<h1>tl_decomp report</h1><p>{_e(rep.model_name)} · {len(rep.tokens)} tokens · "
        f"computed in {rep.seconds:.1f} s</p><blockquote>{_e(rep.text)}</blockquote>"
        + _left_out(rep),
        "<section><h2>Summary</h2><p class=note>Layer 0 is the layer-0 input, layer l the "
        "output of block l−1, final a decoder's final-norm output; heads are named by block "
        f"(L0H3: block 0, head 3).</p><p class=note>{_e(COLUMNS)}</p>"
        f"{_html_table(rep.layer_rows())}{_html_table(rep.attention_rows())}</section>",
        "<section><h2>Vector-factor decomposition</h2><p class=note>"
        f"e = {' + '.join(rep.decompositions[0].coarse().kinds)}; mean share ⟨e,t⟩/‖e‖² "
        "over the tokens (they sum to 1).</p>"
        f"{_plot_shares(rep)}{slots['decomposition']}</section>",
        "<section><h2>Effective attention</h2><p class=note>Left: the pattern A; right: "
        "A·P, its identifiable part (P projects onto the column space of T = V W_O), on one "
        "colour scale (red is negative); third, norm-based attention ‖A[q,k] f(x_k)‖ "
        "(Kobayashi et al. 2020): how much of key k's value vector reaches query q.</p>"
        + _identifiable_note(rep)
        + "".join(f"<h3>block {L}</h3>{slots[f'attention{L}']}" for L in rep.attention_blocks)
        + "</section>",
        "<section><h2>Token identifiability</h2><p class=note>Is each token its own nearest "
        "layer-0 vector of the sentence, after a map g: e^l → e^0?</p>"
        f"{_naive_note(rep)}{_plot_identifiability(rep)}{slots['identifiability']}</section>",
    ]
    if a is not None:
        how = a.method + (f", {a.n_probes} probes" if a.n_probes else "")
        parts.append(
            "<section><h2>Hidden Token Attribution</h2><p class=note>c[i,j] = ‖∂e_i/∂x_j‖ / "
            f"Σ_k ‖∂e_i/∂x_k‖ ({_e(how)}, w.r.t. {_e(a.wrt)}).</p>"
            f"{_plot_attribution(rep)}{slots['attribution']}</section>"
        )
    if rep.flow is not None:
        parts.append(_flow_section(rep, slots["flow"]))
    versions = ", ".join(f"{k} {v}" for k, v in rep.meta.items())
    parts.append(f"<p class=note>{_e(versions)}</p>")
    return "".join(parts)


def _left_out(rep: Report) -> str:
    if not rep.left_out:
        return ""
    items = "".join(f"<li>{_e(x)}</li>" for x in rep.left_out)
    return (
        f"<p class=note>Left out to keep the page small and quick:</p><ul class=note>{items}</ul>"
    )


def _naive_note(rep: Report) -> str:
    """Why the naive map's curve can fall to ~0 after layer 0, with this text's numbers."""
    if rep.corpus_identifiability is not None:
        return ""
    cos = dict(rep.state_cosines())
    later = [v for L, v in cos.items() if L not in (0, "final")]
    return (
        "<p class=note>The curve uses the naive map (g = identity): a state counts as "
        "identified when it is still nearest, by cosine, to its own token's layer-0 vector. "
        "Nothing is fitted, so it falls wherever the states leave the directions of their "
        "input vectors. Here the mean cosine between two different tokens' states is "
        f"{cos[0]:.2f} at layer 0 and {min(later, default=cos[0]):.2f} to "
        f"{max(later, default=cos[0]):.2f} at the later layers: "
        + (
            "the higher it is, the more every state points one way (a few large dimensions "
            "that all tokens share, as decoders grow after their first block), and the fewer "
            "tokens stay nearest to their own input. "
            if max(later, default=0) > 0.5
            else ""
        )
        + "A linear map fitted on corpus sentences (corpus_sentences=N, --corpus N) measures "
        "what the naive map cannot: whether the token is still recoverable.</p>"
    )


def _flow_section(rep: Report, slot: str) -> str:
    f = rep.flow
    what = ("the logit of its next-token prediction " + repr(f.target)
            if f.target is not None else "its state's share")  # fmt: skip
    return (
        "<section><h2>Information flow</h2><p class=note>Into token "
        f"{f.position} ({_e(repr(f.tokens[f.position]))}): each input token's part of {_e(what)} "
        "at every layer (exact: with the bias term they sum to it), and below, the routes "
        "that carry it, block by block: the share of each head's term from key j (summed "
        f"over heads) and of the residual (diagonal) in the state it writes; |share| ≥ "
        f"{f.threshold:g}, followed back from the last block.</p>{slot}</section>"
    )


def _identifiable_note(rep: Report) -> str:
    ns = rep.null_space
    if ns is None:
        return "<p>No block of this model is attention: nothing to draw here.</p>"
    if int(ns.null_dim.max()) > 0:
        return ""
    return (
        f"<p><b>Here A_eff = A:</b> with {int(ns.n_keys[0])} keys, no more than rank(T), every "
        "pattern is identifiable. A text longer than d_head tokens "
        f"({rep.d_head} here) shows the difference.</p>"
    )


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _html_table(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(format_cell(r.get(c), c))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


# -- plots ------------------------------------------------------------------------------------
def _svg(draw: Any, name: str, height: float = 3.0) -> str:
    """A matplotlib figure as inline SVG; a note instead when matplotlib is missing."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        return "<p class=note>(plots need matplotlib: pip install 'tl-decomp[plots]')</p>"
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": name}):
        fig = Figure(figsize=(7.5, height), layout="constrained")
        draw(fig.subplots())
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return f'<figure id="plot-{name}">{text[text.index("<svg") :]}</figure>'


def _plot_shares(rep: Report) -> str:
    return _svg(partial(plots.shares, rep.decompositions), "shares")


def _plot_identifiability(rep: Report) -> str:
    named = {"this text, naive map": rep.identifiability,
             "corpus, linear map": rep.corpus_identifiability}  # fmt: skip
    return _svg(partial(plots.identifiability, named), "identifiability", 2.6)


def _plot_attribution(rep: Report) -> str:
    return _svg(partial(plots.attribution, rep.attribution), "attribution", 2.6)
