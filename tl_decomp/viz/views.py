"""circuitsvis views of tl_decomp results: thin adapters, no computation (docs/method.md §9).

Each view takes result objects (and, optionally, the token strings), picks the numbers to
show, and hands them to circuitsvis React components. It returns a `View`, a circuitsvis
`RenderedHTML` that Jupyter displays as any circuitsvis view, but which inlines circuitsvis's
1.3 MB bundle only in the first view a kernel displays (later ones reuse it; the trade-off is
in `tl_decomp.viz`); ``view.local_src`` stays self-contained and ``view.save(path)`` writes
one offline page. `report` mounts the same `Component`s on its own page.

Numbering: ``layer`` is TransformerLens's residual-stream index (`Decomposition.layer`,
`AttributionResult.layers`, `IdentifiabilityResult.layers`): layer 0 is the layer-0 input,
layer ``l`` the output of block ``l - 1``, and ``"final"`` a decoder's final-norm output;
heads keep TransformerLens's block index (``L0H3`` is head 3 of block 0).

Token strings are data: ``ColoredTokens``/``ColoredTokensMulti`` insert each token into the
page as HTML (circuitsvis 1.43 sets ``innerHTML``), so those views pass them HTML-escaped; in
their hover tooltips, which React renders as text, the escapes show as typed (``&lt;``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_decomp._core import convention
from tl_decomp.decomposition import Decomposition, InformationFlow
from tl_decomp.viz._html import Component, View, resend_bundle

if TYPE_CHECKING:
    from tl_decomp.identifiability import AttributionResult, IdentifiabilityResult


def components_html(components: Sequence[Component]) -> View:
    """One `View` of components shown side by side."""
    return View(components)


def _token_strings(ids: Tensor | None, tokens: Sequence[str] | None, n: int) -> list[str]:
    if tokens is None:
        return [str(i) for i in ids.tolist()] if ids is not None else [str(i) for i in range(n)]
    return check_tokens(tokens, n)


def check_tokens(tokens: Any, n: int) -> list[str]:
    """Token strings, one per position: ids or a list of the wrong length are errors."""
    if isinstance(tokens, (str, Tensor)) or not all(isinstance(t, str) for t in tokens):
        raise TypeError(
            "tokens must be a list of token strings (model.to_str_tokens(text)), "
            f"not {type(tokens).__name__}"
        )
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} token strings for {n} positions")
    return list(tokens)


def _escaped(tokens: Sequence[str]) -> list[str]:
    """For the components that insert tokens as HTML (see the module docstring)."""
    return [html.escape(t, quote=False) for t in tokens]


# -- attention ------------------------------------------------------------------------------
def attention_components(
    pattern: Float[Tensor, "head_index query_pos key_pos"],
    effective: Float[Tensor, "head_index query_pos key_pos"],
    tokens: Sequence[str],
    *,
    block: int,
    causal: bool,
    norm_based: Float[Tensor, "head_index query_pos key_pos"] | None = None,
) -> tuple[Component, ...]:
    """The `AttentionHeads` of `attention_view`: raw and effective on one colour scale (zero
    is white), then norm-based attention on its own (it is in activation units)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"block must be the block's own index (0 or more), not {block!r}")
    n = len(tokens)
    raw, eff = pattern[:, :n, :n].double(), effective[:, :n, :n].double()
    bound = max(raw.abs().max().item(), eff.abs().max().item(), 1e-12)
    common = {
        "tokens": list(tokens),
        "attentionHeadNames": [f"L{block}H{h}" for h in range(raw.shape[0])],
        "maxValue": bound,
        "minValue": -bound,
        "maskUpperTri": causal,
    }
    panels = (
        Component("AttentionHeads", {"attention": raw.tolist(), **common}, "raw attention A"),
        Component(
            "AttentionHeads", {"attention": eff.tolist(), **common}, "effective attention A·P"
        ),
    )
    if norm_based is None:
        return panels
    nb = norm_based[:, :n, :n].double()
    scale = {"maxValue": max(nb.max().item(), 1e-12), "minValue": 0.0}
    title = "norm-based attention ‖A f(x)‖ (Kobayashi et al.)"
    return (*panels, Component("AttentionHeads", {"attention": nb.tolist(), **common, **scale},
                               title))  # fmt: skip


