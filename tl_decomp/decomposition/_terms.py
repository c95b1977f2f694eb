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
    Centering,
    Granularity,
    NormMap,
    Rows,
    check_values,
    head_values,
)
from tl_decomp.decomposition._encoder import EncoderFactors, add_composed, encoder_rows


class Terms:
    """The algebra of `DecompositionRecipe`, one method per kind of term."""

    spec: ModelSpec
    model: Any
    granularity: Granularity
    centering: Centering
    split_input: bool
    split_correction: bool
    chunk_size: int
    encoder: Any  # the encoder's recipe, where cross-attention is composed with it

    # -- labels -----------------------------------------------------------------------------
    def layout(self, cache: Any = None, n_pos: int | None = None) -> dict[str, str]:
        """Every label the decomposition can hold, with its kind (i, h, f or c). Granularity
        ``source`` has one row per key position: `n_pos`, or counted in the `cache`."""
        spec, g = self.spec, self.granularity
        if g == "source" and n_pos is None:  # a mixer's term stays whole: no key rows
            n_pos = next((cache[b.pattern].shape[-1] for b in spec.blocks if b.pattern), 0)
        keys = range(n_pos if g == "source" and n_pos is not None else 0)
        if g == "coarse" and self.encoder is None:
            return {k: k for k in spec.kinds}
        if g == "coarse":  # x split by the encoder's own coarse terms
            x = encoder_rows(self.encoder, cache, n_pos)
            return {r: k2 for k in spec.kinds for r, k2 in (x.items() if k == "x" else [(k, k)])}
        inputs = [label for label, _ in spec.embeds] if self.split_input else ["input"]
        if self.split_input and (vision := adapters.input_labels(self.model)) is not None:
            inputs = list(vision)  # the pixels' patches, prefix tokens and positions
        rows = dict.fromkeys(inputs, "i")
        moe = self.moe_layers if g == "expert" else ()
        for L in range(spec.n_layers):
            if spec.blocks[L].mixer is not None:  # alone, or beside the attention (Falcon-H1)
                rows[f"{L}_mixer_out"] = "m"
            if not spec.blocks[L].pattern:
                pass
            elif g == "head":
                rows.update({f"L{L}H{h}": "h" for h in range(spec.n_heads)})
            elif g == "source":  # L3H7K5: what head 7 of block 3 read at key position 5
                rows.update({f"L{L}H{h}K{k}": "h" for h in range(spec.n_heads) for k in keys})
            else:
                rows[f"{L}_attn_out"] = "h"
            if spec.blocks[L].cross is not None:  # an encoder–decoder's decoder block
                rows.update(self._cross_rows(L, cache, n_pos))
            if L in moe:
                block = adapters.moe_module(self.model, L)
                rows.update({f"{L}_expert{e}": "f" for e in range(block.experts.num_experts)})
                if adapters.shared_module(block) is not None:
                    rows[f"{L}_shared_expert"] = "f"
            elif spec.blocks[L].mlp_out:
                rows[f"{L}_mlp_out"] = "f"
            if spec.blocks[L].per_layer_input:
                rows[f"{L}_per_layer_input"] = "f"
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
        gain = scale / norm.sigma(cache, dt)
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
        if blk.mixer is not None:  # alone, or beside the attention (Falcon-H1)
            self._mixer(st, L, cache, dt)
        if not blk.pattern:
            return
        z = blk.heads(cache[blk.z].to(dt))  # split as W_O is, whatever the hook's split
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

    def _mixer(self, st: Rows, L: int, cache: Any, dt: torch.dtype) -> None:
        """A token mixer that is not attention (SSM, convolution): one term, as it is added
        to the residual stream; its state over earlier tokens is not hooked, so no finer split."""
        blk = self.spec.blocks[L]
        post = self.sublayer(blk.attn_post, blk.residual_scale, cache, dt)
        st.add(self._label("m", f"{L}_mixer_out"), post(cache[blk.mixer].to(dt)))  # type: ignore[index]
        self._post_corrections(st, blk.attn_post, post, blk.residual_scale, cache, dt)

    def _cross_rows(self, L: int, cache: Any, n_pos: int | None) -> dict[str, str]:
        """Block `L`'s cross-attention labels (kind x): ``X{L}H{h}`` by head, ``X{L}H{h}K{k}``
        by encoder position ``k`` (counted in the `cache`, else `n_pos`)."""
        g, heads = self.granularity, range(self.spec.n_heads)
        if self.encoder is not None:  # one row per encoder factor, summed over blocks
            return encoder_rows(self.encoder, cache, n_pos)
        if g == "head":
            return {f"X{L}H{h}": "x" for h in heads}
        if g != "source":
            return {f"{L}_cross_out": "x"}
        x = self.spec.blocks[L].cross
        n = cache[x.pattern].shape[-1] if cache is not None and x is not None else n_pos or 0
        return {f"X{L}H{h}K{k}": "x" for h in heads for k in range(n)}

    def _cross_attention(
        self, st: Rows, L: int, cache: Any, dt: torch.dtype, enc: EncoderFactors | None = None
    ) -> None:
        """Block `L`'s cross-attention: decoder queries over the encoder's positions. Its
        values are the encoder's output, an input the decoder receives, so the term is split
        (by head, by encoder position) exactly as self-attention is, or, given `enc`, by the
        encoder's own factors; ``b_V`` and ``b_O`` go to the correction term."""
        x, n_heads = self.spec.blocks[L].cross, self.spec.n_heads
        assert x is not None  # the walk calls this on decoder blocks only
        z = cache[x.z].to(dt)
        if z.ndim == 3:
            z = einops.rearrange(z, "b q (h dh) -> b q h dh", h=n_heads)
        a, W_O = cache[x.pattern].to(dt), x.W_O.to(dt)
        post = self.sublayer(x.attn_post, x.residual_scale, cache, dt)
        bias = None if x.b_O is None else x.b_O.to(dt)
        if x.b_V is not None:  # z = A (v' + b_V) = A v' + rowsum(A) b_V
            rows = einops.rearrange(a.sum(-1), "b h q -> b q h")
            z = z - rows[..., None] * x.b_V.to(dt)
            value_bias = rows @ einops.einsum(x.b_V.to(dt), W_O, "h dh, h dh m -> h m")
            bias = value_bias if bias is None else bias + value_bias
        if enc is not None:
            add_composed(st, self.spec, self.model, L, cache, enc, post, self.chunk_size)
        elif self.granularity == "source":
            v = cache[x.v].to(dt)
            v = v if v.ndim == 4 else einops.rearrange(v, "b k (h dh) -> b k h dh", h=n_heads)
            if v.shape[2] != n_heads:  # grouped-query cross-attention
                v = v[:, :, list(self.spec.kv_head)]
            v = v if x.b_V is None else v - x.b_V.to(dt)
            diff = einops.einsum(a, v, "b h q k, b k h dh -> b q h dh") - z
            err = diff.abs().nan_to_num(0.0).max().item()
            scale = max(z.abs().nan_to_num(0.0).max().item(), 1e-30)
            if err > self.spec.tolerance(dt, True) * scale:
                raise NotImplementedError(
                    f"splitting cross-attention by encoder position on {self.spec.architecture}"
                    f": block {L}'s {x.z} is not {x.pattern} times {x.v} (relative error "
                    f"{err / scale:.2g}) is not supported; granularity='head' splits it exactly"
                )
            n = a.shape[-1]
            for h in range(n_heads):
                labels = [f"X{L}H{h}K{k}" for k in range(n)]
                rows = st.claim(labels, z.device)
                vo = einops.einsum(v[:, :, h], W_O[h], "b k dh, dh m -> k b m")
                weight = einops.rearrange(a[:, h], "b q k -> k b q 1")
                rows.copy_(weight * vo[:, :, None])
                post.apply_(rows)
                st.commit(labels, rows)
        elif self.granularity == "head":
            for h in range(n_heads):
                st.add(f"X{L}H{h}", post(z[:, :, h] @ W_O[h]))
        else:
            out = einops.einsum(z, W_O, "b q h dh, h dh m -> b q m")
            st.add(self._label("x", f"{L}_cross_out"), post(out))
        if bias is not None:
            st.add(self._label("c", "attn_bias"), post(bias))
        self._post_corrections(st, x.attn_post, post, x.residual_scale, cache, dt)

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
        if blk.mlp_shared is not None:  # a second MLP beside the first: one MLP term
            out = out + cache[blk.mlp_shared].to(dt)
        st.add(self._label("f", f"{L}_mlp_out"), post(out))
        self._post_corrections(st, blk.mlp_post, post, blk.residual_scale, cache, dt)

    def _per_layer_input(self, st: Rows, L: int, cache: Any, dt: torch.dtype) -> None:
        """Gemma-4's per-layer-input branch, as it is added to the residual stream (its own
        post-norm applied: the hook holds it).

        Kind ``f``: the branch is a position-wise gated feed-forward map of the residual stream
        after the MLP (``W_proj(act(W_gate x) * p)``, normalised), whose second factor ``p`` is
        the token's per-layer input embedding. It reads the stream, so it is not an input term
        (``i`` holds what no block computed), and it mixes no tokens, so it is not ``h``."""
        hook = self.spec.blocks[L].per_layer_input
        assert hook is not None  # the walk takes this step only where the block has one
        st.add(self._label("f", f"{L}_per_layer_input"), cache[hook].to(dt))
