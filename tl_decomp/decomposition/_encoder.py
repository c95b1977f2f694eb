"""A decoder's cross-attention term composed with the encoder's own decomposition.

Once its pattern is fixed, a cross-attention head's bias-free output is linear in what the
encoder hands the decoder, ``A (E W_V) W_O``, ``E`` the encoder's final states. Splitting ``E``
into the encoder's factors (decomposed at the decoder's granularity) splits the term exactly:
one row ``x.<encoder label>`` per encoder factor, summed over the decoder's blocks and heads
(``x.i``, ``x.h``, ``x.f``, ``x.c`` at coarse). ``b_V`` and ``b_O`` stay in the correction
term, as without the split.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core.spec import Cross, ModelSpec
from tl_decomp.decomposition._algebra import NormMap, Rows


class EncoderFactors(NamedTuple):
    """The encoder's decomposition of its final states, every label of its layout present
    (zeros where a term is absent), and the states themselves."""

    factors: Float[Tensor, "factor batch key_pos d_model"]
    labels: tuple[str, ...]
    target: Float[Tensor, "batch key_pos d_model"]


def encoder_rows(encoder: Any, cache: Any, n_pos: int | None) -> dict[str, str]:
    """The composed cross-attention's labels (kind x): ``x.`` and each encoder label (its
    source rows counted over the encoder's positions in `cache`, else `n_pos`)."""
    layout = encoder.layout(cache) if cache is not None else encoder.layout(n_pos=n_pos)
    return {f"x.{label}": "x" for label in layout}


def encoder_factors(encoder: Any, cache: Any, cross: Cross) -> EncoderFactors:
    """Decompose the encoder's final states (what every cross-attention reads) from `cache`.

    Its padding is where no cross-attention puts weight (an encoder position the decoder
    never reads adds exactly nothing), so padded states the encoder leaves non-finite (a
    query that sees no key in a window) are zeroed, not summed."""
    read = cache[cross.pattern].nan_to_num(0.0).sum((1, 2)) > 0  # [batch key_pos]
    d = encoder.decompose(cache, "final", attention_mask=read.long())
    labels = tuple(encoder.layout(cache))
    factors = d.factors.new_zeros((len(labels), *d.factors.shape[1:]))
    index = torch.tensor([labels.index(label) for label in d.labels], device=factors.device)
    factors.index_copy_(0, index, d.factors)
    return EncoderFactors(factors, labels, d.target.to(d.factors.dtype))


def add_composed(
    st: Rows,
    spec: ModelSpec,
    model: Any,
    L: int,
    cache: Any,
    enc: EncoderFactors,
    post: NormMap,
    chunk_size: int,
) -> None:
    """Block `L`'s bias-free cross-attention term, one row per encoder factor, added to the
    rows ``x.<label>`` (summed over blocks). Refused unless the block's values are
    ``E W_V + b_V`` with ``E`` the encoder's final states on this very run."""
    x = spec.blocks[L].cross
    assert x is not None  # the walk calls this on decoder blocks only
    dt = enc.factors.dtype
    W_V, W_O = adapters.cross_values(model, L).to(enc.factors.device, dt), x.W_O.to(dt)
    group = spec.n_heads // W_V.shape[0]  # query head -> its key/value head
    W_V = W_V[[h // group for h in range(spec.n_heads)]]
    _check_values(spec, L, x, cache, enc.target, W_V)
    a = cache[x.pattern].to(enc.factors.device, dt).nan_to_num(0.0)
    for start in range(0, len(enc.labels), chunk_size):
        sl = slice(start, start + chunk_size)
        v = einops.einsum(enc.factors[sl], W_V, "j b k m, h m d -> j b k h d")
        z = einops.einsum(a, v, "b h q k, j b k h d -> j b q h d")
        out = einops.einsum(z, W_O, "j b q h d, h d m -> j b q m")
        for label, row in zip(enc.labels[sl], out, strict=True):
            st.add(f"x.{label}", post(row))


def _check_values(spec: ModelSpec, L: int, x: Cross, cache: Any, E: Tensor, W_V: Tensor) -> None:
    v = cache[x.v].to(E)
    v = v if v.ndim == 4 else einops.rearrange(v, "b k (h d) -> b k h d", d=W_V.shape[-1])
    if v.shape[2] != spec.n_heads:  # grouped-query cross-attention
        v = v[:, :, list(spec.kv_head)]
    want = einops.einsum(E, W_V, "b k m, h m d -> b k h d")
    want = want if x.b_V is None else want + x.b_V.to(want)
    read = (cache[x.pattern].nan_to_num(0.0) > 0).any(1).any(1)  # positions the decoder reads
    err = (v - want)[read].abs().max().item()
    scale = max(v[read].abs().max().item(), 1e-30)
    if not err <= spec.tolerance(E.dtype, True) * scale:
        raise NotImplementedError(
            f"composing cross-attention with the encoder on {spec.architecture}: decoder "
            f"block {L}'s values {x.v} are not the encoder's final states times W_V (relative "
            f"error {err / scale:.2g}) is not supported by tl_decomp; cross=None is exact"
        )


def check_cross_keys(spec: ModelSpec, cache: Any, mask: Tensor) -> None:
    """Refuse a cache whose cross-attention weighs an encoder position `mask` (the encoder's
    attention mask) calls padding: it was run with another mask than the one given."""
    for L, blk in enumerate(spec.blocks):
        if blk.cross is None:
            continue
        a = cache[blk.cross.pattern].nan_to_num(0.0)  # [batch head query key]
        padded = ~mask.bool().to(a.device)[:, None, None, :]
        leak = a.masked_fill(~padded, 0.0).abs().max().item()
        if leak > 1e-6:
            raise ValueError(
                f"decoder block {L}'s cross-attention gives padded encoder positions weight up "
                f"to {leak:.2g}: this cache was not run with this attention_mask; pass the "
                "encoder mask it was run with"
            )
