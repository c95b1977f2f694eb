"""The attention term split by source token, reduced while it is built.

Granularity ``source`` of `tl_decomp.decomposition` splits each head's term by the key position
it read, as the authors' code (bert-splat) splits ``h`` by layer x head x attended token::

    L3H7 = sum_k L3H7K<k>,    L3H7K<k> at query q = A[q, k] (v_k - b_V) W_O^7

carried through every later norm like any term. That stack holds ``n_heads x pos^2 x
d_model`` numbers per block. The functions here compute per-source norms, shares and logits
of one block without it: one chunk of heads at a time, each a bilinear form in the head's
per-key output ``u_k = (v_k - b_V) W_O^h`` and the per-position gain ``G`` the later norms
apply (``||G (A u_k)|| = A ||G u_k||``, ``<G (A u_k), e> = A <u_k, G e>``). Their memory is
the ``[batch head_index query_pos key_pos]`` result plus one chunk's ``u``, whatever the
number of heads. They agree with the materialised stack's rows to rounding.

Every function reads a cache holding what the ``source`` recipe reads
(``names_filter=tl_decomp.source_names_filter(model)``).
Each checks that ``hook_z`` is ``pattern @ hook_v`` and raises NotImplementedError otherwise
(output gates, norms between the heads and ``W_O``): a split by key position would silently
be wrong there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import einops
import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core import checks, convention
from tl_decomp._core.convention import Layer
from tl_decomp.decomposition._algebra import check_values, head_values
from tl_decomp.decomposition._logit import token_columns
from tl_decomp.decomposition._recipe import DecompositionRecipe

Kernel = Callable[[Tensor], Tensor]  # u [batch head key d_model] -> [batch head query|1 key]


def norm_based_attention(
    cache: Any,
    block: int,
    *,
    model: Any = None,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
    value_bias: bool = True,
    chunk_size: int = 4,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """Norm-based attention: ``||A[q, k] f(x_k)||`` per head, query and key.

    Kobayashi, Kuribayashi, Yokoi & Inui, *Attention is Not Only a Weight: Analyzing
    Transformers with Vector Norms*, EMNLP 2020: ``f(x) = (x W_V + b_V) W_O^h`` is what head
    ``h`` moves from key ``k``, and ``||A[q, k] f(x_k)||`` how much of it reaches query ``q``.
    Their ``f`` includes the value bias, so `value_bias` defaults to True; False gives the
    norms of the decomposition's ``L{block}H{h}K{k}`` rows at the block's own output on a
    model with nothing after its heads (pre-LN, no post-sublayer norm or multiplier).

    Guarantees ``result == A * ||f(x_k)||`` (A is non-negative), zero at padded queries and
    keys (with `attention_mask`) and wherever the pattern is zero (future keys of causal
    models, keys outside a sliding window).

    Args:
        cache: an ``ActivationCache`` holding block `block`'s ``hook_pattern``, ``hook_v`` and
            ``hook_z`` (e.g. ``names_filter=tl_decomp.source_names_filter(model)``).
        block: block index (negative counts from the end).
        model: the model the cache came from; read from the cache when it records it.
        attention_mask: the 1/0 mask the model ran with; None means no padding.
        value_bias: ``f`` with ``b_V`` (the paper); False: ``f(x) = x W_V W_O^h``.
        chunk_size: heads held at once; memory beyond the result grows with it, not with
            the number of heads.
        dtype: compute and output dtype.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("gpt2", dtype=torch.float64)
        >>> names = names_filter(model)
        >>> _, cache = model.run_with_cache(torch.arange(5, 11)[None], names_filter=names)
        >>> nba = norm_based_attention(cache, 0)
        >>> tuple(nba.shape), bool((nba[0, :, 2, 3:] == 0).all())  # causal: no future keys
        ((1, 4, 6, 6), True)
    """
    recipe, L = _source(cache, model, block, dtype, everything=False)

    def kernel(u: Tensor) -> Tensor:
        return u.norm(dim=-1)[:, :, None]

    return _stream(cache, recipe, L, attention_mask, chunk_size, value_bias, kernel)


def source_norms(
    cache: Any,
    block: int,
    *,
    layer: Layer = "final",
    model: Any = None,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
    chunk_size: int = 4,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """``||L{block}H{h}K{k}||`` at each query position: the norm of each source term as the
    decomposition at `layer` holds it (``decompose(..., granularity="source", layer=layer)``),
    through every later norm. Arguments as in `source_shares`.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("bert", dtype=torch.float64)
        >>> names = names_filter(model)
        >>> _, cache = model.run_with_cache(torch.arange(5, 11)[None], names_filter=names)
        >>> tuple(source_norms(cache, 1, layer=2).shape)
        (1, 4, 6, 6)
    """
    recipe, L = _source(cache, model, block, dtype)
    g2 = _gain(recipe, cache, L, layer).square()

    def kernel(u: Tensor) -> Tensor:
        return einops.einsum(u.square(), g2, "b h k m, b q m -> b h q k").sqrt()

    return _stream(cache, recipe, L, attention_mask, chunk_size, False, kernel)


def source_shares(
    cache: Any,
    block: int,
    *,
    layer: Layer = "final",
    model: Any = None,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
    chunk_size: int = 4,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """The share ``<t, e> / ||e||^2`` of each source term ``t = L{block}H{h}K{k}`` in the
    hidden state ``e`` at `layer`: which token each head moved into each position, and how
    much of that position's state it is (Mickus et al.'s statistic, split by source).

    Guarantees ``result[b, h, q, k] == decompose(..., granularity="source", layer=layer)
    .shares()[row of L{block}H{h}K{k}, b, q]`` (centering ``correction``) to rounding,
    summed over keys the head's share, and zero at padded queries and keys.

    Args:
        cache: an ``ActivationCache`` holding what the ``source`` recipe reads
            (``names_filter=tl_decomp.source_names_filter(model)``).
        block: the block whose attention to split (negative counts from the end).
        layer: the residual-stream index the state is read at, after `block` (``block + 1``
            .. ``n_layers``, negatives from the end), or ``"final"``: the final embedding.
        model: the model the cache came from; read from the cache when it records it.
        attention_mask: the 1/0 mask the model ran with; None means no padding.
        chunk_size: heads held at once; memory beyond the result grows with it only.
        dtype: compute and output dtype.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("gpt2", dtype=torch.float64)
        >>> names = names_filter(model)
        >>> _, cache = model.run_with_cache(torch.arange(5, 11)[None], names_filter=names)
        >>> shares = source_shares(cache, 0, layer=1)  # [batch head query key]
        >>> (b, h, q, k), = (shares == shares.max()).nonzero().tolist()
        >>> f"head {h} moved token {k} into position {q}"
        'head ... moved token ... into position ...'
    """
    recipe, L = _source(cache, model, block, dtype)
    e = cache[convention.site(recipe.spec, convention.resolve(recipe.spec, layer))].to(dtype)
    w = _gain(recipe, cache, L, layer) * e / e.square().sum(-1, keepdim=True)

    def kernel(u: Tensor) -> Tensor:
        return einops.einsum(u, w, "b h k m, b q m -> b h q k")

    return _stream(cache, recipe, L, attention_mask, chunk_size, False, kernel)


def source_logit_attribution(
    cache: Any,
    block: int,
    tokens: Any,
    incorrect: Any = None,
    *,
    model: Any = None,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
    chunk_size: int = 4,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """Each source term's direct logit for `tokens` (minus `incorrect`'s) at the final
    embedding: how much head ``h`` moving token ``k`` into position ``q`` raises the logit.

    Guarantees ``result[b, h, q, k] == decompose(..., granularity="source").logit_attrs(
    tokens, incorrect).values[row of L{block}H{h}K{k}, b, q]`` to rounding. `tokens` and
    `incorrect` as in `tl_decomp.logit_attribution`; other arguments as in `source_shares`.
    Raises NotImplementedError where a head lies between the final embedding and the
    unembedding (BERT's MLM transform).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("gpt2", dtype=torch.float64)
        >>> names = names_filter(model)
        >>> _, cache = model.run_with_cache(torch.arange(5, 11)[None], names_filter=names)
        >>> tuple(source_logit_attribution(cache, -1, 13).shape)
        (1, 4, 6, 6)
    """
    recipe, L = _source(cache, model, block, dtype)
    model, spec = recipe.model, recipe.spec
    if not spec.unembed_reads_final:
        raise NotImplementedError(
            f"logit attribution on {spec.architecture}: a head lies between the final "
            "embedding and the unembedding"
        )
    W_U = model.W_U.detach().to(dtype)
    shape = cache[spec.final].shape[:2]
    direction = token_columns(model, W_U, tokens, shape)
    if incorrect is not None:
        direction = direction - token_columns(model, W_U, incorrect, shape)
    w = _gain(recipe, cache, L, "final") * direction

    def kernel(u: Tensor) -> Tensor:
        return einops.einsum(u, w, "b h k m, b q m -> b h q k")

    return _stream(cache, recipe, L, attention_mask, chunk_size, False, kernel)


def names_filter(model: Any) -> Callable[[str], bool]:
    """The ``names_filter`` caching what every function here reads: what
    ``decompose(..., granularity="source")`` reads (pattern, values, ``hook_z``, norms, states).
    """
    return DecompositionRecipe.for_model(model, granularity="source").names_filter


# -- the stream ------------------------------------------------------------------------------
def _stream(
    cache: Any,
    recipe: DecompositionRecipe,
    L: int,
    attention_mask: Tensor | None,
    chunk: int,
    value_bias: bool,
    kernel: Kernel,
) -> Tensor:
    """``A[b, h, q, k] * kernel(u)[b, h, q, k]`` for ``u_k = v_k W_O^h`` (``b_V`` removed
    unless `value_bias`), one chunk of heads at a time, zero at padded queries and keys."""
    checks.integer(chunk, "chunk_size", least=1)
    if not isinstance(value_bias, bool):
        raise TypeError(f"value_bias must be True or False, not {value_bias!r}")
    spec, dt, blk = recipe.spec, recipe.compute_dtype(), recipe.spec.blocks[L]
    pattern, W_O = cache[blk.pattern], blk.W_O.to(dt)
    z = blk.heads(cache[blk.z])  # split as W_O is, whatever the hook's split
    mask = _mask(pattern, attention_mask)
    allowed = mask[:, None, :, None] & mask[:, None, None, :]
    out = pattern.new_zeros(pattern.shape, dtype=dt)
    for start in range(0, spec.n_heads, chunk):
        sl = slice(start, start + chunk)
        a, v = pattern[:, sl].to(dt), head_values(spec, L, cache, sl, dt, value_bias=True)
        check_values(spec, L, a, v, z[:, :, sl].to(dt), dt)
        if not value_bias and blk.b_V is not None:
            v = v - blk.b_V[sl].to(dt)
        u = einops.einsum(v, W_O[sl], "b k h dh, h dh m -> b h k m")
        out[:, sl] = (a * kernel(u)).where(allowed, 0.0)  # where: padded rows may be NaN
    return out


def _gain(recipe: DecompositionRecipe, cache: Any, L: int, layer: Any) -> Tensor:
    """``[batch pos d_model]``: the gain block `L`'s head outputs get on their way to `layer`
    (its post-sublayer norm and multiplier, then every later norm with the forward pass's own
    scale), as the recipe applies it with centering ``correction``."""
    spec, dt, blk = recipe.spec, recipe.compute_dtype(), recipe.spec.blocks[L]
    layer = convention.resolve(spec, layer)
    end = convention.depth(spec, layer)  # blocks run before `layer`
    if end <= L:
        raise ValueError(f"layer {layer} comes before block {L}'s attention: pass a later one")
    blocks = spec.blocks[L : min(end, spec.n_layers)]
    norms = [n for b in blocks for n in (b.ln1, b.ln2, b.out_norm)]  # out_norm: a layer scalar
    norms += [spec.ln_final] if layer == "final" else []
    like = cache[blk.out]
    gain = recipe.sublayer(blk.attn_post, blk.residual_scale, cache, dt).gain
    gain = torch.ones(like.shape, dtype=dt, device=like.device) * gain
    for norm in norms:
        if norm is not None:
            gain = gain * recipe.sublayer(norm, 1.0, cache, dt).gain
    return gain


# -- inputs ----------------------------------------------------------------------------------
def _source(
    cache: Any, model: Any, block: int, dtype: torch.dtype, everything: bool = True
) -> tuple[DecompositionRecipe, int]:
    """A ``source`` recipe (centering ``correction``) for the model `cache` came from, and the
    block index, once the cache is checked to hold what is read: the block's pattern, values
    and ``hook_z``, and with `everything` the norms and states the recipe reads."""
    source = adapters.cache_model(cache)
    if model is None and source is None:
        raise ValueError("this cache does not record the model it came from: pass model=")
    if model is not None and source is not None and model is not source:
        raise ValueError("this cache comes from another model than the one passed")
    model = source if model is None else model
    recipe = DecompositionRecipe.for_model(model, granularity="source", dtype=dtype)
    L = convention.block(recipe.spec, block)
    blk = recipe.spec.attention(L, "splitting heads by key position")
    keys = set(cache.keys())
    missing = [h for h in (recipe.hooks if everything else [blk.pattern, blk.v, blk.z])]
    missing = [h for h in missing if h not in keys]
    if missing:
        raise ValueError(
            f"the cache lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}, which the "
            "split by source reads; cache them with model.run_with_cache(tokens, "
            "names_filter=tl_decomp.source_names_filter(model))"
        )
    return recipe, L


def _mask(pattern: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``[batch pos]`` bool: the real positions (all of them without `attention_mask`)."""
    B, _, n, _ = pattern.shape
    if attention_mask is None:
        return torch.ones(B, n, dtype=torch.bool, device=pattern.device)
    if tuple(attention_mask.shape) != (B, n):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; the cache needs "
            f"[batch pos] = {[B, n]}"
        )
    return checks.mask(attention_mask, torch.Size((B, n))).to(pattern.device).bool()


__all__ = [
    "names_filter",
    "norm_based_attention",
    "source_logit_attribution",
    "source_norms",
    "source_shares",
]
