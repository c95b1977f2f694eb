"""One self-contained HTML page on one text: decomposition, effective attention,
identifiability and Hidden Token Attribution, with the circuitsvis views, plots and tables.

`report` computes a `Report` with the library's own functions and writes its page. The page
opens with no network: the circuitsvis bundle is inlined once (circuitsvis's own ``str()``
loads it from a CDN; its ``local_src`` inlines it once per view), every component's props sit
in one JSON data block, and a Content Security Policy allows only the page's two scripts, by
hash, and no request of any kind. Plots are matplotlib SVG with text drawn as paths. Token
strings and the text are data, escaped wherever they land (`tl_decomp._page`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_decomp import _adapters, _page, _running
from tl_decomp.decompose import Decomposition, decompose_layers
from tl_decomp.views import layer_name


@dataclass(frozen=True)
class Report:
    """Everything the page shows, computed by the library's own functions.

    Attributes:
        text, tokens: the input and its token strings (as data; the page escapes them).
        decompositions: `decompose_layers` at every block output (and a decoder's final).
        attention_layers, patterns, effective: raw and effective attention of those blocks,
            ``[layer head_index query_pos key_pos]``; `null_space` their diagnostics.
        identifiability: token identifiability of the text's own tokens (naive map, cosine).
        corpus_identifiability: a linear map fitted on shipped corpus sentences, or None.
        attribution: Hidden Token Attribution of the text, or None; `query` the position
            whose contributions the page shows token by token.
    """

    model_name: str
    text: str
    tokens: tuple[str, ...]
    causal: bool
    decompositions: tuple[Decomposition, ...]
    attention_layers: tuple[int, ...]
    patterns: Float[Tensor, "layer head_index query_pos key_pos"]
    effective: Float[Tensor, "layer head_index query_pos key_pos"]
    null_space: Any
    identifiability: Any
    corpus_identifiability: Any = None
    attribution: Any = None
    query: int = 0
    d_head: int = 0
    seconds: float = 0.0
    meta: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def layer_rows(self) -> list[dict[str, Any]]:
        """One row per hidden-state layer: mean shares, error, identifiability, attribution.

        Keys (in order): ``layer``, the factor labels, ``rel. error``, ``identified`` (this
        text, naive map), ``identified (corpus)``, ``own`` (median own-token contribution)
        and ``P̃``; None where a method does not cover that layer.
        """
        cells: dict[int | None, dict[str, Any]] = {}
        for d in self.decompositions:
            shares = d.shares()[:, 0][:, d.mask()[0]].mean(-1).tolist()
            cell = cells.setdefault(None if d.layer is None else d.layer + 1, {})
            cell.update(zip(d.labels, shares, strict=True), **{"rel. error": d.relative_error})
        columns = [*self.decompositions[0].labels, "rel. error"]
        for key, res in (("identified", self.identifiability),
                         ("identified (corpus)", self.corpus_identifiability)):  # fmt: skip
            if res is not None:
                columns.append(key)
                for L, rate in zip(res.layers, res.rates.tolist(), strict=True):
                    cells.setdefault(L, {})[key] = rate
        if (a := self.attribution) is not None:
            columns += ["own", "P̃"]
            own, p = a.own_token().tolist(), a.p_tilde().tolist()
            for L, o, q in zip(a.layers, own, p, strict=True):
                cells.setdefault(L, {}).update({"own": o, "P̃": q})
        order = sorted(cells, key=lambda L: math.inf if L is None else L)
        return [{"layer": layer_name(L), **{c: cells[L].get(c) for c in columns}} for L in order]

    def attention_rows(self) -> list[dict[str, Any]]:
        """One row per block, means over heads: rank(T), null-space dimension, and
        ``||A - A_eff||_F / ||A||_F`` (mean and max over heads)."""
        ns = self.null_space
        return [
            {"block": L, "keys": int(ns.n_keys[0]), "rank(T)": ns.rank[i, 0].double().mean().item(),
             "null dim": ns.null_dim[i, 0].double().mean().item(),
             "‖A−A_eff‖/‖A‖": ns.relative_norm[i, 0].mean().item(),
             "max over heads": ns.relative_norm[i, 0].max().item()}
            for i, L in enumerate(ns.layers)
        ]  # fmt: skip

    def summary(self) -> str:
        """The two tables as plain text, for a terminal."""
        head = f"{self.model_name}: {len(self.tokens)} tokens: {' '.join(self.tokens)}"
        return "\n\n".join([head, _page.text_table(self.layer_rows()),
                            _page.text_table(self.attention_rows())])  # fmt: skip

    def html(self) -> str:
        """The page, self-contained: see the module docstring."""
        return _page.page(self)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write `html` to `path` (UTF-8) and return it.

        Atomic: the page goes to a temporary file beside `path`, which then replaces it, so a
        crash or a full disk never leaves half a page. An existing regular file is replaced;
        a symbolic link or a directory is refused (`check_path`).
        """
        out = check_path(path)
        data = self.html().encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


def check_path(path: str | os.PathLike[str]) -> Path:
    """`path` if a report can be written there; else ValueError saying why (before any work)."""
    out = Path(path)
    if out.is_symlink():
        raise ValueError(f"cannot write the report to {out}: it is a symbolic link (not followed)")
    if out.is_dir():
        raise ValueError(f"cannot write the report to {out}: it is a directory")
    if not out.parent.is_dir():
        raise ValueError(f"cannot write the report to {out}: no directory {out.parent}")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"cannot write the report to {out}: permission denied")
    return out