def attention_view(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    effective: Float[Tensor, "batch head_index query_pos key_pos"],
    tokens: Sequence[str] | None = None,
    *,
    block: int,
    causal: bool,
    batch: int = 0,
    norm_based: Float[Tensor, "batch head_index query_pos key_pos"] | None = None,
) -> View:
    """Raw and effective attention of every head of block `block`, side by side; with
    `norm_based`, Kobayashi et al.'s norm-based attention as a third panel.

    Args:
        pattern: ``cache["pattern", block]``.
        effective: ``tl_decomp.effective_attention(cache, block)``.
        tokens: the example's token strings (``model.to_str_tokens(text)``); the patterns are
            cropped to their length, which drops right padding. Default: positions.
        block: the block index, for the head names (``L{block}H{h}``).
        causal: mask the upper triangle (decoders); False for bidirectional models.
        batch: which example.
        norm_based: ``tl_decomp.norm_based_attention(cache, block)``: how much of each key's
            value vector reaches each query, ``‖A[q,k] f(x_k)‖``.

    Example:
        >>> from tl_decomp import model_spec, tiny_model
        >>> from tl_decomp.attention import effective_attention
        >>> model = tiny_model("bert")
        >>> _, cache = model.run_with_cache(torch.arange(5, 14)[None],
        ...     names_filter=model_spec(model).names_filter(attention=True))
        >>> view = attention_view(cache["blocks.1.attn.hook_pattern"],
        ...                       effective_attention(cache, 1), block=1, causal=False)
        >>> type(view).__name__
        'View'
    """
    n = pattern.shape[-1] if tokens is None else len(tokens)
    if n > pattern.shape[-1]:
        raise ValueError(f"{n} token strings for {pattern.shape[-1]} positions")
    strings = _token_strings(None, tokens, n)
    nb = None if norm_based is None else norm_based[batch]
    parts = attention_components(pattern[batch], effective[batch], strings, block=block,
                                 causal=causal, norm_based=nb)  # fmt: skip
    return components_html(parts)


# -- decomposition --------------------------------------------------------------------------
def shares_components(
    decompositions: Decomposition | Sequence[Decomposition],
    tokens: Sequence[str] | None = None,
    *,
    batch: int = 0,
) -> tuple[Component]:
    """The `ColoredTokensMulti` of `shares_view`."""
    ds = [decompositions] if isinstance(decompositions, Decomposition) else list(decompositions)
    if not ds:
        raise ValueError("no decompositions to show")
    n = int(ds[0].mask()[batch].sum())
    ids = None if ds[0].tokens is None else ds[0].tokens[batch, :n]
    values, labels = [], []
    for d in ds:
        values.append(d.shares()[:, batch, :n].T)  # [pos factor]
        prefix = "" if len(ds) == 1 else f"{convention.name(d.layer, title=True)}: "
        labels += [prefix + label for label in d.labels]
    props = {
        "tokens": _escaped(_token_strings(ids, tokens, n)),
        "values": torch.cat(values, dim=1).tolist(),
        "labels": labels,
    }
    return (Component("ColoredTokensMulti", props, "share <e, t> / |e|² per token"),)


