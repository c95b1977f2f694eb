"""What the math knows about a model: norms, blocks and the hooks that hold each activation.

`tl_decomp.adapters._derive.model_spec` fills these in from a model; every other module reads them
and never asks which class or TransformerLens version it got.

A block's residual path, in this vocabulary (each part optional)::

    mid = ln1(x + residual_scale * attn_post(attention))        # ln1: post-LN only (BERT)
    mid = cross.ln(mid + cross_attention)                       # encoder–decoders' decoder
    out = ln2(mid + residual_scale * mlp_post(mlp))             # parallel blocks: same sum
    out = out_scale * (out + per_layer_input)                   # Gemma-4

`attention` is the token mixer: multi-head attention, or (`mixer`) one that is not attention
(an SSM, a convolution, linear attention), or both side by side (Falcon-H1).

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

    def sigma(self, cache: Any, dtype: torch.dtype) -> Tensor:
        """``[batch pos 1]``: sigma (rms) as the forward pass had it: its `scale` hook, or, for a
        norm without one (`scale` empty: Gemma-4's), computed from its input with `eps`."""
        if self.scale:
            return cache[self.scale].to(dtype)
        if not self.inputs:  # a fixed gain (`Block.out_norm`), not a norm: sigma 1
            return torch.ones((), dtype=dtype)
        x = sum(cache[h].to(dtype) for h in self.inputs)
        x = x if self.rms else x - x.mean(-1, keepdim=True)
        return (x.square().mean(-1, keepdim=True) + (self.eps or 0.0)).sqrt()


@dataclass(frozen=True)
class Cross:
    """A decoder block's cross-attention sublayer: queries from the decoder, keys and values
    from the encoder's output (encoder positions). Read as `Block`'s attention is; `ln`: the
    post-LN norm after it on the residual path (BART), `attn_post`: a norm on its output."""

    z: str
    pattern: str
    v: str
    W_O: Tensor
    b_V: Tensor | None
    b_O: Tensor | None
    ln: Norm | None = None
    attn_post: Norm | None = None
    residual_scale: float = 1.0


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
    # A token mixer that is not attention (SSM, short convolution, linear attention): the hook
    # holding what it adds to the residual stream. Its block then has no pattern, z, v or W_O.
    mixer: str | None = None
    # A second MLP the block adds beside the first (Granite-MoE-hybrid's shared MLP).
    mlp_shared: str | None = None
    # The block rounds the residual stream it carries to float32 (Mamba's residual_in_fp32).
    rounds: bool = False
    cross: Cross | None = None  # cross-attention, between attention and MLP (encoder-decoders)
    # Axis of `v` that holds key positions: 1 for [batch pos head d] (most bridges), 2 for
    # [batch head pos d] (latent attention's hook_v); `values` reads either.
    v_pos_axis: int = 1
    chunk: int | None = None  # attention chunks (Llama 4): keys in the query's own chunk only
    # A branch after the MLP adding a per-layer input to the residual stream (Gemma-4's PLE):
    # the hook holding what it adds, its own post-norm already applied.
    per_layer_input: str | None = None
    out_scale: float = 1.0  # the block's whole output multiplied by this (Gemma-4's layer_scalar)

    def values(self, cache: Any) -> Tensor:
        """``v`` as ``[batch key_pos head_index d_head]``, whatever axis order its hook has."""
        v = cache[self.v]
        return v if self.v_pos_axis == 1 else v.movedim(self.v_pos_axis, 1)

    def heads(self, z: Tensor) -> Tensor:
        """``z`` as ``[batch query_pos head_index d_head]``, split by `W_O`'s own head count and
        value size: a bridge splits it by the query/key head size, which latent attention's
        value heads need not share (DeepSeek: v_head_dim 128, head_dim 64)."""
        n, d = self.W_O.shape[:2]
        return z if z.shape[-2:] == (n, d) else z.flatten(2).unflatten(-1, (n, d))

    @property
    def out_norm(self) -> Norm | None:
        """`out_scale` as a map on the residual stream: a norm with sigma fixed at 1 and gain
        `out_scale`, so every walk over the blocks applies it as it applies a norm."""
        if self.out_scale == 1.0:
            return None
        w = torch.tensor(self.out_scale, dtype=torch.float64)  # broadcast over d_model
        return Norm(self.out.rsplit(".", 1)[0] + ".out_scale", (), "", None, w, None, True)

    def norms(self) -> list[Norm]:
        x = (self.cross.attn_post, self.cross.ln) if self.cross is not None else ()
        return [n for n in (self.attn_post, self.ln1, *x, self.mlp_post, self.ln2) if n is not None]


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
    def kinds(self) -> tuple[str, ...]:
        """The coarse terms, in order: input, attention, [cross-attention,] [mixer,] MLP and
        correction."""
        cross = any(b.cross is not None for b in self.blocks)
        mixer = any(b.mixer is not None for b in self.blocks)
        return ("i", "h", *("x",) * cross, *("m",) * mixer, "f", "c")

    def attention(self, L: int, feature: str) -> Block:
        """Block `L`, which `feature` needs to be attention: a mixer block is refused by name."""
        blk = self.blocks[L]
        if not blk.pattern:
            self.refuse_mixer(L, feature)
        return blk

    def refuse_mixer(self, L: int, feature: str) -> None:
        """`feature` splits over source tokens, which block `L`'s mixer does not expose."""
        blk = self.blocks[L]
        if blk.mixer is not None:
            raise NotImplementedError(
                f"{feature} over a token mixer that is not attention (block {L}'s {blk.mixer} "
                f"of {self.architecture} has no pattern over source tokens) is not supported "
                "by tl_decomp"
            )

    @property
    def kv_head(self) -> tuple[int, ...]:
        """Query head -> the KV head it reads (grouped- and multi-query attention)."""
        group = self.n_heads // self.n_kv_heads
        return tuple(h // group for h in range(self.n_heads))

    def hooks(self, layers: Sequence[int] | None = None, *, attention: bool = False) -> list[str]:
        """Hook names the decomposition (or, with `attention`, effective attention) reads."""
        if attention:  # every attention block, or exactly `layers` (a mixer refused)
            if layers is None:
                layers = [L for L, b in enumerate(self.blocks) if b.pattern]
            blocks = [self.attention(L, "effective attention") for L in layers]
            return [n for b in blocks for n in (b.pattern, b.v)]
        # In forward order, so the first non-finite one names where a NaN began.
        names = [self.input, *(h for _, h in self.embeds)] + self._norm_hooks(self.embed_ln)
        names.append(self.layer0)  # layer 0 of the residual stream
        for blk in self.blocks:
            mixing = [blk.pattern, blk.z] if blk.pattern else []
            names += [*mixing, *([blk.mixer] if blk.mixer else [])]
            names += self._norm_hooks(blk.attn_post, blk.ln1)
            if blk.cross is not None:
                x = blk.cross
                names += [x.pattern, x.z, *self._norm_hooks(x.attn_post, x.ln)]
            names += [h for h in (blk.mlp_out, blk.mlp_shared) if h]
            names += [*self._norm_hooks(blk.mlp_post, blk.ln2)]
            names += [blk.per_layer_input] if blk.per_layer_input else []
            names.append(blk.out)
        names += [*self._norm_hooks(self.ln_final), self.final]
        return [n for n in dict.fromkeys(names) if n]

    @staticmethod
    def _norm_hooks(*norms: Norm | None) -> list[str]:
        return [h for n in norms if n is not None for h in (*n.inputs, n.scale) if h]

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


__all__ = ["Block", "Cross", "InexactDecompositionError", "ModelSpec", "Norm", "TOLERANCE"]
