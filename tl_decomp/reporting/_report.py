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


# What a default page draws: sized so that a 30-layer decoder on ~100 tokens gives a page of
# a few MiB in well under a minute that Chromium draws in seconds (benchmarks/bench_report.py);
# every cut is said on the page. Each attention panel is 10 chart.js matrices of query x key
# cells (the head thumbnails and the zoomed head): they, not the bytes, set the browser's time
# and memory. The costs, measured on SmolLM2 on 2 busy CPU cores: attribution 99² x 8 x 1
# (78k) took 49 s, the flow 20² x 30 (12k) 24 s, the rest of a 99-token page 50 s.
ATTENTION_VALUES = 600_000  # numbers in the attention panels (3 per head, query x key)
ATTRIBUTION_COST = 40_000  # tokens² x directions per token x deepest layer (JVP work)
FLOW_COST = 12_000  # tokens² x layers: the token split re-runs every block for every token
SHARE_LAYERS = 6  # layers in the token-by-token shares view (the plot has every layer)


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
    share_layers: Sequence[Layer] | None = None,
    flow: bool | None = None,
    query: int | None = None,
    corpus_sentences: int = 0,
    max_tokens: int = 128,
    progress: bool = True,
) -> Report:
    """Analyse `text` with every method of the library and write one HTML page.

    The defaults keep the page small and quick on any model; what they leave out is listed
    on the page (`Report.left_out`) with the argument that adds it. One forward pass caches
    what the decomposition and effective attention read.

    Args:
        model: a TransformerBridge, HookedTransformer or HookedEncoder.
        text: one short text.
        path: where to write the page; None writes nothing (`Report.write` later).
        model_name: shown on the page; default the model's ``cfg.model_name``.
        attention_blocks: blocks whose raw and effective attention to show; default as many
            as fit ``ATTENTION_VALUES`` numbers, spread from the first block to the last.
        attribution_layers: residual-stream indices (0 .. n_layers, negatives from the end)
            for Hidden Token Attribution; empty skips it. Default: up to 3 layers spread
            over the depth that fits ``ATTRIBUTION_COST`` (the run goes as deep as the
            deepest layer, ``tokens * directions`` JVPs); none where even layer 1 does not.
        attribution_method: ``estimate`` or ``exact`` (``pos * d_model`` JVPs).
        n_probes: random directions per token for ``estimate``.
        share_layers: layers drawn token by token in the shares view; default up to 6,
            spread over the depth (the plot and the table show every layer).
        flow: the routes into the last token's prediction (`information_flow`; an
            encoder's: into `query`); default when it fits ``FLOW_COST``.
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
    if flow is not None and not isinstance(flow, bool):
        raise TypeError(f"flow must be True, False or None, not {flow!r}")
    blocks = None
    if attention_blocks is not None:
        blocks = convention.blocks(spec, attention_blocks, "attention_blocks")
    hta = None if attribution_layers is None else tuple(attribution_layers)
    hta = convention.resolve_many(spec, hta, "attribution_layers") if hta else hta
    shown = tuple(share_layers) if share_layers else None  # empty: the default
    shown = convention.resolve_many(spec, shown, "share_layers") if shown else None
    ids, mask = adapters.tokenize(model, text, encoder=not spec.causal)
    ids, mask = ids.to(adapters.model_device(model)), mask.to(adapters.model_device(model))
    n = ids.shape[1]
    if n > max_tokens:
        raise ValueError(f"the text has {n} tokens; the limit is {max_tokens} (max_tokens)")
    q = n // 2 if query is None else query
    if not -n <= q < n:
        raise ValueError(f"query {q} out of range: the text has {n} tokens")
    left_out: list[str] = []
    plan = _Plan(spec, n, attribution_method, n_probes, left_out)
    blocks = plan.blocks() if blocks is None else blocks
    hta = plan.attribution() if hta is None else hta
    flow = plan.flow() if flow is None else flow
    position = n - 1 if spec.causal else q % n  # the last token's prediction (decoders)
    jobs = {  # the steps of the progress bar
        "decomposition and attention": lambda: _one_pass(model, spec, ids, mask, blocks),
        "identifiability": lambda: _identifiability(model, text, corpus_sentences, progress),
        "attribution": lambda: hidden_token_attribution(
            model, ids, layers=hta, method=attribution_method,
            n_probes=n_probes, progress=progress) if hta else None,
        "flow": lambda: _flow(model, ids, position, spec.causal) if flow else None,
    }  # fmt: skip
    got: dict[str, Any] = {}
    with tqdm(total=len(jobs) + 1, desc="report", disable=not progress) as bar:
        for name, job in jobs.items():
            bar.set_postfix_str(name)
            got[name] = job()
            bar.update()
        bar.set_postfix_str("page")
        decompositions, raw, eff, null, norm_based = got["decomposition and attention"]
        layers = [d.layer for d in decompositions]
        shown = plan.shares(layers) if shown is None else shown
        rep = Report(
            model_name=model_name or str(getattr(model.cfg, "model_name", type(model).__name__)),
            text=text, tokens=token_strings(model, ids[0]),
            causal=spec.causal, decompositions=decompositions, attention_blocks=blocks,
            patterns=raw, effective=eff, null_space=null, norm_based=norm_based,
            identifiability=got["identifiability"][0],
            corpus_identifiability=got["identifiability"][1], attribution=got["attribution"],
            query=q % n, d_head=spec.d_head, seconds=time.perf_counter() - start, meta=_versions(),
            flow=got["flow"], share_layers=tuple(shown), n_blocks=spec.n_layers,
            left_out=tuple(left_out),
        )  # fmt: skip
        if out is not None:
            rep.write(out)
        bar.update()
    return rep


def token_strings(model: Any, ids: Tensor) -> tuple[str, ...]:
    """Each token as the text it stands for (``" keeper"``, not byte-level BPE's
    ``"Ġkeeper"``): the tokenizer's own ``convert_tokens_to_string`` of that one token."""
    tok = model.tokenizer
    return tuple(tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(ids.tolist()))


