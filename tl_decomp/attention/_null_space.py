"""How much of each head's attention is not identifiable: ``rank(T)``, the null space's
dimension and ``||A - A_eff||_F / ||A||_F`` per block, example and head (Brunner et al.,
ICLR 2020, section 3; docs/method.md §6). The projection is `tl_decomp.attention`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from tl_decomp._core import convention
from tl_decomp._core.results import Result
from tl_decomp._core.spec import ModelSpec
from tl_decomp._core.threads import serial
from tl_decomp.adapters import StackName
from tl_decomp.attention._effective import (
    BlockOptions,
    allowed_keys,
    cache_source,
    check_attention_cache,
    effective_block,
    masked_pattern,
    rank_tolerance,
    stack_masks,
    value_outputs,
)
from tl_decomp.attention._projection import full_projection


@dataclass(frozen=True, repr=False)
class NullSpace(Result):
    """How much of each head's attention is not identifiable, per block, example and head.

    ``rank`` and ``null_dim`` are those of the keys the example's last valid query sees:
    all its valid keys in bidirectional and causal layers, so ``null_dim = n_keys - rank``.
    In a sliding-window layer no query sees more than ``window`` keys, and a rank over the
    whole example would describe no query's projection: there both describe the last query's
    window (its valid keys among the last ``window`` positions), the kind of key set every
    query past the first ``window`` has; which tokens fill it varies from query to query.

    Attributes:
        blocks: block indices, aligned with the first axis.
        n_keys: valid keys per example.
        rank: ``rank(T)`` over the keys the last valid query sees (tolerance as in
            `effective_attention`).
        null_dim: those keys' count minus ``rank``: the dimension of the left null space of
            ``T`` restricted to them.
        relative_norm: ``||A - A_eff||_F / ||A||_F`` over the entries every query may attend
            to (all of them, not only the last query's).
    """

    blocks: tuple[int, ...]
    n_keys: Int[Tensor, " batch"]
    rank: Int[Tensor, "n_layers batch head_index"]
    null_dim: Int[Tensor, "n_layers batch head_index"]
    relative_norm: Float[Tensor, "n_layers batch head_index"]

    def rows(self) -> list[dict[str, Any]]:
        """One row per block and head, averaged over examples (``pandas.DataFrame(rows)``)."""
        mean = lambda t: t.double().nanmean(0).tolist()  # noqa: E731
        return [
            dict(block=L, head=h, rank=r, null_dim=d, relative_norm=n)
            for i, L in enumerate(self.blocks)
            for h, (r, d, n) in enumerate(
                zip(
                    *map(mean, (self.rank[i], self.null_dim[i], self.relative_norm[i])), strict=True
                )
            )
        ]


def attention_null_space(
    cache: Any,
    blocks: Sequence[int] | None = None,
    *,
    model: Any = None,
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
    value_bias: bool = True,
    preserve_row_sums: bool = False,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
    stack: StackName | None = None,
    cross: bool = False,
    decoder_attention_mask: Shaped[Tensor, "batch decoder_pos"] | None = None,
) -> NullSpace:
    """Per head: ``rank(T)``, the null-space dimension, and ``||A - A_eff||_F / ||A||_F``.

    Options as in `effective_attention` (an encoder–decoder's `stack`, `cross`-attention and
    masks included; ``n_keys`` then counts the encoder's valid positions).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("bert", dtype=torch.float64)  # bidirectional, d_head 8
        >>> from tl_decomp.attention import names_filter
        >>> names = names_filter(model)
        >>> _, cache = model.run_with_cache(torch.arange(5, 17)[None], names_filter=names)
        >>> ns = attention_null_space(cache, [0])
        >>> ns.n_keys.tolist(), ns.rank.tolist(), ns.null_dim.tolist()
        ([12], [[[8, 8, 8, 8]]], [[[4, 4, 4, 4]]])
    """
    _, spec = cache_source(cache, model, stack, cross)
    Ls = convention.blocks(spec, blocks)
    check_attention_cache(cache, spec, Ls)
    opts = BlockOptions(value_bias, preserve_row_sums, rtol, dtype)
    queries, keys = stack_masks(stack, cross, attention_mask, decoder_attention_mask)
    return null_space_from(cache, spec, Ls, queries, None, opts, keys)


def null_space_from(
    cache: Any,
    spec: ModelSpec,
    Ls: Sequence[int],
    attention_mask: Tensor | None,
    effective: Tensor | None,
    opts: BlockOptions | None = None,
    key_mask: Tensor | None = None,
) -> NullSpace:
    """`attention_null_space`, reusing `effective` (``[block batch head q k]`` with the same
    options) where the caller has it already; `key_mask` as `effective_block`'s."""
    opts = opts or BlockOptions()
    ranks, null_dims, norms = [], [], []
    for i, L in enumerate(Ls):
        a = cache[spec.blocks[L].pattern].to(opts.dtype)
        mask = masked_pattern(a, attention_mask)
        square = a.shape[-1] == a.shape[-2] and key_mask is None
        valid = mask if square else masked_pattern(a, key_mask, keys=True)
        blk = spec.blocks[L]
        allowed = allowed_keys(mask, spec.causal, blk.window, blk.chunk, valid)
        a = a.where(allowed, 0.0)
        last = mask.shape[-1] - 1 - mask.flip(-1).int().argmax(-1)  # each example's last query
        keys = allowed[torch.arange(len(last), device=last.device), 0, last]
        u = value_outputs(cache, spec, L, keys, opts)
        with serial():
            rank = full_projection(u, keys, rank_tolerance(opts, spec, keys.sum(-1)))[2]
        ranks.append(rank)
        null_dims.append(keys.sum(-1)[:, None] - rank)
        eff = (
            effective_block(cache, spec, L, mask, opts, None if square else valid)
            if effective is None
            else effective[i]
        )
        diff = (a - eff.to(a.dtype)).flatten(2).norm(dim=-1)
        norms.append(diff / a.flatten(2).norm(dim=-1))
    first = cache[spec.blocks[Ls[0]].pattern]
    square = first.shape[-1] == first.shape[-2] and key_mask is None
    n_keys = masked_pattern(first, attention_mask if square else key_mask, keys=True).sum(-1)
    return NullSpace(
        tuple(Ls), n_keys, torch.stack(ranks), torch.stack(null_dims), torch.stack(norms)
    )


__all__ = ["NullSpace", "attention_null_space"]
