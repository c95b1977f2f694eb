"""What the math knows about a model: norms, blocks and the hooks that hold each activation.

`tl_decomp.adapters._derive.model_spec` fills these in from a model; every other module reads them
and never asks which class or TransformerLens version it got.

A block's residual path, in this vocabulary (each part optional)::

    mid = ln1(x + residual_scale * attn_post(attention))        # ln1: post-LN only (BERT)
    out = ln2(mid + residual_scale * mlp_post(mlp))             # parallel blocks: same sum

Pre-LN blocks' ``ln1``/``ln2`` feed the sublayers and never touch the residual stream, so the
spec leaves them out: the decomposition reads what the sublayers write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

# Relative tolerance of `factors.sum(0)` against the model's own activation (docs/method.md §1.4).
# Half-precision models are decomposed in float32 against their own half-precision states.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# A float64 model whose norm computes in float32 (Hugging Face's RMSNorm) carries float32
# rounding in its own activations from that norm on: exact arithmetic cannot match it closer.
ROUNDED_NORM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Norm:
    """One LayerNorm / RMSNorm site, as the math sees it.

    `inputs` are hooks whose sum is the norm's input (its mean is mu); `scale` holds sigma
    (LayerNorm, eps included) or rms (RMSNorm); `w`/`b` are the effective gain (Gemma's
    ``1 + w`` already added) and bias (None: absent). `rounds`: the model computes this norm
    in float32 whatever its own dtype, so its output carries float32 rounding.
    """

    name: str
    inputs: tuple[str, ...]
    scale: str
    output: str | None
    w: Tensor | None
    b: Tensor | None
    rms: bool
    rounds: bool = False
    eps: float | None = None  # inside sigma; None: the model config's


@dataclass(frozen=True)
class Block:
    """Hooks and weights of one transformer block. `b_V` is per query head (GQA expanded)."""

    z: str
    pattern: str
    v: str
    mlp_out: str | None
    mlp_in: str | None  # the MLP's input up to a per-feature gain (enough for linear fits)
    out: str
    W_O: Tensor
    b_V: Tensor | None
    b_O: Tensor | None
    b_out: Tensor | None
    ln1: Norm | None  # post-LN only: the norms that rescale the residual stream
    ln2: Norm | None
    attn_post: Norm | None = None  # a norm on the attention's output (Gemma-2, OLMo-2)
    mlp_post: Norm | None = None
    residual_scale: float = 1.0  # multiplier on each sublayer's output (Granite)
    window: int | None = None  # keys a query sees, itself included (sliding window); None: all

    def norms(self) -> list[Norm]:
        return [n for n in (self.attn_post, self.ln1, self.mlp_post, self.ln2) if n is not None]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the decomposition and attention math needs to know about a model."""

    model_class: str
    architecture: str
    norm_placement: Literal["pre", "post"]
    norm_type: Literal["LN", "RMS", "none"]
    parallel: bool
    positional: Literal["learned", "rotary", "alibi", "none"]
    token_types: bool
    causal: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    d_vocab: int
    biases: frozenset[str]
    embeds: tuple[tuple[str, str], ...]  # (label, hook), summed into the input term
    embed_ln: Norm | None
    blocks: tuple[Block, ...]
    ln_final: Norm | None  # pre-LN: the norm the unembedding reads
    final: str  # hook holding the final embedding
    dtype: torch.dtype
    # The layer-0 input e^0 [B]: what block 0 reads (BERT: the embedding-LN output; decoders:
    # the summed embeddings). A hook replacing it runs the model from e^0 onward.
    layer0: str
    # The hook holding the summed embeddings (before any embedding norm): the input term.
    input: str = ""
    # Whether the unembedding reads the final embedding directly (no MLM head in between).
    unembed_reads_final: bool = True

    @property
    def kv_head(self) -> tuple[int, ...]:
        """Query head -> the KV head it reads (grouped- and multi-query attention)."""
        group = self.n_heads // self.n_kv_heads
        return tuple(h // group for h in range(self.n_heads))

    def hooks(self, layers: Sequence[int] | None = None, *, attention: bool = False) -> list[str]:
        """Hook names the decomposition (or, with `attention`, effective attention) reads."""
        if attention:
            layers = range(self.n_layers) if layers is None else layers
            return [n for L in layers for n in (self.blocks[L].pattern, self.blocks[L].v)]
        # In forward order, so the first non-finite one names where a NaN began.
        names = [self.input, *(h for _, h in self.embeds)] + self._norm_hooks(self.embed_ln)
        names.append(self.layer0)  # layer 0 of the residual stream
        for blk in self.blocks:
            names += [blk.pattern, blk.z, *self._norm_hooks(blk.attn_post, blk.ln1)]
            names += [blk.mlp_out] if blk.mlp_out else []
            names += [*self._norm_hooks(blk.mlp_post, blk.ln2), blk.out]
        names += [*self._norm_hooks(self.ln_final), self.final]
        return [n for n in dict.fromkeys(names) if n]

    @staticmethod
    def _norm_hooks(*norms: Norm | None) -> list[str]:
        return [h for n in norms if n is not None for h in (*n.inputs, n.scale)]

    def names_filter(self, **kwargs: Any) -> Callable[[str], bool]:
        """A `names_filter` for `run_with_cache` that caches exactly `hooks(**kwargs)`."""
        wanted = frozenset(self.hooks(**kwargs))
        return wanted.__contains__

    def tolerance(self, dtype: torch.dtype, rounded: bool) -> float:
        """Relative tolerance of a decomposition computed in `dtype` against this model's
        activation; `rounded`: a float32-computing norm lies on the way to it."""
        tol = max(TOLERANCE.get(dtype, 1e-4), TOLERANCE.get(self.dtype, 1e-4))
        return max(tol, ROUNDED_NORM_TOLERANCE) if rounded else tol


class InexactDecompositionError(RuntimeError):
    """The factors do not sum to the model's own activation within tolerance.

    Raised instead of returning a wrong number: the model does something on its residual
    path that the spec did not derive. The message names the site and the measured error.
    """


__all__ = ["Block", "InexactDecompositionError", "ModelSpec", "Norm", "TOLERANCE"]
