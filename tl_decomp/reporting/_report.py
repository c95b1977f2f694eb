"""One self-contained HTML page on one text: decomposition, effective attention,
identifiability and Hidden Token Attribution, with the circuitsvis views, plots and tables.

`report` computes a `Report` with the library's own functions and writes its page. The page
opens with no network: the circuitsvis bundle is inlined once (circuitsvis's own ``str()``
loads it from a CDN; its ``local_src`` inlines it once per view), every component's props sit
in one JSON data block, and a Content Security Policy allows only the page's two scripts, by
hash, and no request of any kind. Plots are matplotlib SVG with text drawn as paths. Token
strings and the text are data, escaped wherever they land (`tl_decomp.reporting`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_decomp import adapters
from tl_decomp._core import checks, convention
from tl_decomp._core.convention import Layer
from tl_decomp.reporting._result import Report


def check_path(path: str | os.PathLike[str]) -> Path:
    """`path` if a report can be written there; else ValueError saying why (before any work)."""
    from tl_decomp._core import files

    return files.check_path(path, what="the report")


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
        >>> from tl_decomp import adapters, tiny_model
        >>> rep = report(tiny_model("bert"), "the cat sat on the mat", attribution_layers=[1],
        ...              progress=False)
        >>> rep.tokens
        ('[CLS]', 'the', 'cat', 'sat', 'on', 'the', 'mat', '[SEP]')
        >>> [row["layer"] for row in rep.layer_rows()]
        ['0', '1', '2', '3']
        >>> rep.html().count("var CircuitsVis=")  # the bundle, once
        1
    """
    from tl_decomp.identifiability import hidden_token_attribution

    out = None if path is None else check_path(path)
    start = time.perf_counter()
    spec = adapters.model_spec(model)
    _check_options(text, attribution_method, n_probes, corpus_sentences, max_tokens, query)
    blocks = convention.blocks(spec, attention_blocks, "attention_blocks")
    if attribution_layers is None:
        attribution_layers = range(1, min(3, spec.n_layers) + 1)
    hta = tuple(attribution_layers)  # empty: skipped
    hta = convention.resolve_many(spec, hta, "attribution_layers") if hta else ()
    ids, mask = adapters.tokenize(model, text, encoder=not spec.causal)
    ids, mask = ids.to(adapters.model_device(model)), mask.to(adapters.model_device(model))
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
    from tl_decomp.attention import effective_attention_layers, null_space_from
    from tl_decomp.decomposition import (
        DecompositionRecipe,
        norm_based_attention,
        source_names_filter,
    )

    recipe = DecompositionRecipe.for_model(model)
    names = source_names_filter(model)  # the decomposition's hooks, values and hook_z
    with adapters.exclusive(model):
        cache = adapters.run_with_cache(model, ids, mask, names)
    decompositions = tuple(recipe.iter_layers(cache, tokens=ids, attention_mask=mask))
    eff = effective_attention_layers(cache, blocks, model=model, attention_mask=mask)
    raw = torch.stack([cache[spec.blocks[L].pattern][0] for L in blocks]).to(eff.dtype)
    null = null_space_from(cache, spec, blocks, mask, eff)
    try:
        nb = torch.stack([norm_based_attention(cache, L, attention_mask=mask)[0]
                          for L in blocks])  # fmt: skip
    except NotImplementedError:  # heads that are not pattern x values (gated, normed): no panel
        nb = None
    return decompositions, raw, eff[:, 0], null, nb


def _identifiability(model: Any, text: str, corpus_sentences: int, progress: bool):
    """The text's own tokens with the naive map (the text is its own one-sequence test
    split), and a linear map fitted on shipped corpus sentences when asked."""
    from tl_decomp.identifiability import token_identifiability

    own = token_identifiability(model, [text, text], mapping="naive", test_fraction=0.5,
                                progress=False)  # fmt: skip
    if not corpus_sentences:
        return own, None
    from tl_decomp.datasets import load_corpus

    return own, token_identifiability(model, load_corpus(corpus_sentences), progress=progress)


def _check_options(
    text: Any, method: str, n_probes: int, corpus: int, max_tokens: int, query: Any
) -> None:
    """The cheap checks, before any model run."""
    if not isinstance(text, str):
        raise TypeError(f"text must be one str, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty")
    checks.texts(text, "text")
    checks.choice(method, "attribution_method", ("estimate", "exact"))
    checks.integer(n_probes, "n_probes", least=2 if method == "estimate" else None)
    checks.integer(corpus, "corpus_sentences", least=0)
    checks.integer(max_tokens, "max_tokens", least=1)
    if query is not None:
        checks.integer(query, "query")


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
