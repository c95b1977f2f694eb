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
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_decomp import _adapters, _checks, _layers, _page, _running
from tl_decomp._layers import Layer
from tl_decomp.decompose import Decomposition


@dataclass(frozen=True)
class Report:
    """Everything the page shows, computed by the library's own functions.

    Attributes:
        text, tokens: the input and its token strings (as data; the page escapes them).
        decompositions: `decompose_layers` at every layer (0 .. n_layers, a decoder's final).
        attention_blocks, patterns, effective: raw and effective attention of those blocks,
            ``[block head_index query_pos key_pos]``; `null_space` their diagnostics;
            `norm_based` Kobayashi et al.'s ``‖A[q,k] f(x_k)‖`` of the same heads (None where
            a model's heads are not pattern times values).
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
    attention_blocks: tuple[int, ...]
    patterns: Float[Tensor, "block head_index query_pos key_pos"]
    effective: Float[Tensor, "block head_index query_pos key_pos"]
    null_space: Any
    identifiability: Any
    norm_based: Float[Tensor, "block head_index query_pos key_pos"] | None = None
    corpus_identifiability: Any = None
    attribution: Any = None
    query: int = 0
    d_head: int = 0
    seconds: float = 0.0
    meta: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def layer_rows(self) -> list[dict[str, Any]]:
        """One row per layer (residual-stream index): mean shares, error, identifiability,
        attribution.

        Keys (in order): ``layer``, the factor labels, ``rel. error``, ``identified`` (this
        text, naive map), ``identified (corpus)``, ``own`` (median own-token contribution)
        and ``P̃``; None where a method was not run at that layer.
        """
        cells: dict[Any, dict[str, Any]] = {}
        for d in self.decompositions:
            shares = d.shares()[:, 0][:, d.mask()[0]].mean(-1).tolist()
            cell = cells.setdefault(d.layer, {})
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
        order = sorted(cells, key=lambda L: math.inf if L == "final" else L)
        return [{"layer": _layers.name(L), **{c: cells[L].get(c) for c in columns}} for L in order]

    def attention_rows(self) -> list[dict[str, Any]]:
        """One row per block, means over heads: rank(T), null-space dimension, and
        ``||A - A_eff||_F / ||A||_F`` (mean and max over heads)."""
        ns = self.null_space
        return [
            {"block": L, "keys": int(ns.n_keys[0]), "rank(T)": _mean(ns.rank[i, 0]),
             "null dim": _mean(ns.null_dim[i, 0]),
             "‖A−A_eff‖/‖A‖": ns.relative_norm[i, 0].mean().item(),
             "max over heads": ns.relative_norm[i, 0].max().item()}
            for i, L in enumerate(ns.blocks)
        ]  # fmt: skip

    def summary(self) -> str:
        """The two tables as plain text, for a terminal."""
        head = f"{self.model_name}: {len(self.tokens)} tokens: {' '.join(self.tokens)}"
        return "\n\n".join([head, _page.text_table(self.layer_rows()),
                            _page.text_table(self.attention_rows()),
                            textwrap.fill(_page.COLUMNS, 100)])  # fmt: skip

    def html(self) -> str:
        """The page, self-contained: see the module docstring."""
        return _page.page(self)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write `html` to `path` (UTF-8) and return it.

        Atomic: the page goes to a temporary file beside `path`, which then replaces it, so a
        crash or a full disk never leaves half a page. An existing regular file is replaced;
        a symbolic link or a directory is refused (`check_path`). The one writer of reports
        and saved views: `tl_decomp._files.atomic_write`.
        """
        from tl_decomp import _files

        return _files.atomic_write(path, self.html(), what="the report")[0]


def check_path(path: str | os.PathLike[str]) -> Path:
    """`path` if a report can be written there; else ValueError saying why (before any work)."""
    from tl_decomp import _files

    return _files.check_path(path, what="the report")