def report(
    model: Any,
    text: str,
    path: str | os.PathLike[str] | None = None,
    *,
    model_name: str | None = None,
    attention_layers: Sequence[int] | None = None,
    attribution_layers: Sequence[int] | None = (1, 2, 3),
    attribution_method: Literal["estimate", "exact"] = "estimate",
    n_probes: int = 8,
    query: int | None = None,
    corpus_sentences: int = 0,
    max_tokens: int = 48,
    progress: bool = True,
) -> Report:
    """Analyse `text` with every method of the library and write one HTML page.

    Defaults suit MiniLM on a CPU (a sentence in seconds): attribution is estimated
    (`n_probes` random directions per token) on three layers only.

    Args:
        model: a TransformerBridge, HookedTransformer or HookedEncoder.
        text: one short text.
        path: where to write the page; None writes nothing (`Report.write` later).
        model_name: shown on the page; default the model's ``cfg.model_name``.
        attention_layers: blocks whose raw and effective attention to show; default all.
        attribution_layers: hidden-state layers (0..n_layers) for Hidden Token Attribution;
            None or empty skips it (it is the costly part: the run goes as deep as the deepest).
        attribution_method: ``estimate`` or ``exact`` (``pos * d_model`` JVPs).
        n_probes: random directions per token for ``estimate``.
        query: the position whose contributions are shown token by token (default: middle).
        corpus_sentences: also fit a linear identifiability map on this many sentences of the
            shipped corpus (0: only the text's own tokens, naive map).
        max_tokens: refuse longer texts (attribution grows with the square of the length).
        progress: a progress bar over the steps.

    Example:
        >>> from tl_decomp import _running, tiny_model
        >>> rep = report(tiny_model("bert"), "the cat sat on the mat", attribution_layers=[1],
        ...              progress=False)
        >>> rep.tokens
        ('[CLS]', 'the', 'cat', 'sat', 'on', 'the', 'mat', '[SEP]')
        >>> [row["layer"] for row in rep.layer_rows()]
        ['layer 0', 'layer 1', 'layer 2', 'layer 3']
        >>> rep.html().count("var CircuitsVis=")  # the bundle, once
        1
    """
    from tl_decomp.attribution import hidden_token_attribution

    if not text.strip():
        raise ValueError("the text is empty")
    out = None if path is None else check_path(path)
    start = time.perf_counter()
    spec = _adapters.model_spec(model)
    _check_options(spec.n_layers, attention_layers, attribution_layers, attribution_method,
                   n_probes)  # fmt: skip
    ids, mask = _running.tokenize(model, text, encoder=not spec.causal)
    ids, mask = ids.to(_running.model_device(model)), mask.to(_running.model_device(model))
    n = ids.shape[1]
    if n > max_tokens:
        raise ValueError(f"the text has {n} tokens; the limit is {max_tokens} (max_tokens)")
    q = n // 2 if query is None else query
    if not -n <= q < n:
        raise ValueError(f"query {q} out of range: the text has {n} tokens")
    blocks = tuple(range(spec.n_layers) if attention_layers is None else attention_layers)
    jobs = {  # the steps of the progress bar
        "decomposition": lambda: tuple(decompose_layers(model, ids)),
        "effective attention": lambda: _attention(model, spec, ids, mask, blocks),
        "identifiability": lambda: _identifiability(model, text, corpus_sentences, progress),
        "attribution": lambda: hidden_token_attribution(
            model, ids, layers=attribution_layers, method=attribution_method,
            n_probes=n_probes, progress=progress) if attribution_layers else None,
    }  # fmt: skip
    got: dict[str, Any] = {}
    with tqdm(total=len(jobs) + 1, desc="report", disable=not progress) as bar:
        for name, job in jobs.items():
            bar.set_postfix_str(name)
            got[name] = job()
            bar.update()
        bar.set_postfix_str("page")
        raw, eff, null = got["effective attention"]
        rep = Report(
            model_name=model_name or str(getattr(model.cfg, "model_name", type(model).__name__)),
            text=text, tokens=tuple(model.tokenizer.convert_ids_to_tokens(ids[0].tolist())),
            causal=spec.causal, decompositions=got["decomposition"], attention_layers=blocks,
            patterns=raw, effective=eff, null_space=null, identifiability=got["identifiability"][0],
            corpus_identifiability=got["identifiability"][1], attribution=got["attribution"],
            query=q % n, d_head=spec.d_head, seconds=time.perf_counter() - start, meta=_versions(),
        )  # fmt: skip
        if out is not None:
            rep.write(out)
        bar.update()
    return rep


