"""How views reach a screen: in a notebook, circuitsvis's bundle once a session; on disk, a page.

circuitsvis's `RenderedHTML` inlines its 1.3 MB browser bundle (``dist/cdn/iife.js``) in every
component it renders, so four views fill a notebook with megabytes of the same JavaScript. A
`View` instead sends the bundle with the first view a kernel displays, where it defines
``window.CircuitsVis``, and later views only mount their components on it.

The trade-off: a later view's output is not self-contained; it draws on a page that shows the
first. That holds while the kernel runs, in a notebook reopened from disk (outputs render in
order, the first carrying the bundle) and in its HTML export. A view finding no bundle (its
first output was cleared, or each output sits in its own iframe, as on Colab, which therefore
gets the bundle in every output) waits for one, after 3 s falls back to circuitsvis's CDN
build as circuitsvis itself does, and offline says how to restore it: `resend_bundle` makes
the next display carry it again. Re-running the cell that carried it carries it again where
the front end names the cell in its request (JupyterLab and Notebook 7 do).
``view.local_src`` is always self-contained, and ``view.save(path)`` writes one offline page:
bundle inlined, no network, scripts by hash.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import sys
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import circuitsvis
from circuitsvis.utils import render as _cv
from circuitsvis.utils.convert_props import convert_props
from circuitsvis.utils.render import RenderedHTML

from tl_decomp._core import files


@dataclass(frozen=True)
class Component:
    """One circuitsvis React component and the props it receives (JSON-ready, camelCase).

    `render` makes the same call circuitsvis's own helpers make:
    ``circuitsvis.utils.render.render(name, **props)``.
    """

    name: str
    props: dict[str, Any] = field(hash=False)
    title: str = ""

    def render(self) -> RenderedHTML:
        """circuitsvis's rendering, with its inline props made safe inside ``<script>``:
        circuitsvis writes them with a plain ``json.dumps``, so a token ``</script>`` would
        end the script and run whatever follows it in the notebook."""
        out = _cv.render(self.name, **self.props)
        raw = convert_props(self.props)
        safe = _script_safe(raw)
        return RenderedHTML(out.local_src.replace(raw, safe), out.cdn_src.replace(raw, safe))


def _script_safe(js: str) -> str:
    """JSON that cannot close a ``<script>`` or open markup: ``<``, ``>``, ``&`` and the two
    line separators as ``\\u`` escapes, which JavaScript reads back as the same characters."""
    for ch in "<>&\u2028\u2029":
        js = js.replace(ch, f"\\u{ord(ch):04x}")
    return js


def compact(obj: Any) -> Any:
    """Floats to 4 decimals (props are shares and attention weights, mostly in [-1, 1]):
    the page stays small and the colours do not change."""
    if isinstance(obj, float):
        return round(obj, 4) if math.isfinite(obj) else None
    if isinstance(obj, list):
        return [compact(v) for v in obj]
    if isinstance(obj, dict):
        return {k: compact(v) for k, v in obj.items()}
    return obj


def json_for_script(obj: Any) -> str:
    """JSON that no string inside can end the script element early (nor open a comment)."""
    return _script_safe(json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")))


def bundle() -> str:
    """circuitsvis's browser bundle, safe inside one classic ``<script>`` element (its
    ``var CircuitsVis`` then defines ``window.CircuitsVis``).

    Its one ``</script>`` sits in a string literal, where ``<\\/script>`` means the same;
    the source-map comment goes, so no tool asks for the map.
    """
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    js = "\n".join(line for line in js.splitlines() if not line.startswith("//# sourceMappingURL"))
    return js.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


def sha256(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


def row(components: Sequence[Component], prefix: str) -> tuple[str, list[dict[str, Any]]]:
    """Components side by side, each under its title, in an empty ``div.cv`` named
    ``{prefix}{i}``; and what mounts them (id, component name, compacted props)."""
    cells, mounts = [], []
    for i, c in enumerate(components):
        cid = f"{prefix}{i}"
        mounts.append({"id": cid, "name": c.name, "props": compact(c.props)})
        title = f"<h4>{html.escape(c.title)}</h4>" if c.title else ""
        cells.append(f'<div>{title}<div class="cv" id="{cid}" '
                     f'data-component="{html.escape(c.name)}"></div></div>')  # fmt: skip
    return f'<div class="row">{"".join(cells)}</div>', mounts


# -- a self-contained page --------------------------------------------------------------------
_MOUNT = """for (const c of JSON.parse(document.getElementById("tl-decomp-props").textContent)) {
  const div = document.getElementById(c.id);
  try { CircuitsVis.render(c.id, CircuitsVis[c.name], c.props); div.dataset.mounted = "1"; }
  catch (err) { div.textContent = "could not render " + c.name + ": " + err; }
}"""
_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 24px;
color:#222}.row{display:flex;gap:16px}.row>div{flex:1 1 0;min-width:0}"""