def report(
    model: Any,
    text: str,
    path: str | os.PathLike[str] | None = None,
    *,
    model_name: str | None = None,
    attention_blocks: Sequence[int] | None = None,
    attribution_layers: Sequence[Layer] | None = None,
    attribution_method: Literal["estimate", "exact"] = "estimate",
    n_probes: int = 8,
    query: int | None = None,
    corpus_sentences: int = 0,
    max_tokens: int = 128,
    progress: bool = True,
) -> Report:
    """Analyse `text` with every method of the library and write one HTML page.

    Defaults suit MiniLM on a CPU (a sentence in seconds): attribution is estimated
    (`n_probes` random directions per token) on layers 1-3 only. One forward pass caches what
    the decomposition and effective attention read.

    Args:
        model: a TransformerBridge, HookedTransformer or HookedEncoder.
        text: one short text.
        path: where to write the page; None writes nothing (`Report.write` later).
        model_name: shown on the page; default the model's ``cfg.model_name``.
        attention_blocks: blocks whose raw and effective attention to show; default all.
        attribution_layers: residual-stream indices (0 .. n_layers, negatives from the end)
            for Hidden Token Attribution; default 1, 2, 3 (those the model has); empty skips
            it (it is the costly part: the run goes as deep as the deepest).
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
        ['0', '1', '2', '3']
        >>> rep.html().count("var CircuitsVis=")  # the bundle, once
        1
    """
    from tl_decomp.attribution import hidden_token_attribution

    out = None if path is None else check_path(path)
    start = time.perf_counter()
    spec = _adapters.model_spec(model)
    _check_options(text, attribution_method, n_probes, corpus_sentences, max_tokens, query)
    blocks = _layers.blocks(spec, attention_blocks, "attention_blocks")
    if attribution_layers is None:
        attribution_layers = range(1, min(3, spec.n_layers) + 1)
    hta = tuple(attribution_layers)  # empty: skipped
    hta = _layers.resolve_many(spec, hta, "attribution_layers") if hta else ()
    ids, mask = _running.tokenize(model, text, encoder=not spec.causal)
    ids, mask = ids.to(_running.model_device(model)), mask.to(_running.model_device(model))
    n = ids.shape[1]
    if n > max_tokens:
        raise ValueError(f"the text has {n} tokens; the limit is {max_tokens} (max_tokens)")
    q = n // 2 if query is None else query
    if not -n <= q < n:
        raise ValueError(f"query {q} out of range: the text has {n} tokens")
    jobs = {  # the steps of the progress bar
        "decomposition and attention": lambda: _one_pass(model, spec, ids, mask, blocks),
        "identifiability": lambda: _identifiability(model, text, corpus_sentences, progress),
        "attribution": lambda: hidden_token_attribution(
            model, ids, layers=hta, method=attribution_method,
            n_probes=n_probes, progress=progress) if hta else None,
    }  # fmt: skip
    got: dict[str, Any] = {}
    with tqdm(total=len(jobs) + 1, desc="report", disable=not progress) as bar:
        for name, job in jobs.items():
            bar.set_postfix_str(name)
            got[name] = job()
            bar.update()
        bar.set_postfix_str("page")
        decompositions, raw, eff, null, norm_based = got["decomposition and attention"]
        rep = Report(
            model_name=model_name or str(getattr(model.cfg, "model_name", type(model).__name__)),
            text=text, tokens=tuple(model.tokenizer.convert_ids_to_tokens(ids[0].tolist())),
            causal=spec.causal, decompositions=decompositions, attention_blocks=blocks,
            patterns=raw, effective=eff, null_space=null, norm_based=norm_based,
            identifiability=got["identifiability"][0],
            corpus_identifiability=got["identifiability"][1], attribution=got["attribution"],
            query=q % n, d_head=spec.d_head, seconds=time.perf_counter() - start, meta=_versions(),
        )  # fmt: skip
        if out is not None:
            rep.write(out)
        bar.update()
    return rep


def _one_pass(model: Any, spec: Any, ids: Tensor, mask: Tensor, blocks: tuple[int, ...]):
    """Every layer's decomposition, and raw and effective patterns of the blocks
    ``[block head q k]`` with their diagnostics, from one forward pass; effective attention
    computed once."""
    from tl_decomp import sources
    from tl_decomp.attention import effective_attention_layers
    from tl_decomp.decompose import DecompositionRecipe
    from tl_decomp.null_space import _null_space

    recipe = DecompositionRecipe.for_model(model)
    names = sources.names_filter(model)  # the decomposition's hooks, values and hook_z
    with _running.exclusive(model):
        cache = _running.run_with_cache(model, ids, mask, names)
    decompositions = tuple(recipe.iter_layers(cache, tokens=ids, attention_mask=mask))
    eff = effective_attention_layers(cache, blocks, model=model, attention_mask=mask)
    raw = torch.stack([cache[spec.blocks[L].pattern][0] for L in blocks]).to(eff.dtype)
    null = _null_space(cache, spec, blocks, mask, eff)
    try:
        nb = torch.stack([sources.norm_based_attention(cache, L, attention_mask=mask)[0]
                          for L in blocks])  # fmt: skip
    except NotImplementedError:  # heads that are not pattern x values (gated, normed): no panel
        nb = None
    return decompositions, raw, eff[:, 0], null, nb


def _mean(t: Tensor) -> int | float:
    """A mean over heads, an int where every head agrees (ranks, dimensions)."""
    return int(t[0]) if bool((t == t[0]).all()) else round(t.double().mean().item(), 2)


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
    text: Any, method: str, n_probes: int, corpus: int, max_tokens: int, query: Any
) -> None:
    """The cheap checks, before any model run."""
    if not isinstance(text, str):
        raise TypeError(f"text must be one str, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty")
    _checks.texts(text, "text")
    _checks.choice(method, "attribution_method", ("estimate", "exact"))
    _checks.integer(n_probes, "n_probes", least=2 if method == "estimate" else None)
    _checks.integer(corpus, "corpus_sentences", least=0)
    _checks.integer(max_tokens, "max_tokens", least=1)
    if query is not None:
        _checks.integer(query, "query")


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
