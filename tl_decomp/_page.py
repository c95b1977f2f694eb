"""The report's HTML page: one circuitsvis bundle, the props as JSON data, plots, tables.

Everything a reader's text can reach is escaped: markup with `html.escape`, the JSON data
block with ``<``, ``>`` and ``&`` as ``\\u`` escapes (no string can end the element), and the
tokens circuitsvis writes with ``innerHTML`` arrive HTML-escaped from `tl_decomp.views`. A
Content Security Policy allows the page's two scripts, by hash, and no request of any kind.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_decomp import views
from tl_decomp.views import Component

if TYPE_CHECKING:
    from tl_decomp.report import Report

_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 24px;
color:#222}h1{margin-bottom:4px}blockquote{background:#f6f6f6;border-left:4px solid #888;
margin:8px 0;padding:8px 12px;white-space:pre-wrap}table{border-collapse:collapse;margin:8px 0}
th,td{border-bottom:1px solid #ddd;padding:2px 10px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}.cv{margin:4px 0 16px}.row{display:flex;gap:16px}
.row>div{flex:1 1 0;min-width:0}.note{color:#555;font-size:13px}svg{max-width:100%;height:auto}
section{border-top:1px solid #ccc;margin-top:24px}
.cv>div[style*=padding-bottom]{padding-bottom:16px!important}
.cv[data-component^=ColoredTokens] span[style*=inline-block]{margin-right:3px!important}"""
# circuitsvis pads ColoredTokensMulti by 20 px per value for its tooltip (480 px for 24
# values); the tooltip floats, so the page drops the padding. Tokens get a gap between them.

_MOUNT = """for (const c of JSON.parse(document.getElementById("tl-decomp-props").textContent)) {
  const div = document.getElementById(c.id);
  try { CircuitsVis.render(c.id, CircuitsVis[c.name], c.props); div.dataset.mounted = "1"; }
  catch (err) { div.textContent = "could not render " + c.name + ": " + err; }
}"""


def _rows(rep: Report) -> list[tuple[str, Sequence[Component]]]:
    """(section, components shown side by side in one row), in page order."""
    tokens, a = rep.tokens, rep.attribution
    rows: list[tuple[str, Sequence[Component]]] = [
        ("decomposition", views.shares_components(rep.decompositions, tokens))
    ]
    for i, L in enumerate(rep.attention_layers):
        pair = views.attention_components(rep.patterns[i], rep.effective[i], tokens, layer=L,
                                          causal=rep.causal)  # fmt: skip
        rows.append((f"attention{L}", pair))
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
    return rows


def page(rep: Report) -> str:
    """The whole page for `rep`."""
    props, slots = [], {}
    for section, row in _rows(rep):
        cells = []
        for c in row:
            cid = f"cv-{len(props)}"
            props.append({"id": cid, "name": c.name, "props": _compact(c.props)})
            cells.append(f'<div><h4>{_e(c.title)}</h4><div class="cv" id="{cid}" '
                         f'data-component="{_e(c.name)}"></div></div>')  # fmt: skip
        slots.setdefault(section, []).append(f'<div class="row">{"".join(cells)}</div>')
    data = _json_for_script(props)
    bundle = _bundle()
    # Scripts by hash only (no inline handler can run); TensorFlow.js inside the bundle
    # probes WebAssembly, hence 'wasm-unsafe-eval' (it allows no JavaScript eval).
    csp = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'wasm-unsafe-eval' "
           f"'{_sha256(bundle)}' '{_sha256(_MOUNT)}'")  # fmt: skip
    body = _body(rep, {k: "".join(v) for k, v in slots.items()})
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>tl_decomp report: {_e(rep.model_name)}</title><style>{_CSS}</style>"
        f"<script>{bundle}</script></head><body>{body}"
        f'<script type="application/json" id="tl-decomp-props">{data}</script>'
        f"<script>{_MOUNT}</script></body></html>\n"
    )