def shares_view(
    decompositions: Decomposition | Sequence[Decomposition],
    tokens: Sequence[str] | None = None,
    *,
    batch: int = 0,
) -> View:
    """Each token coloured by the share ``<e, t> / ||e||^2`` of one factor (pick it above).

    Args:
        decompositions: one `Decomposition`, or several (``decompose_layers``): the labels
            then read ``layer 3: h`` (layer ``l`` = output of block ``l - 1``).
        tokens: the example's token strings; default: the token ids.
        batch: which example (its padding is dropped).

    Example:
        >>> from tl_decomp import decompose_layers, tiny_model
        >>> ds = decompose_layers(tiny_model("bert"), "the cat sat")
        >>> shares_components(ds)[0].props["labels"][:5]
        ['layer 0: i', 'layer 0: h', 'layer 0: f', 'layer 0: c', 'layer 1: i']
        >>> type(shares_view(ds)).__name__
        'View'
    """
    return components_html(shares_components(decompositions, tokens, batch=batch))


# -- identifiability ------------------------------------------------------------------------
def identifiability_components(
    result: IdentifiabilityResult,
    tokens: Sequence[str] | None = None,
    *,
    sequence: int | None = None,
) -> tuple[Component]:
    """The component of `identifiability_view`."""
    names = [convention.name(L, title=True) for L in result.layers]
    if sequence is None:
        props = {"tokens": names, "values": result.rates.tolist(), "minValue": 0.0,
                 "maxValue": 1.0}  # fmt: skip
        return (Component("ColoredTokens", props, f"identifiability rate ({_how(result)})"),)
    picked = (result.sequences == sequence).nonzero()[:, 0]
    if len(picked) == 0:
        raise ValueError(f"sequence {sequence} is not in the test split: {sorted(result.test)}")
    picked = picked[result.positions[picked].argsort()]
    ids = result.token_ids[picked]
    strings = _token_strings(ids, None if tokens is None else list(tokens), len(picked))
    props = {
        "tokens": _escaped(strings),
        "values": result.correct[:, picked].T.double().tolist(),
        "labels": names,
    }
    return (Component("ColoredTokensMulti", props, f"identified (1) or not (0), {_how(result)}"),)


def _how(result: IdentifiabilityResult) -> str:
    return f"{result.mapping} map, {result.distance}, {result.lookup} lookup"


def identifiability_view(
    result: IdentifiabilityResult,
    tokens: Sequence[str] | None = None,
    *,
    sequence: int | None = None,
) -> View:
    """Identifiability per layer: the rates, or one test sequence's tokens.

    Args:
        result: from `token_identifiability`.
        tokens: token strings of `sequence` (default: the token ids).
        sequence: a corpus index in the test split: each of its tokens coloured 1 where that
            layer identifies it, 0 where not (one button per layer). None: one coloured box
            per layer holding its rate.

    Example:
        >>> from tl_decomp import tiny_model
        >>> from tl_decomp.identifiability import token_identifiability
        >>> res = token_identifiability(tiny_model("bert"), ["the cat sat", "a dog ran",
        ...                             "the mat"], mapping="naive", progress=False)
        >>> identifiability_components(res)[0].props["tokens"]
        ['layer 0', 'layer 1', 'layer 2', 'layer 3']
        >>> type(identifiability_view(res, sequence=res.test[0])).__name__
        'View'
    """
    return components_html(identifiability_components(result, tokens, sequence=sequence))


# -- attribution ----------------------------------------------------------------------------
def attribution_components(
    result: AttributionResult,
    tokens: Sequence[str] | None = None,
    *,
    query: int | None = None,
    batch: int = 0,
) -> tuple[Component]:
    """The component of `attribution_view`."""
    n = int(result.attention_mask[batch].sum())
    strings = _token_strings(result.tokens[batch, :n], tokens, n)
    names = [convention.name(L, title=True) for L in result.layers]
    c = result.contributions[:, batch, :n, :n].double()
    if query is None:
        props = {"attention": c.tolist(), "tokens": strings, "attentionHeadNames": names,
                 "minValue": 0.0, "maxValue": 1.0, "maskUpperTri": False}  # fmt: skip
        return (
            Component(
                "AttentionHeads", props, "c[i, j] per layer: share of token j (column) in e_i (row)"
            ),
        )
    if not -n <= query < n:
        raise ValueError(f"query {query} out of range: the example has {n} tokens")
    props = {"tokens": _escaped(strings), "values": c[:, query].T.tolist(), "labels": names}
    title = f"contributions to the hidden vector of token {query % n} ({strings[query]!r})"
    return (Component("ColoredTokensMulti", props, title),)


