"""How each sublayer's output becomes factor rows: the labels a granularity gives, a norm
applied with the forward pass's own statistics, the attention term (per layer, head or source
token, value bias split out) and the MLP term (per expert on request). `DecompositionRecipe`
(`tl_decomp.decomposition`) inherits these and walks the blocks.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core.spec import ModelSpec, Norm
from tl_decomp.decomposition._algebra import (
    KINDS,
    Centering,
    Granularity,
    NormMap,
    Rows,
    check_values,
    head_values,
)


class Terms:
    """The algebra of `DecompositionRecipe`, one method per kind of term."""

    spec: ModelSpec
    model: Any
    granularity: Granularity
    centering: Centering
    split_input: bool
    split_correction: bool
    chunk_size: int

    # -- labels -----------------------------------------------------------------------------
    def layout(self, cache: Any = None, n_pos: int | None = None) -> dict[str, str]:
        """Every label the decomposition can hold, with its kind (i, h, f or c). Granularity
        ``source`` has one row per key position: `n_pos`, or counted in the `cache`."""
        spec, g = self.spec, self.granularity
        if g == "source" and n_pos is None:
            n_pos = cache[spec.blocks[0].pattern].shape[-1]
        keys = range(n_pos if g == "source" and n_pos is not None else 0)
        if g == "coarse":
            return {k: k for k in KINDS}
        rows = {label: "i" for label, _ in (spec.embeds if self.split_input else [("input", "")])}
        moe = self.moe_layers if g == "expert" else ()
        for L in range(spec.n_layers):
            if g == "head":
                rows.update({f"L{L}H{h}": "h" for h in range(spec.n_heads)})
            elif g == "source":  # L3H7K5: what head 7 of block 3 read at key position 5
                rows.update({f"L{L}H{h}K{k}": "h" for h in range(spec.n_heads) for k in keys})
            else:
                rows[f"{L}_attn_out"] = "h"
            if L in moe:
                block = adapters.moe_module(self.model, L)
                rows.update({f"{L}_expert{e}": "f" for e in range(block.experts.num_experts)})
                if adapters.shared_module(block) is not None:
                    rows[f"{L}_shared_expert"] = "f"
            elif spec.blocks[L].mlp_out:
                rows[f"{L}_mlp_out"] = "f"
        sources = ("ln_center", "ln_bias", "attn_bias", "mlp_bias")
        rows.update({label: "c" for label in (sources if self.split_correction else ("bias",))})
        return rows

    def _label(self, kind: str, fine: str) -> str:
        if self.granularity == "coarse":
            return kind
        if kind == "c":
            return fine if self.split_correction else "bias"
        return fine

    # -- the algebra ------------------------------------------------------------------------
    def _norm(self, st: Rows, norm: Norm, cache: Any, dt: torch.dtype) -> None:
        """Apply a norm with the forward pass's own mu and sigma to every live term."""
        m = self.sublayer(norm, 1.0, cache, dt)
        for live in st.live():
            m.apply_(live)
        self._post_corrections(st, norm, m, 1.0, cache, dt)

    def sublayer(self, norm: Norm | None, scale: float, cache: Any, dt: torch.dtype) -> NormMap:
        """What a sublayer's output goes through before the residual add: a post-sublayer
        norm (Gemma-2, OLMo-2) with the forward pass's own sigma, then a multiplier (Granite)."""
        if norm is None:
            return NormMap(scale, False)
        gain = scale / cache[norm.scale].to(dt)
        w = None if norm.w is None else norm.w.to(dt)
        return NormMap(gain, not norm.rms and self.centering == "terms", w)

    def _post_corrections(self, st: Rows, norm: Norm | None, m: NormMap, scale: float, cache, dt):
        """A norm's centering and bias (times the sublayer's multiplier), into the correction
        term."""
        if norm is None:
            return
        if not norm.rms and self.centering == "correction":
            first = cache[norm.inputs[0]]
            y = sum(cache[h].to(first.device, dt) for h in norm.inputs)
            st.add(self._label("c", "ln_center"), m.scale(-y.mean(-1, keepdim=True)))
        if norm.b is not None:
            st.add(self._label("c", "ln_bias"), scale * norm.b.to(dt))

    def _attention(self, st: Rows, L: int, cache: Any, dt: torch.dtype) -> None:
        blk = self.spec.blocks[L]
        z = cache[blk.z].to(dt)
        if z.ndim == 3:  # the output projection's input, heads flattened
            z = einops.rearrange(z, "b q (h dh) -> b q h dh", h=self.spec.n_heads)
        W_O = blk.W_O.to(dt)
        post = self.sublayer(blk.attn_post, blk.residual_scale, cache, dt)
        if blk.b_V is not None:
            # z = A (v' + b_V) = A v' + rowsum(A) b_V: split the value bias out exactly.
            rows = einops.rearrange(cache[blk.pattern].to(dt).sum(-1), "b h q -> b q h")
            b_V = blk.b_V.to(dt)
            z = z - rows[..., None] * b_V
            bias = rows @ einops.einsum(b_V, W_O, "h dh, h dh m -> h m")
        else:
            bias = None
        if self.granularity == "head":
            for start in range(0, self.spec.n_heads, self.chunk_size):
                sl = slice(start, start + self.chunk_size)
                heads = [f"L{L}H{h}" for h in range(self.spec.n_heads)[sl]]
                rows = st.claim(heads, z.device)
                zh = einops.rearrange(z[:, :, sl], "b q h dh -> h (b q) dh")
                flat = einops.rearrange(rows, "h b q m -> h (b q) m")
                if flat.device == zh.device:  # straight into the rows: no second copy
                    torch.bmm(zh, W_O[sl], out=flat)
                else:  # computed where the block lives, moved where it is summed
                    flat.copy_(torch.bmm(zh, W_O[sl]))
                post.apply_(rows)
                st.commit(heads, rows)
        elif self.granularity == "source":
            self._sources(st, L, cache, z, post, dt)
        else:
            out = einops.einsum(z, W_O, "b q h dh, h dh m -> b q m")
            st.add(self._label("h", f"{L}_attn_out"), post(out))
        if blk.b_O is not None:
            bias = blk.b_O.to(dt) if bias is None else bias + blk.b_O.to(dt)
        if bias is not None:
            st.add(self._label("c", "attn_bias"), post(bias))
        self._post_corrections(st, blk.attn_post, post, blk.residual_scale, cache, dt)

    def _sources(self, st: Rows, L: int, cache: Any, z: Tensor, post: NormMap, dt) -> None:
        """Each head's bias-free output split by key position, ``A[q, k] (v_k - b_V) W_O``,
        straight into the stack: summed over k, the head's term of granularity ``head``."""
        spec, W_O = self.spec, self.spec.blocks[L].W_O.to(dt)
        a = cache[spec.blocks[L].pattern]
        n = a.shape[-1]
        for start in range(0, spec.n_heads, self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            ac, v = a[:, sl].to(dt), head_values(spec, L, cache, sl, dt)
            check_values(spec, L, ac, v, z[:, :, sl], dt)
            labels = [f"L{L}H{h}K{k}" for h in range(spec.n_heads)[sl] for k in range(n)]
            claimed = st.claim(labels, v.device)
            rows = einops.rearrange(claimed, "(h k) b q m -> h k b q m", k=n)
            vo = einops.einsum(v, W_O[sl], "b k h dh, h dh m -> h k b m")
            weight = einops.rearrange(ac, "b h q k -> h k b q 1")
            if rows.device == vo.device:
                torch.mul(weight, vo[:, :, :, None], out=rows)
            else:
                rows.copy_(weight * vo[:, :, :, None])
            post.apply_(rows)
            st.commit(labels, claimed)

    def _mlp(self, st: Rows, L: int, cache: Any, dt: torch.dtype, routing) -> None:
        blk = self.spec.blocks[L]
        if blk.mlp_out is None:
            return
        post = self.sublayer(blk.mlp_post, blk.residual_scale, cache, dt)
        out = cache[blk.mlp_out].to(dt)
        if self.granularity == "expert" and L in self.moe_layers:
            if routing is None or L not in routing:
                raise ValueError(
                    "granularity='expert' needs the routing each block's experts received, "
                    "which a cache does not hold: use tl_decomp.decompose(model, input, ...)"
                )
            mlp_in = cache[blk.mlp_in]  # type: ignore[index]
            terms, labels = adapters.expert_terms(
                self.model, L, routing[L], mlp_in, cache[blk.mlp_out]
            )
            for label, term in zip(labels, terms, strict=True):
                st.add(label, post(term.to(dt)))
            return
        if blk.b_out is not None:
            b_out = blk.b_out.to(dt)
            out = out - b_out
            st.add(self._label("c", "mlp_bias"), post(b_out))
        st.add(self._label("f", f"{L}_mlp_out"), post(out))
        self._post_corrections(st, blk.mlp_post, post, blk.residual_scale, cache, dt)