def _body(rep: Report, slots: dict[str, str]) -> str:
    a = rep.attribution
    parts = [
        f"<h1>tl_decomp report</h1><p>{_e(rep.model_name)} · {len(rep.tokens)} tokens · "
        f"computed in {rep.seconds:.1f} s</p><blockquote>{_e(rep.text)}</blockquote>",
        "<section><h2>Summary</h2><p class=note>Layer 0 is the layer-0 input, layer l the "
        "output of block l−1; heads are named by block (L0H3: block 0, head 3).</p>"
        f"{_html_table(rep.layer_rows())}{_html_table(rep.attention_rows())}</section>",
        "<section><h2>Vector-factor decomposition</h2><p class=note>e = i + h + f + c; mean "
        "share ⟨e,t⟩/‖e‖² over the tokens (the four sum to 1).</p>"
        f"{_plot_shares(rep)}{slots['decomposition']}</section>",
        "<section><h2>Effective attention</h2><p class=note>Left: the pattern A; right: "
        "A·P, its identifiable part (P projects onto the column space of T = V W_O). Same "
        "colour scale; red is negative.</p>"
        + _identifiable_note(rep)
        + "".join(f"<h3>block {L}</h3>{slots[f'attention{L}']}" for L in rep.attention_layers)
        + "</section>",
        "<section><h2>Token identifiability</h2><p class=note>Is each token its own nearest "
        "layer-0 vector of the sentence, after a map g: e^l → e^0?</p>"
        f"{_plot_identifiability(rep)}{slots['identifiability']}</section>",
    ]
    if a is not None:
        how = a.method + (f", {a.n_probes} probes" if a.n_probes else "")
        parts.append(
            "<section><h2>Hidden Token Attribution</h2><p class=note>c[i,j] = ‖∂e_i/∂x_j‖ / "
            f"Σ_k ‖∂e_i/∂x_k‖ ({_e(how)}, w.r.t. {_e(a.wrt)}).</p>"
            f"{_plot_attribution(rep)}{slots['attribution']}</section>"
        )
    versions = ", ".join(f"{k} {v}" for k, v in rep.meta.items())
    parts.append(f"<p class=note>{_e(versions)}</p>")
    return "".join(parts)


def _identifiable_note(rep: Report) -> str:
    ns = rep.null_space
    if int(ns.null_dim.max()) > 0:
        return ""
    return (
        f"<p><b>Here A_eff = A:</b> with {int(ns.n_keys[0])} keys, no more than rank(T), every "
        "pattern is identifiable. A text longer than d_head tokens "
        f"({rep.d_head} here) shows the difference.</p>"
    )


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v: Any, column: str = "") -> str:
    if v is None:
        return "–"
    if column in ("rank(T)", "null dim"):
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.3f}"
    return str(v)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _html_table(rows: list[dict[str, Any]]) -> str:
    cols = _columns(rows)
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_fmt(r.get(c), c))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def text_table(rows: list[dict[str, Any]]) -> str:
    cols = _columns(rows)
    cells = [[_fmt(r.get(c), c) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, width, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, width, strict=True)) for row in cells]
    return "\n".join(lines)


def _compact(obj: Any) -> Any:
    """Floats to 4 decimals (props are shares and attention weights, mostly in [-1, 1]):
    the page stays small and the colours do not change."""
    if isinstance(obj, float):
        return round(obj, 4) if math.isfinite(obj) else None
    if isinstance(obj, list):
        return [_compact(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _compact(v) for k, v in obj.items()}
    return obj


def _json_for_script(obj: Any) -> str:
    """JSON that no string inside can end the script element early (nor open a comment)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(ch, esc)
    return text


def _bundle() -> str:
    """circuitsvis's browser bundle, safe inside one ``<script>`` element.

    Its one ``</script>`` sits in a string literal, where ``<\\/script>`` means the same;
    the source-map comment goes, so no tool asks for the map.
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    js = "\n".join(line for line in js.splitlines() if not line.startswith("//# sourceMappingURL"))
    return js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


def _sha256(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


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
    ds = [d for d in rep.decompositions if d.layer is not None]
    x = [d.layer + 1 for d in ds if d.layer is not None]

    def draw(ax: Any) -> None:
        for k, label in enumerate(ds[0].labels):
            ys = [d.shares()[k, 0][d.mask()[0]].mean().item() for d in ds]
            ax.plot(x, ys, marker="o", label=label)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set(xlabel="layer", ylabel="mean share", xticks=x)
        ax.legend(ncols=4)

    return _svg(draw, "shares")


def _plot_identifiability(rep: Report) -> str:
    def draw(ax: Any) -> None:
        for res, label in ((rep.identifiability, "this text, naive map"),
                           (rep.corpus_identifiability, "corpus, linear map")):  # fmt: skip
            if res is not None:
                ax.plot(res.layers, res.rates.tolist(), marker="o", label=label)
        ax.set(xlabel="layer", ylabel="identified", ylim=(-0.05, 1.05))
        ax.legend()

    return _svg(draw, "identifiability", 2.6)


def _plot_attribution(rep: Report) -> str:
    a = rep.attribution

    def draw(ax: Any) -> None:
        ax.plot(a.layers, a.own_token().tolist(), marker="o", label="median own-token share")
        ax.plot(a.layers, a.p_tilde().tolist(), marker="s", label="P̃: top contributor not self")
        ax.set(xlabel="layer", ylim=(-0.05, 1.05), xticks=list(a.layers))
        ax.legend()

    return _svg(draw, "attribution", 2.6)