def _spread(items: Sequence[Any], k: int) -> tuple[Any, ...]:
    """`k` of `items`, evenly spaced, the first and the last included (all when k >= len)."""
    if k >= len(items):
        return tuple(items)
    if k <= 1:
        return (items[-1],) if k == 1 else ()
    return tuple(items[round(i * (len(items) - 1) / (k - 1))] for i in range(k))


class _Plan:
    """The default choices of what to draw, each within its budget; what a choice leaves out
    goes to `left_out`, with the argument (and flag) that adds it."""

    def __init__(self, spec: Any, n: int, method: str, n_probes: int, left_out: list[str]):
        self.spec, self.n, self.left_out = spec, n, left_out
        self.directions = n_probes if method == "estimate" else spec.d_model

    def blocks(self) -> tuple[int, ...]:
        per_block = 3 * self.spec.n_heads * self.n * self.n
        k = max(1, ATTENTION_VALUES // per_block)
        attending = [L for L, b in enumerate(self.spec.blocks) if b.pattern]
        mixing = self.spec.n_layers - len(attending)
        if mixing:
            self.left_out.append(
                f"attention of {mixing} blocks whose token mixer is not attention (no pattern "
                "to draw; their term is in the decomposition)"
            )
        chosen = _spread(attending, k)
        if len(chosen) < len(attending):
            self.left_out.append(
                f"attention of {len(attending) - len(chosen)} of {len(attending)} blocks "
                f"(shown: {', '.join(map(str, chosen))}); attention_blocks=[…] "
                "(--attention-blocks 0,1,2) adds others"
            )
        return chosen

    def attribution(self) -> tuple[int, ...]:
        deepest = min(self.spec.n_layers, ATTRIBUTION_COST // (self.n**2 * self.directions))
        if deepest < 1:
            self.left_out.append(
                f"Hidden Token Attribution ({self.n} tokens × {self.directions} directions "
                "per layer of depth is over the budget); attribution_layers=[1, 2] "
                "(--attribution-layers 1,2) adds it"
            )
            return ()
        if deepest < self.spec.n_layers:
            self.left_out.append(
                f"Hidden Token Attribution beyond layer {deepest} (the run goes as deep as the "
                "deepest layer); attribution_layers=[…] (--attribution-layers 1,-1) adds others"
            )
        return _spread(range(1, deepest + 1), 3)

    def flow(self) -> bool:
        if any(b.mixer for b in self.spec.blocks):
            self.left_out.append(
                "the information flow (a token's share cannot be carried through a token "
                "mixer that is not attention)"
            )
            return False
        if self.n**2 * self.spec.n_layers <= FLOW_COST:
            return True
        self.left_out.append(
            f"the information flow (it re-runs the model once per token: {self.n} runs of "
            f"{self.spec.n_layers} blocks); flow=True (--flow) adds it"
        )
        return False

    def shares(self, layers: Sequence[Layer]) -> tuple[Layer, ...]:
        chosen = _spread(layers, SHARE_LAYERS)
        if len(chosen) < len(layers):
            self.left_out.append(
                f"token-by-token shares of {len(layers) - len(chosen)} of {len(layers)} layers "
                "(the plot and the table have them all); share_layers=[…] "
                "(--share-layers 3,4) adds others"
            )
        return chosen


def _flow(model: Any, ids: Tensor, position: int, causal: bool) -> Any:
    """Routes into `position` (tokens as the page writes them); a decoder's explain the
    logit of its own next-token prediction there, named by its text."""
    import dataclasses

    from tl_decomp.decomposition import information_flow

    tokens = token_strings(model, ids[0])
    if not causal:
        return dataclasses.replace(information_flow(model, ids, position=position), tokens=tokens)
    with torch.no_grad():
        predicted = int(model(ids)[0, position].argmax())
    flow = information_flow(model, ids, position=position, target=predicted)
    shown = token_strings(model, torch.tensor([predicted]))[0]
    return dataclasses.replace(flow, target=shown, tokens=tokens)


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
    if not blocks:  # no attention block (a state-space model): no attention panel
        none = torch.zeros(0, spec.n_heads, ids.shape[1], ids.shape[1])
        return decompositions, none, none, None, None
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