def document(title: str, body: str, mounts: list[dict[str, Any]], css: str = _CSS) -> str:
    """A page that opens with no network: the bundle inlined once, the props as one JSON data
    block, and a Content Security Policy allowing the two scripts, by hash, and no request."""
    js = bundle()
    # Scripts by hash only (no inline handler can run); TensorFlow.js inside the bundle
    # probes WebAssembly, hence 'wasm-unsafe-eval' (it allows no JavaScript eval).
    csp = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'wasm-unsafe-eval' "
           f"'{sha256(js)}' '{sha256(_MOUNT)}'")  # fmt: skip
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{html.escape(title)}</title><style>{css}</style>"
        f"<script>{js}</script></head><body>{body}"
        f'<script type="application/json" id="tl-decomp-props">{json_for_script(mounts)}</script>'
        f"<script>{_MOUNT}</script></body></html>\n"
    )


# -- notebook outputs -------------------------------------------------------------------------
# After the bundle: run the mounts that arrived first (outputs can render out of order).
_AFTER_BUNDLE = """;window.CircuitsVis = CircuitsVis;
for (const f of (window.tlDecompWaiting || []).splice(0)) f(CircuitsVis);"""
# A module script, as circuitsvis's own: it runs once the output is in the document. With no
# bundle yet, it waits for one, then after 3 s tries circuitsvis's CDN, then says what to do.
_NOTEBOOK_MOUNT = """let done = false;
const each = (f) => {
  for (const m of mounts) { const div = document.getElementById(m.id); if (div) f(div, m); }
};
const mount = (cv) => {
  if (done) return;
  done = true;
  each((div, m) => {
    try { cv.render(m.id, cv[m.name], m.props); div.dataset.mounted = "1"; }
    catch (err) { div.textContent = "could not render " + m.name + ": " + err; }
  });
};
const missing = () => done || each((div) => { div.textContent = "(no circuitsvis bundle on "
  + "this page and no network: run tl_decomp.views.resend_bundle() and display the view "
  + "again, or view.save(path) for an offline page)"; });
if (window.CircuitsVis) mount(window.CircuitsVis);
else {
  (window.tlDecompWaiting = window.tlDecompWaiting || []).push(mount);
  setTimeout(() => done || import(__CDN__).then(mount, missing), 3000);
}"""


@dataclass
class _Session:
    """What this Python process has sent: the bundle, and in which request and cell."""

    sent: bool = False
    request: str | None = None
    cell: str | None = None


_SESSION = _Session()


def resend_bundle() -> None:
    """Make the next view displayed carry the circuitsvis bundle again (after the output
    that carried it was cleared)."""
    _SESSION.sent = False


def _request() -> tuple[str | None, str | None]:
    """The Jupyter request running now and its cell's id (front ends that send one)."""
    ipython = sys.modules.get("IPython")
    kernel = getattr(ipython.get_ipython(), "kernel", None) if ipython else None
    try:
        parent = kernel.get_parent()  # ipykernel >= 6
        return parent["header"].get("msg_id"), parent.get("metadata", {}).get("cellId")
    except Exception:  # not in a kernel, or one without parent messages: no ids
        return None, None