def _attention(model: Any, spec: Any, ids: Tensor, mask: Tensor, blocks: tuple[int, ...]):
    """Raw and effective patterns of the blocks ``[layer head q k]``, and their diagnostics."""
    from tl_decomp.attention import attention_null_space, effective_attention_layers

    names = spec.names_filter(layers=blocks, attention=True)
    cache = _running.run_with_cache(model, ids, mask, names)
    eff = effective_attention_layers(cache, blocks, model=model)[:, 0]
    raw = torch.stack([cache[spec.blocks[L].pattern][0] for L in blocks]).to(eff.dtype)
    return raw, eff, attention_null_space(cache, blocks, model=model)


def _identifiability(model: Any, text: str, corpus_sentences: int, progress: bool):
    """The text's own tokens with the naive map (the text is its own one-sequence test
    split), and a linear map fitted on shipped corpus sentences when asked."""
    from tl_decomp.identifiability import token_identifiability

    own = token_identifiability(model, [text, text], mapping="naive", test_fraction=0.5,
                                progress=False)  # fmt: skip
    if not corpus_sentences:
        return own, None
    from tl_decomp.corpus import load_corpus

    return own, token_identifiability(model, load_corpus(corpus_sentences), progress=progress)


def _check_options(
    n_layers: int,
    attention: Sequence[int] | None,
    attribution: Sequence[int] | None,
    method: str,
    n_probes: int,
) -> None:
    """The cheap checks, before any model run."""
    bad = [L for L in attention or () if not 0 <= L < n_layers]
    if bad or (attention is not None and not attention):
        raise ValueError(
            f"attention layers {list(attention or ())} out of range: blocks run 0 to {n_layers - 1}"
        )
    bad = [L for L in attribution or () if not 0 <= L <= n_layers]
    if bad:
        raise ValueError(
            f"attribution layer {bad[0]} out of range: layers run 0 (the input) to {n_layers}"
        )
    if method not in ("estimate", "exact"):
        raise ValueError(f"attribution_method must be 'estimate' or 'exact', not {method!r}")
    if method == "estimate" and n_probes < 2:
        raise ValueError(f"n_probes must be at least 2, not {n_probes}")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tl-decomp", "transformer-lens", "circuitsvis", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    return out


__all__ = ["Report", "check_path", "report"]
