"""Effective attention (Brunner et al., ICLR 2020, section 3) as a cache post-processor.

A head writes ``A T`` with ``T = V W_O`` (one output vector per key). Once there are more keys
than ``rank(T) <= d_head``, any ``A + N`` with the rows of ``N`` in the left null space of
``T`` writes the same output, so only ``A_eff = A P`` is identifiable, ``P = T T^+`` being the
projector onto the column space of ``T`` in key space (docs/method.md §6).

Each query row is projected onto exactly the keys it may see: all valid keys of its example
(bidirectional), the valid keys up to itself (causal; the full ``T`` would leak future keys),
or the last ``window`` of those (sliding-window layers: Mistral, Gemma-2/3, GPT-Neo's local
layers; per block, from the model spec). A projection over more keys than the row sees would
move weight onto keys it cannot see. Nothing is shared across examples, heads or rows: not a
rank, not a tolerance. The cached pattern is checked against these key sets, so a spec that
misreads a model's attention raises rather than returning a wrong projection.

This is not TransformerLens 4.x's ``compute_ssm_effective_attention``, the implicit attention
matrix of state-space layers: a different concept under a similar name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core import checks, convention
from tl_decomp._core.spec import ModelSpec
from tl_decomp._core.threads import serial
from tl_decomp.attention._projection import (
    banded,
    causal,
    chunk_ids,
    chunked,
    full_projection,
    windowed,
)


@dataclass(frozen=True)
class BlockOptions:
    value_bias: bool = True
    preserve_row_sums: bool = False
    rtol: float | None = None
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:  # every effective-attention entry point builds one first
        for name in ("value_bias", "preserve_row_sums"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.rtol is not None:
            checks.number(self.rtol, "rtol", low=-1e-300, high=1.0)  # 0 allowed: exact rank
        # QR and SVD have no half-precision kernels, and rank decisions need the digits.
        checks.dtype(self.dtype, "dtype", allowed=(torch.float32, torch.float64))


def effective_attention(
    cache: Any,
    block: int,
    *,
    model: Any = None,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
    value_bias: bool = True,
    preserve_row_sums: bool = False,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
    stack: adapters.StackName | None = None,
    cross: bool = False,
    decoder_attention_mask: Shaped[Tensor, "batch decoder_pos"] | None = None,
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """The identifiable part of ``cache["pattern", block]``: ``A_eff = A P``, row by row.

    Guarantees ``A_eff @ T == A @ T`` (the head's output is unchanged), ``A_eff == A`` on
    every row that sees no more keys than ``rank(T)``, ``A_eff @ P == A_eff``, and zeros at
    masked keys, padded queries, (causal models) future keys and (sliding-window layers)
    keys before the window. Agrees with one SVD of ``T`` per row, over exactly the keys that
    row sees, to rounding (``eps * cond(T)``).

    Raises ValueError where the pattern of a real (unpadded) query disagrees with the key set
    derived for it: weight on a key it cannot see, or no weight from any head on the first
    key it does see (an undeclared sliding window looks like this; not checked on float16
    patterns, whose softmax can underflow). Either means the model's attention is not the one
    the spec describes, or `attention_mask` is not the one the model ran with. A NaN pattern
    raises too (a batch right-padded by a whole window makes Hugging Face's attention NaN).

    Args:
        cache: an ``ActivationCache`` holding ``hook_pattern`` and ``hook_v`` of `block`
            (``names_filter=tl_decomp.attention_names_filter(model)``).
        block: the block whose attention this is, ``0 .. n_layers - 1`` (negative counts
            from the end); heads are named ``L{block}H{head}``.
        model: the model the cache came from; read from the cache when it records it.
        attention_mask: the 1/0 mask the model ran with; None means no padding.
        value_bias: ``T`` from ``hook_v`` as the model computed it (with ``b_V``); False uses
            ``V - b_V``, the paper's bias-free ``X W_V W_O``. On processed weights (compatibility
            mode folds ``b_V`` into ``b_O``) ``T`` is whatever the model holds.
        preserve_row_sums: project onto the column space of ``[T, 1]``: rows still sum to 1
            and the head's output including ``b_V`` is preserved.
        rtol: singular values of ``T`` at most ``rtol * sigma_max`` count as zero. Default
            per row: ``eps(dtype) * max(keys, d_model)``, what ``torch.linalg.matrix_rank``
            uses on that row's ``T`` (``keys x d_model``).
        dtype: compute and output dtype.
        stack: on an encoder–decoder, ``"encoder"`` or ``"decoder"`` (implied by `cross`):
            the stack whose block this is; masks as `tl_decomp.decompose` takes them
            (`attention_mask` the encoder's, `decoder_attention_mask` the decoder's).
        cross: the decoder block's cross-attention (heads ``X{block}H{head}``): queries are
            decoder positions, keys the encoder's valid positions, every row sees all of them.
        decoder_attention_mask: 1/0 mask of the decoder's ids (stack ``"decoder"``).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("gpt2", dtype=torch.float64)  # causal, d_head 8
        >>> names = adapters.model_spec(model).names_filter(attention=True)
        >>> _, cache = model.run_with_cache(torch.arange(5, 17)[None], names_filter=names)
        >>> a, a_eff = cache["pattern", 0], effective_attention(cache, 0)
        >>> bool(torch.equal(a_eff[:, :, :8], a[:, :, :8]))  # rows that see <= 8 keys
        True
        >>> bool((a_eff - a).abs().max() > 1e-3)
        True
    """
    _, spec = cache_source(cache, model, stack, cross)
    L = convention.block(spec, block)
    check_attention_cache(cache, spec, [L])
    options = BlockOptions(value_bias, preserve_row_sums, rtol, dtype)
    queries, keys = stack_masks(stack, cross, attention_mask, decoder_attention_mask)
    return effective_block(cache, spec, L, queries, options, keys)


def effective_attention_layers(
    cache: Any,
    blocks: Sequence[int] | None = None,
    *,
    model: Any = None,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
    value_bias: bool = True,
    preserve_row_sums: bool = False,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
    stack: adapters.StackName | None = None,
    cross: bool = False,
    decoder_attention_mask: Shaped[Tensor, "batch decoder_pos"] | None = None,
) -> Float[Tensor, "n_layers batch head_index query_pos key_pos"]:
    """`effective_attention` of several blocks (all by default), stacked like
    ``cache.stack_activation("pattern")``."""
    _, spec = cache_source(cache, model, stack, cross)
    Ls = convention.blocks(spec, blocks)
    check_attention_cache(cache, spec, Ls)
    opts = BlockOptions(value_bias, preserve_row_sums, rtol, dtype)
    queries, keys = stack_masks(stack, cross, attention_mask, decoder_attention_mask)
    first = effective_block(cache, spec, Ls[0], queries, opts, keys)
    out = first.new_empty(len(Ls), *first.shape)
    out[0] = first
    for i, L in enumerate(Ls[1:], 1):
        out[i] = effective_block(cache, spec, L, queries, opts, keys)
    return out


# -- the projection ---------------------------------------------------------------------------
def effective_block(
    cache: Any,
    spec: ModelSpec,
    L: int,
    mask_arg: Tensor | None,
    opts: BlockOptions,
    key_mask: Tensor | None = None,
) -> Tensor:
    """`key_mask`: the keys' own 1/0 mask where they are another sequence than the queries
    (cross-attention: the encoder's positions)."""
    pattern = cache[spec.blocks[L].pattern]
    a = pattern.to(opts.dtype)
    mask = masked_pattern(a, mask_arg)
    square = a.shape[-1] == a.shape[-2] and key_mask is None
    keys = mask if square else masked_pattern(a, key_mask, keys=True)
    window, chunk = spec.blocks[L].window, spec.blocks[L].chunk
    allowed = allowed_keys(mask, spec.causal, window, chunk, keys)
    _check_pattern(pattern, mask, allowed, L)
    blk = spec.blocks[L]
    adapters.check_finite({f"blocks.{L}.attn.W_O": blk.W_O, blk.v: cache[blk.v]}, keys)
    u = value_outputs(cache, spec, L, keys, opts)  # masked keys are zero rows: outside every span
    a = a.where(allowed, 0.0)  # not a product: a padded query's row can be NaN (no key)
    with serial():
        rows = rank_tolerance(opts, spec, allowed[:, 0].sum(-1))[:, None].expand(a.shape[:-1])
        if spec.causal:  # row t's tolerance counts the valid keys it sees
            if window is not None and a.shape[-1] > window:
                return windowed(u, a, mask, rows, window).mul_(allowed)
            if chunk is not None:
                return chunked(u, a, mask, rows, chunk).mul_(allowed)
            return causal(u, a, mask, rows).mul_(allowed)
        if window is not None and a.shape[-1] > window + 1:  # a band narrower than the text
            return banded(u, a, mask, rows, window).mul_(allowed)
        f, exact, _ = full_projection(u, keys, rank_tolerance(opts, spec, keys.sum(-1)))
        q = u @ f  # orthonormal basis of col(U): P = q q^T
        return torch.where(exact[..., None, None], a, ((a @ q) @ q.mT).mul_(allowed))


def _check_pattern(pattern: Tensor, mask: Tensor, allowed: Tensor, L: int) -> None:
    """Real queries attend to exactly their derived keys: weight outside them means the model
    sees keys the spec did not derive; no head on a row's first derived key (a softmax weight
    is never exactly 0 short of underflow) means it sees fewer, e.g. an undeclared window."""
    nan = pattern.isnan() & mask[:, None, :, None]
    if nan.any():
        b, h, q, _ = nan.nonzero()[0].tolist()
        raise ValueError(
            f"the model's activation blocks.{L}.attn.hook_pattern contains NaN (query {q} of "
            f"example {b}, head {h}): the model itself produced NaN, from NaN weights or input "
            "upstream, or, with a sliding window, a batch padded by at least the window (a "
            "padded query that sees no valid key gets a NaN row from Hugging Face's eager "
            "attention, and the next layer spreads it): pad texts by less"
        )
    seen = pattern != 0
    stray = seen & ~allowed & mask[:, None, :, None]
    if stray.any():
        b, h, q, k = stray.nonzero()[0].tolist()
        raise ValueError(
            f"block {L}: query {q} of example {b} (head {h}) attends to key {k}, which the key "
            "sets derived from the model spec (causal, sliding window, padding) say it cannot "
            "see: the model's attention sees keys the spec did not derive (a sliding window or "
            "local/global layer read wrongly?), or attention_mask is not the one it ran with"
        )
    if torch.finfo(pattern.dtype).tiny > torch.finfo(torch.float32).tiny:
        return  # float16: a weight can underflow to 0
    rows = allowed[:, 0].any(-1)
    first = allowed[:, 0].int().argmax(-1, keepdim=True)  # each row's first derived key
    unseen = rows & ~seen.any(1).take_along_dim(first, -1)[..., 0]
    if unseen.any():
        b, q = unseen.nonzero()[0].tolist()
        raise ValueError(
            f"block {L}: no head attends from query {q} of example {b} to key "
            f"{int(first[b, q])}, the first of the keys the model spec derives for it: the "
            "model's attention sees fewer keys than the spec derived (an undeclared sliding "
            "window or local layer?), or attention_mask is not the one it ran with"
        )


# -- inputs -----------------------------------------------------------------------------------
def value_outputs(cache: Any, spec: ModelSpec, L: int, mask: Tensor, opts: BlockOptions) -> Tensor:
    """U with ``U U'^T = T T'^T`` for ``T = V W_O``: the same column space and singular
    values in ``min(d_head, d_model)`` columns (``W_O = F Q^T`` with Q orthonormal)."""
    blk = spec.blocks[L]
    v = blk.values(cache).to(opts.dtype)  # [batch pos head d]
    if v.shape[2] != spec.n_heads:  # grouped-query attention: each query head's KV head
        v = v[:, :, list(spec.kv_head)]
    if not opts.value_bias and blk.b_V is not None:
        v = v - blk.b_V.to(v)
    f = torch.linalg.qr(blk.W_O.to(v).mT, mode="r").R.mT
    u = einops.einsum(v, f, "b p h dh, h dh k -> b h p k")
    if opts.preserve_row_sums:
        u = torch.cat([u, torch.ones_like(u[..., :1])], dim=-1)
    return u * mask[:, None, :, None]


def rank_tolerance(opts: BlockOptions, spec: ModelSpec, keys: Tensor) -> Tensor:
    """The relative rank tolerance for a T of `keys` rows."""
    if opts.rtol is not None:
        return torch.full(keys.shape, float(opts.rtol), dtype=opts.dtype, device=keys.device)
    width = spec.d_model + opts.preserve_row_sums
    return torch.finfo(opts.dtype).eps * keys.clamp_min(width).to(opts.dtype)


def allowed_keys(
    mask: Tensor,
    causal: bool,
    window: int | None = None,
    chunk: int | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """``[batch 1 query key]``: the entries a query may attend to. Valid keys (`keys`, where
    they are another sequence: cross-attention); causal: up to itself; a sliding window: key
    j for query i when ``i - window < j <= i``, bidirectional ``|i - j| <= window`` (Hugging
    Face's bidirectional sliding window, T5Gemma's encoder); attention chunks: key j in query
    i's chunk, chunks counted from the example's first valid token (Hugging Face's
    ``chunked_overlay`` with its left padding)."""
    keys = mask if keys is None else keys
    allowed = mask[:, None, :, None] & keys[:, None, None, :]
    if not causal:
        if chunk is not None:
            raise NotImplementedError("chunked attention in a bidirectional model")
        if window is not None:
            q, k = (torch.arange(n, device=mask.device) for n in allowed.shape[-2:])
            allowed = allowed & ((q[:, None] - k).abs() <= window)
        return allowed
    n = mask.shape[-1]
    back = torch.arange(n, device=mask.device)[:, None] - torch.arange(n, device=mask.device)
    allowed = allowed & (back >= 0) & (back < (n if window is None else window))
    if chunk is not None:
        ids = chunk_ids(mask, chunk)
        allowed = allowed & (ids[:, None, :, None] == ids[:, None, None, :])
    return allowed


def masked_pattern(a: Tensor, mask: Tensor | None, keys: bool = False) -> Tensor:
    """``[batch pos]`` bool: `mask` checked against the pattern's queries (its keys, with
    `keys`); None means no padding, which a key no query or head attends to contradicts."""
    B, n = a.shape[0], a.shape[-1 if keys else -2]
    if mask is not None:
        if tuple(mask.shape) != (B, n):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; the pattern needs "
                f"[batch pos] = {[B, n]}"
            )
        return checks.mask(mask, torch.Size((B, n))).to(a.device).bool()  # 1/0 only
    unseen = (a == 0).all(1).all(1)  # per key: queries of another sequence are not checked
    if (keys or a.shape[-1] == a.shape[-2]) and unseen.any():
        b, p = unseen.nonzero()[0].tolist()
        raise ValueError(
            f"key {p} of example {b} gets no attention from any query or head: "
            "the batch looks padded; pass the attention_mask it ran with"
        )
    return torch.ones(B, n, dtype=torch.bool, device=a.device)


def cache_source(
    cache: Any, model: Any, stack: adapters.StackName | None = None, cross: bool = False
) -> tuple[Any, ModelSpec]:
    """The model and the spec of the attention asked for (an encoder–decoder's `stack`, its
    decoder's `cross`-attention)."""
    source = adapters.cache_model(cache)
    if model is None and source is None:
        raise ValueError("this cache does not record the model it came from: pass model=")
    if model is not None and source is not None and model is not source:
        raise ValueError("this cache comes from another model than the one passed")
    model = source if model is None else model
    return model, _attention_spec(model, stack, cross)


def _attention_spec(model: Any, stack: adapters.StackName | None, cross: bool) -> ModelSpec:
    if not isinstance(cross, bool):
        raise TypeError(f"cross must be True or False, not {cross!r}")
    if not cross:
        return adapters.model_spec(model) if stack is None else adapters.model_spec(model, stack)
    if stack not in (None, "decoder"):
        raise ValueError(f"cross=True is the decoder's cross-attention, not stack={stack!r}")
    return adapters.cross_spec(adapters.model_spec(model, stack="decoder"))


def stack_masks(
    stack: adapters.StackName | None,
    cross: bool,
    attention_mask: Tensor | None,
    decoder_attention_mask: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """(queries' mask, keys' mask where they are another sequence), from the masks as
    `tl_decomp.decompose` takes them: `attention_mask` the encoder's (or the only stack's),
    `decoder_attention_mask` the decoder's."""
    if cross:  # decoder queries over encoder keys
        return decoder_attention_mask, attention_mask
    if stack == "decoder":
        return decoder_attention_mask, None
    if decoder_attention_mask is not None:
        raise ValueError("decoder_attention_mask is the decoder's: stack='decoder' or cross=True")
    return attention_mask, None


def names_filter(
    model: Any,
    blocks: Sequence[int] | None = None,
    *,
    stack: adapters.StackName | None = None,
    cross: bool = False,
):
    """The ``names_filter`` caching what effective attention (and `attention_null_space`)
    reads: ``hook_pattern`` and ``hook_v`` of `blocks` (all by default); on an
    encoder–decoder, of its `stack` or its decoder's `cross`-attention."""
    spec = _attention_spec(model, stack, cross)
    return spec.names_filter(layers=convention.blocks(spec, blocks), attention=True)


def check_attention_cache(cache: Any, spec: ModelSpec, layers: Sequence[int]) -> None:
    keys = set(cache.keys())
    missing = [h for h in spec.hooks(layers, attention=True) if h not in keys]
    if missing:
        raise ValueError(
            f"the cache lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}, which "
            "effective attention reads; cache them with model.run_with_cache(tokens, "
            "names_filter=tl_decomp.attention_names_filter(model))"
        )


__all__ = [
    "effective_attention",
    "effective_attention_layers",
    "names_filter",
]