def attribution_view(
    result: AttributionResult,
    tokens: Sequence[str] | None = None,
    *,
    query: int | None = None,
    batch: int = 0,
) -> View:
    """Hidden Token Attribution: one query token's contributions, or every layer's matrix.

    Args:
        result: from `hidden_token_attribution`.
        tokens: the example's token strings; default: the token ids.
        query: a position: each token coloured by its contribution to that position's
            hidden vector, one button per layer. None: the contribution matrices
            ``c[i, j]`` (query row, key column), one per layer, as `AttentionHeads`.
        batch: which example.

    Example:
        >>> from tl_decomp import tiny_model
        >>> from tl_decomp.identifiability import hidden_token_attribution
        >>> hta = hidden_token_attribution(tiny_model("bert"), "the cat sat", layers=[0, 3],
        ...                                method="estimate", n_probes=4)
        >>> attribution_components(hta, query=2)[0].props["labels"]
        ['layer 0', 'layer 3']
        >>> type(attribution_view(hta)).__name__
        'View'
    """
    return components_html(attribution_components(result, tokens, query=query, batch=batch))


# -- information flow -----------------------------------------------------------------------
def flow_components(flow: InformationFlow) -> tuple[Component, Component]:
    """The two panels of `flow_view`: the kept routes per block, as attention-style patterns
    (``route[b, i, j]``: the weight of every kept edge ``j -> i`` of block ``b``, heads summed,
    the residual edge on the diagonal), and each input token's contribution at the target
    position per layer."""
    n = len(flow.tokens)
    routes = torch.zeros(flow.attention.shape[0], n, n, dtype=torch.float64)
    for e in flow.edges():
        routes[e["block"], e["destination"], e["source"]] += e["weight"]
    bound = max(routes.abs().max().item(), 1e-12)
    tokens = list(flow.tokens)
    pattern = {
        "tokens": tokens,
        "attention": routes.tolist(),
        "attentionHeadNames": [f"block {b}" for b in range(routes.shape[0])],
        "maxValue": bound,
        "minValue": -bound,
        "maskUpperTri": False,
    }
    what = "logit of " + repr(flow.target) if flow.target is not None else "share"
    contributions = {
        "tokens": _escaped(tokens),
        "values": flow.contributions.T.tolist(),  # [pos layer]
        "labels": [convention.name(L, title=True) for L in range(flow.contributions.shape[0])],
    }
    at = f"{flow.tokens[flow.position]!r} (position {flow.position})"
    return (
        Component("AttentionHeads", pattern, f"routes into {at}, |share| ≥ {flow.threshold:g}"),
        Component("ColoredTokensMulti", contributions, f"each input token's {what} at {at}"),
    )


def flow_view(flow: InformationFlow) -> View:
    """The routes into one position drawn back to the input tokens, beside each input
    token's contribution there at every layer (`tl_decomp.information_flow`).

    Example:
        >>> from tl_decomp import information_flow, tiny_model
        >>> view = flow_view(information_flow(tiny_model("gpt2"), "the cat sat"))
        >>> [c.name for c in view.components]
        ['AttentionHeads', 'ColoredTokensMulti']
    """
    return components_html(flow_components(flow))


__all__ = [
    "Component",
    "View",
    "attention_components",
    "attention_view",
    "attribution_components",
    "attribution_view",
    "components_html",
    "flow_components",
    "flow_view",
    "identifiability_components",
    "identifiability_view",
    "resend_bundle",
    "shares_components",
    "shares_view",
]