def _bundle_due() -> bool:
    """Whether this display carries the bundle: the first of the session; the first of a
    re-run of the cell that carried it (its new output replaces the old); all on Colab."""
    if "google.colab" in sys.modules:
        return True
    request, cell = _request()
    rerun = cell is not None and cell == _SESSION.cell and request != _SESSION.request
    if _SESSION.sent and not rerun:
        return False
    _SESSION.sent, _SESSION.request, _SESSION.cell = True, request, cell
    return True


def _cdn() -> str:
    return json.dumps(f"https://unpkg.com/circuitsvis@{circuitsvis.__version__}/dist/cdn/esm.js")


class View(RenderedHTML):
    """Components side by side that Jupyter displays like circuitsvis's `RenderedHTML`, with
    the circuitsvis bundle once a session (see `tl_decomp.viz`); `save` writes a page.

    ``local_src`` is a self-contained fragment (the bundle inlined once), ``cdn_src`` and
    ``str()`` one that loads circuitsvis from its CDN, as circuitsvis's own.

    Attributes:
        components: what is shown, left to right (name, props and title of each).

    Example:
        >>> import pathlib, tempfile
        >>> from tl_decomp import decompose, tiny_model, views
        >>> view = views.shares_view(decompose(tiny_model("bert"), "the cat sat", layer=2))
        >>> view
        View(ColoredTokensMulti 'share <e, t> / |e|² per token'): displays in Jupyter; ...
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     page = view.save(pathlib.Path(tmp) / "shares.html").read_text("utf-8")
        >>> page.count("var CircuitsVis="), "unpkg" in page, page.endswith("</html>\\n")
        (1, False, True)
    """

    def __init__(self, components: Sequence[Component]) -> None:
        # no super().__init__: local_src and cdn_src are made on demand (megabytes each)
        self.components = tuple(components)

    def _fragment(self, source: str) -> str:
        """The view's HTML; `source` of the bundle: ``inline``, ``cdn`` or ``session``
        (nothing: a bundle an earlier output sent, waited for)."""
        body, mounts = row(self.components, f"tl-decomp-{uuid.uuid4().hex[:12]}-")
        if source == "inline":
            body += f"<script>{bundle()}{_AFTER_BUNDLE}</script>"
        elif source == "cdn":
            load = f"import * as CircuitsVis from {_cdn()}"
            body += f'<script type="module">{load}{_AFTER_BUNDLE}</script>'
        mount = f"const mounts = {json_for_script(mounts)};\n" + _NOTEBOOK_MOUNT.replace(
            "__CDN__", _cdn()
        )
        return f'<div style="margin: 15px 0">{body}</div><script type="module">{mount}</script>'

    @property
    def local_src(self) -> str:
        return self._fragment("inline")

    @property
    def cdn_src(self) -> str:
        return self._fragment("cdn")

    def _repr_html_(self) -> str:
        """Jupyter's HTML: the bundle only if no earlier output of this session carries it."""
        return self._fragment("inline" if _bundle_due() else "session")

    def html(self) -> str:
        """One self-contained offline page: the bundle inlined, no request of any kind."""
        body, mounts = row(self.components, "cv-")
        title = " · ".join(c.title or c.name for c in self.components)
        return document(f"tl_decomp: {title}", body, mounts)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `html` to `path` (UTF-8) and return it; warn when a file was replaced.

        Atomic (`tl_decomp._core.files`): a crash or a full disk leaves the old file or the new
        one. An existing regular file is replaced; a symbolic link or a directory is refused
        (ValueError).
        """
        out, replaced = files.atomic_write(path, self.html(), what="the view")
        if replaced:
            warnings.warn(f"replaced the existing file {out}", stacklevel=2)
        return out

    def __repr__(self) -> str:
        shown = ", ".join(f"{c.name} {c.title!r}" if c.title else c.name for c in self.components)
        return f"View({shown}): displays in Jupyter; .save(path) writes an offline page"

    # print(view) outside a notebook: what it is and how to see it, not a page of HTML
    __str__ = __repr__
