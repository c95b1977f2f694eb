"""Exact vector-factor decomposition of hidden states (Mickus et al., TACL 2022).

Every hidden state is rewritten as ``e = i + h + f + c``: input embeddings, bias-free
attention heads, bias-free feed-forward outputs, and a correction term holding every bias and
every LayerNorm centering. LayerNorm is linear once the forward pass has fixed mu and sigma,
so each term is carried through every later norm exactly (SPEC section 1).

The stack is built from raw hooks (``hook_z``, MLP outputs, every norm's input and scale),
never from ``hook_attn_out``/``hook_resid_mid``, which hold no additive terms on BERT.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_decomp import _adapters, _checks, _experts, _layers, _running
from tl_decomp._algebra import KINDS, Map, Rows, Stack
from tl_decomp._algebra import check_values as _check_values  # noqa: F401  # sources.py
from tl_decomp._algebra import head_values as _head_values
from tl_decomp._layers import Layer
from tl_decomp._repr import short_repr
from tl_decomp._spec import InexactDecompositionError, ModelSpec, Norm

Granularity = Literal["coarse", "layer", "head", "source", "expert"]
Centering = Literal["correction", "terms"]


@dataclass(frozen=True)
class Decomposition:
    """``factors.sum(0) == target`` up to `max_abs_error`, measured when it was built.

    Attributes:
        factors: the terms, ``[factor batch pos d_model]``; ``labels[k]`` names ``factors[k]``.
        labels: TransformerLens-style names (``embed``, ``L3H7``, ``3_mlp_out``, ``bias``).
        kinds: the paper's term each factor belongs to: ``i``, ``h``, ``f`` or ``c``.
        target: the model's own activation at `site`.
        site: the hook the target was read from.
        layer: the residual-stream index (0 = the layer-0 input, ``l`` = the output of block
            ``l - 1``) or ``"final"`` (a decoder's final-norm output), as TransformerLens's
            ``accumulated_resid`` numbers them.
        tokens, attention_mask: the input (mask 1 = real token, 0 = padding).
        max_abs_error: ``max |factors.sum(0) - target|`` over every position, padding included.
    """

    __repr__ = short_repr

    factors: Float[Tensor, "factor batch pos d_model"]
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    target: Float[Tensor, "batch pos d_model"]
    site: str
    layer: Layer
    tokens: Int[Tensor, "batch pos"] | None
    attention_mask: Int[Tensor, "batch pos"] | None
    max_abs_error: float
    centering: Centering = "correction"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def relative_error(self) -> float:
        """`max_abs_error` divided by ``max |target|``."""
        return self.max_abs_error / max(self.target.abs().max().item(), 1e-30)

    def coarse(self) -> Decomposition:
        """The same decomposition summed into the paper's four terms ``i, h, f, c``."""
        index = torch.tensor([KINDS.index(k) for k in self.kinds], device=self.factors.device)
        out = self.factors.new_zeros((4, *self.factors.shape[1:]))
        out.index_add_(0, index, self.factors)
        return replace(self, factors=out, labels=KINDS, kinds=KINDS)

    def shares(self) -> Float[Tensor, "factor batch pos"]:
        """The paper's statistic ``<e, t> / ||e||^2`` per factor (signed; sums to 1)."""
        e = self.target.to(self.factors.dtype)
        return (self.factors * e).sum(-1) / (e * e).sum(-1).clamp_min(1e-30)

    def norm_ratios(self) -> Float[Tensor, "factor batch pos"]:
        """``||t|| / ||e||`` per factor (Mickus & Vazquez 2023)."""
        e = self.target.to(self.factors.dtype)
        return self.factors.norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-30)

    def cosines(self) -> Float[Tensor, "factor batch pos"]:
        """``cos(t, e)`` per factor."""
        e = self.target.to(self.factors.dtype)
        return torch.nn.functional.cosine_similarity(self.factors, e.unsqueeze(0), dim=-1)

    def logit_attrs(self, tokens: Any, incorrect: Any = None) -> Any:
        """Each factor's logit for `tokens` (minus `incorrect`'s): exact for the final
        embedding, the decomposed logit lens at a block output. See
        `tl_decomp.logit.logit_attribution`."""
        from tl_decomp.logit import logit_attribution

        return logit_attribution(self, tokens, incorrect)

    def mask(self) -> Tensor:
        """Boolean ``[batch pos]``: the real (unpadded) positions."""
        if self.attention_mask is None:
            return torch.ones(self.target.shape[:2], dtype=torch.bool)
        return self.attention_mask.bool()


@dataclass(frozen=True)
class DecompositionRecipe:
    """Turns a cache into `Decomposition`s; its `names_filter` caches exactly what it reads.

    For users who run the model themselves::

        recipe = DecompositionRecipe.for_model(model, granularity="head")
        _, cache = model.run_with_cache(tokens, names_filter=recipe.names_filter)
        d = recipe.decompose(cache, layer=3)
    """

    spec: ModelSpec
    model: Any = field(compare=False, repr=False)
    granularity: Granularity = "coarse"
    centering: Centering = "correction"
    split_input: bool = False
    split_correction: bool = False
    dtype: torch.dtype | None = None
    chunk_size: int = 16

    @classmethod
    def for_model(cls, model: Any, **options: Any) -> DecompositionRecipe:
        """A recipe for `model`; raises `NotImplementedError` on unsupported architectures."""
        recipe = cls(spec=_adapters.model_spec(model), model=model, **options)
        if recipe.granularity not in ("coarse", "layer", "head", "source", "expert"):
            raise ValueError(
                "granularity must be coarse, layer, head, source or expert, "
                f"not {recipe.granularity!r}"
            )
        if recipe.granularity == "expert" and not recipe.moe_layers:
            raise ValueError("granularity='expert' needs a mixture-of-experts model")
        if recipe.centering not in ("correction", "terms"):
            raise ValueError(f"centering must be 'correction' or 'terms', not {recipe.centering!r}")
        _checks.dtype(recipe.dtype)
        _checks.integer(recipe.chunk_size, "chunk_size", least=1)
        return recipe

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Blocks whose MLP is a mixture of experts (split by expert on request)."""
        return tuple(L for L in range(self.spec.n_layers) if _experts.moe_module(self.model, L))

    @property
    def hooks(self) -> list[str]:
        if self.granularity == "source":  # the values each head reads, key by key
            return self.spec.hooks() + [blk.v for blk in self.spec.blocks]
        if self.granularity != "expert":
            return self.spec.hooks()
        extra = [self.spec.blocks[L].mlp_in for L in self.moe_layers]
        return self.spec.hooks() + extra  # type: ignore[operator]  # MoE blocks have mlp_in

    @property
    def names_filter(self):
        return frozenset(self.hooks).__contains__

    def compute_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        if self.spec.dtype in (torch.float16, torch.bfloat16):
            warnings.warn(
                f"model is {self.spec.dtype}; tl_decomp computes the decomposition in float32",
                stacklevel=3,
            )
            return torch.float32
        return self.spec.dtype

    # -- labels -----------------------------------------------------------------------------
    def _layout(self, cache: Any = None) -> dict[str, str]:
        """Every label the decomposition can hold, with its kind (i, h, f or c). Granularity
        ``source`` has one row per key position, so it needs the `cache` to count them."""
        spec, g = self.spec, self.granularity
        keys = range(cache[spec.blocks[0].pattern].shape[-1] if g == "source" else 0)
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
                block = _experts.moe_module(self.model, L)
                rows.update({f"{L}_expert{e}": "f" for e in range(block.experts.num_experts)})
                if _experts.shared_module(block) is not None:
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
        m = self._sublayer(norm, 1.0, cache, dt)
        for live in st.live():
            m.apply_(live)
        self._post_corrections(st, norm, m, 1.0, cache, dt)

    def _sublayer(self, norm: Norm | None, scale: float, cache: Any, dt: torch.dtype) -> Map:
        """What a sublayer's output goes through before the residual add: a post-sublayer
        norm (Gemma-2, OLMo-2) with the forward pass's own sigma, then a multiplier (Granite)."""
        if norm is None:
            return Map(scale, False)
        gain = scale / cache[norm.scale].to(dt)
        w = None if norm.w is None else norm.w.to(dt)
        return Map(gain, not norm.rms and self.centering == "terms", w)

    def _post_corrections(self, st: Rows, norm: Norm | None, m: Map, scale: float, cache, dt):
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
        post = self._sublayer(blk.attn_post, blk.residual_scale, cache, dt)
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

    def _sources(self, st: Rows, L: int, cache: Any, z: Tensor, post: Map, dt) -> None:
        """Each head's bias-free output split by key position, ``A[q, k] (v_k - b_V) W_O``,
        straight into the stack: summed over k, the head's term of granularity ``head``."""
        spec, W_O = self.spec, self.spec.blocks[L].W_O.to(dt)
        a = cache[spec.blocks[L].pattern]
        n = a.shape[-1]
        for start in range(0, spec.n_heads, self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            ac, v = a[:, sl].to(dt), _head_values(spec, L, cache, sl, dt)
            _check_values(spec, L, ac, v, z[:, :, sl], dt)
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
        post = self._sublayer(blk.mlp_post, blk.residual_scale, cache, dt)
        out = cache[blk.mlp_out].to(dt)
        if self.granularity == "expert" and L in self.moe_layers:
            if routing is None or L not in routing:
                raise ValueError(
                    "granularity='expert' needs the routing each block's experts received, "
                    "which a cache does not hold: use tl_decomp.decompose(model, input, ...)"
                )
            mlp_in = cache[blk.mlp_in]  # type: ignore[index]
            terms, labels = _experts.expert_terms(
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

    def iter_layers(
        self,
        cache: Any,
        layers: Sequence[Layer] | None = None,
        *,
        tokens: Tensor | None = None,
        attention_mask: Tensor | None = None,
        routing: _experts.Routing | None = None,
    ) -> Iterator[Decomposition]:
        """One pass over the blocks, yielding the decomposition at each requested layer.

        `layers`: residual-stream indices (0 = the layer-0 input, ``n_layers`` = the last
        block's output, negatives from the end) and ``"final"``, yielded in depth order;
        None: all of them. `routing` (granularity ``expert``): what each block's experts
        module received, as `tl_decomp.decompose` captures it while it runs the model.

        Memory: one factor buffer plus the decomposition being yielded; consume each before
        asking for the next to keep a single layer alive.
        """
        spec = self.spec
        wanted = sorted(_layers.resolve_many(spec, layers), key=partial(_layers.depth, spec))
        self._check_cache(cache)
        dt = self.compute_dtype()
        st = Stack(self._layout(cache), cache[spec.embeds[0][1]], dt)
        last = wanted[-1]
        for layer in self._walk(st, cache, wanted, dt, routing):
            # later layers keep writing into the buffer: copy
            yield self._result(st, cache, layer, tokens, attention_mask, layer != last)

    def iter_reduced(
        self,
        cache: Any,
        statistic: Any,
        layers: Sequence[Layer] | None = None,
        *,
        attention_mask: Tensor | None = None,
        routing: _experts.Routing | None = None,
    ) -> Iterator[Any]:
        """`tl_decomp.reduce.Reduced` at each requested layer, in depth order: one statistic
        of every factor, equal to the materialised `Decomposition`'s, without its stack.

        `statistic`: ``"shares"``, ``"norm_ratios"``, ``"cosines"``, ``("logit", tokens)``
        or ``("logit", tokens, incorrect)`` (as `Decomposition.logit_attrs`). Memory: one
        chunk of `chunk_size` heads, the input and correction terms, one running sum, and
        ``[factor batch pos]`` values per requested layer; independent of the number of
        heads. Each result is checked exact as `iter_layers` checks its stack.

        Example:
            >>> from tl_decomp.models import tiny_model
            >>> model = tiny_model("gpt2", dtype=torch.float64)
            >>> recipe = DecompositionRecipe.for_model(model, granularity="head")
            >>> _, cache = model.run_with_cache("the cat sat", names_filter=recipe.names_filter)
            >>> r = next(recipe.iter_reduced(cache, "shares", [-1]))
            >>> r.labels[:3], tuple(r.values.shape)
            (('input', 'L0H0', 'L0H1'), (17, 1, 4))
            >>> bool(torch.allclose(r.values.sum(0), torch.ones(1, 4, dtype=torch.float64)))
            True
        """
        from tl_decomp.reduce import iter_reduced

        return iter_reduced(
            self, cache, statistic, layers, attention_mask=attention_mask, routing=routing
        )

    def _steps(self, wanted: Sequence[Layer]) -> list[tuple[str, Any]]:
        """The walk up to the deepest of `wanted`, in forward order: ``("input", None)``,
        ``("norm", Norm)`` (a norm on the residual stream), ``("attn", block)``,
        ``("mlp", block)`` and ``("layer", layer)`` (a residual-stream index reached)."""
        spec = self.spec
        deepest = max(_layers.depth(spec, layer) for layer in wanted)
        steps: list[tuple[str, Any]] = [("input", None)]
        steps += [("norm", spec.embed_ln)] if spec.embed_ln is not None else []
        steps.append(("layer", 0))
        for L, blk in enumerate(spec.blocks[: min(deepest, spec.n_layers)]):
            steps.append(("attn", L))
            steps += [("norm", blk.ln1)] if blk.ln1 is not None else []
            steps.append(("mlp", L))
            steps += [("norm", blk.ln2)] if blk.ln2 is not None else []
            steps.append(("layer", L + 1))
        if deepest > spec.n_layers:
            steps += [("norm", spec.ln_final)] if spec.ln_final is not None else []
            steps.append(("layer", "final"))
        return steps

    def _walk(self, st: Rows, cache: Any, wanted: Sequence[Layer], dt, routing) -> Iterator[Layer]:
        """Every step of `_steps` on `st` (a `Stack`, or a streamed reduction), yielding each
        wanted layer once its terms are all in; ``st.pos`` is the step running."""
        for i, (op, arg) in enumerate(self._steps(wanted)):
            st.pos = i
            if op == "input":
                self._input(st, cache, dt)
            elif op == "norm":
                self._norm(st, arg, cache, dt)
            elif op == "attn":
                self._attention(st, arg, cache, dt)
            elif op == "mlp":
                self._mlp(st, arg, cache, dt, routing)
            elif arg in wanted:
                yield arg

    def _input(self, st: Rows, cache: Any, dt: torch.dtype) -> None:
        spec = self.spec
        if self.split_input or not spec.input:
            for label, hook in spec.embeds:
                st.add(self._label("i", label if self.split_input else "input"), cache[hook].to(dt))
        else:  # the summed embeddings as the model holds them (scaled: Gemma, Granite)
            st.add(self._label("i", "input"), cache[spec.input].to(dt))

    def decompose(
        self,
        cache: Any,
        layer: Layer | None = "final",
        *,
        tokens: Tensor | None = None,
        attention_mask: Tensor | None = None,
        routing: _experts.Routing | None = None,
    ) -> Decomposition:
        """The decomposition at residual-stream index `layer` (``"final"``: the final
        embedding)."""
        it = self.iter_layers(
            cache,
            [_layers.resolve(self.spec, layer)],
            tokens=tokens,
            attention_mask=attention_mask,
            routing=routing,
        )
        return next(iter(it))

    def _result(self, st: Stack, cache, layer: Layer, tokens, mask, copy):
        factors, labels, kinds = st.snapshot(copy)
        site = _layers.site(self.spec, layer)
        target = cache[site].to(factors.device)  # where the terms were summed
        if mask is not None and not torch.isfinite(target).all():
            # Sliding windows leave padded queries with no key: the model's own state there
            # is NaN. Padding carries no meaning; zero it so it poisons no statistic.
            pad = ~mask.bool().to(target.device)[..., None]
            target = target.masked_fill(pad, 0)
            factors = factors.masked_fill(pad, 0)
        err = (factors.sum(0) - target.to(factors.dtype)).abs().max().item()
        if not math.isfinite(err):  # NaN or inf anywhere upstream reaches the sum
            bad = self._first_non_finite(cache)
            raise ValueError(f"the model's activation {bad} contains NaN or inf")
        self._check_exact(err, target.abs().max().item(), site, layer, factors.dtype)
        return Decomposition(
            factors=factors,
            labels=labels,
            kinds=kinds,
            target=target,
            site=site,
            layer=layer,
            tokens=tokens,
            attention_mask=mask,
            max_abs_error=err,
            centering=self.centering,
            meta={"recipe": self},
        )

    def _check_cache(self, cache: Any) -> None:
        source = _running.cache_model(cache)
        if source is not None and self.model is not None and source is not self.model:
            raise ValueError(
                "this cache comes from another model than the recipe's; "
                "decompose a cache with a recipe built for the model that produced it"
            )
        keys = set(cache.keys())
        missing = [h for h in self.hooks if h not in keys]
        if missing:
            raise ValueError(
                f"the cache lacks {len(missing)} hook(s) the decomposition reads, e.g. "
                f"{missing[:5]}; cache them with "
                "model.run_with_cache(tokens, names_filter=td.decomposition_names_filter(model))"
            )

    def _check_exact(self, err: float, scale: float, site: str, layer, dtype) -> None:
        """Raise rather than return a sum that misses the model's activation."""
        tol = self.spec.tolerance(dtype, self._rounded(layer))
        if err > tol * max(scale, 1e-30):
            raise InexactDecompositionError(
                f"the factors miss the model's own activation {site} by {err:.3g} "
                f"(relative {err / max(scale, 1e-30):.3g} > tolerance {tol:.0e}): "
                f"{self.spec.architecture} does something on its residual path that "
                "tl_decomp did not derive; please report it"
            )

    def _rounded(self, layer: Layer) -> bool:
        """Whether a norm computed in float32 lies on the way to `layer`."""
        spec = self.spec
        blocks = spec.blocks[: _layers.depth(spec, layer)]
        norms = [spec.embed_ln, *(n for b in blocks for n in b.norms())]
        norms += [spec.ln_final] if layer == "final" else []
        return any(n is not None and n.rounds for n in norms)

    def _first_non_finite(self, cache: Any) -> str:
        return next((h for h in self.hooks if not torch.isfinite(cache[h]).all()), "unknown")


def _run(model: Any, recipe: DecompositionRecipe, input: Any, attention_mask: Tensor | None):
    """Tokenise, and cache exactly what the recipe reads: one forward pass."""
    tokens, mask = _running.as_tokens(model, recipe.spec, input, attention_mask)
    device = _running.model_device(model)
    tokens, mask = tokens.to(device), mask.to(device)
    moe = list(recipe.moe_layers) if recipe.granularity == "expert" else []
    with _running.exclusive(model), _experts.capture(model, moe) as routing:
        cache = _running.run_with_cache(model, tokens, mask, recipe.names_filter)
    return cache, tokens, mask, routing


def _pos(recipe: DecompositionRecipe, cache: Any) -> torch.Size:
    """``[batch pos]`` of the run a cache holds."""
    recipe._check_cache(cache)
    return cache[recipe.spec.embeds[0][1]].shape[:2]


def decompose(
    model: Any,
    input: str | Sequence[str] | Tensor | Any,
    *,
    layer: Layer = "final",
    granularity: Granularity = "coarse",
    centering: Centering = "correction",
    attention_mask: Tensor | None = None,
    split_input: bool = False,
    split_correction: bool = False,
    dtype: torch.dtype | None = None,
) -> Decomposition:
    """Decompose a hidden state of `model` exactly into input, attention, MLP and correction.

    Guarantees ``result.factors.sum(0) == result.target`` (the model's own activation) to
    rounding; the measured error is ``result.max_abs_error``.

    Args:
        model: a TransformerBridge, HookedTransformer or HookedEncoder.
        input: a text, a list of texts (right-padded; padding is masked), token ids, or an
            ``ActivationCache`` of your own run holding the hooks the decomposition reads
            (``names_filter=td.decomposition_names_filter(model, granularity=...)``; give its
            `attention_mask` if the batch was padded). A cache is not run again.
        layer: residual-stream index, as in TransformerLens's ``accumulated_resid``: 0 is the
            layer-0 input, ``l`` the output of block ``l - 1``, negatives count from the end
            (``-1`` = the last block's output); ``"final"`` (default) is the final embedding
            the unembedding reads (decoders: the ``ln_final`` output; encoders: layer
            ``n_layers``, reported so).
        granularity: ``coarse`` (i, h, f, c), ``layer`` (attention and MLP per layer),
            ``head`` (attention per layer and head) or ``expert`` (as ``layer``, with each
            mixture-of-experts MLP split into ``L_expertE`` terms and ``L_shared_expert``).
        centering: ``correction`` puts every LayerNorm centering in ``c`` (the paper);
            ``terms`` centres each term so ``c`` holds biases only. The sum is identical.
        attention_mask: 1/0 mask for token-id input.
        split_input: split the input term into ``embed``/``pos_embed``/``token_type_embed``.
        split_correction: split ``c`` into ``ln_center``, ``ln_bias``, ``attn_bias``, ``mlp_bias``.
        dtype: compute dtype (default: the model's; float32 for half-precision models).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("bert", dtype=torch.float64)
        >>> d = decompose(model, "the cat sat on the mat")
        >>> d.labels
        ('i', 'h', 'f', 'c')
        >>> d.relative_error < 1e-9
        True
        >>> bool(torch.allclose(d.shares().sum(0), torch.ones(1, 8, dtype=torch.float64)))
        True
    """
    options = dict(
        granularity=granularity,
        centering=centering,
        split_input=split_input,
        split_correction=split_correction,
        dtype=dtype,
    )
    recipe = DecompositionRecipe.for_model(model, **options)
    layer = _layers.resolve(recipe.spec, layer)
    if _checks.is_cache(input):  # the user's own run: nothing to run again
        mask = None if attention_mask is None else _checks.mask(attention_mask, _pos(recipe, input))
        return recipe.decompose(input, layer, attention_mask=mask)
    cache, tokens, mask, routing = _run(model, recipe, input, attention_mask)
    return recipe.decompose(cache, layer, tokens=tokens, attention_mask=mask, routing=routing)


def decompose_layers(
    model: Any,
    input: str | Sequence[str] | Tensor | Any,
    *,
    layers: Sequence[Layer] | None = None,
    granularity: Granularity = "coarse",
    centering: Centering = "correction",
    attention_mask: Tensor | None = None,
    split_input: bool = False,
    split_correction: bool = False,
    dtype: torch.dtype | None = None,
    reduce: Any = None,
) -> list[Any]:
    """The decomposition at every layer from one forward pass.

    Returns one `Decomposition` per residual-stream index in `layers`, in depth order: by
    default 0 (the layer-0 input) .. ``n_layers`` (the last block's output), then ``"final"``
    where the final embedding is a separate site (a decoder's ``ln_final``), as
    TransformerLens's ``accumulated_resid`` orders them. For corpora,
    `DecompositionRecipe.iter_layers` yields the same one layer at a time.

    With `reduce` (``"shares"``, ``"norm_ratios"``, ``"cosines"``, ``("logit", tokens)``),
    returns instead one `tl_decomp.reduce.Reduced` per layer: that statistic of every factor
    (``[factor batch pos]``, labels as the decomposition's), computed without the factor
    stack, one chunk of heads at a time (`DecompositionRecipe.iter_reduced`).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> ds = decompose_layers(tiny_model("gpt2"), ["the cat", "a dog sat"])
        >>> [d.layer for d in ds]
        [0, 1, 2, 3, 'final']
        >>> max(d.relative_error for d in ds) < 1e-4
        True
        >>> rs = decompose_layers(tiny_model("gpt2"), "a dog", granularity="head", reduce="shares")
        >>> rs[-1].labels[:2], tuple(rs[-1].values.shape)
        (('input', 'L0H0'), (17, 1, 3))
    """
    options = dict(
        granularity=granularity,
        centering=centering,
        split_input=split_input,
        split_correction=split_correction,
        dtype=dtype,
    )
    recipe = DecompositionRecipe.for_model(model, **options)
    layers = _layers.resolve_many(recipe.spec, layers)
    if reduce is not None:
        from tl_decomp.reduce import check_statistic

        check_statistic(reduce)  # before the forward pass
    if _checks.is_cache(input):
        mask = None if attention_mask is None else _checks.mask(attention_mask, _pos(recipe, input))
        cache, tokens, routing = input, None, None
    else:
        cache, tokens, mask, routing = _run(model, recipe, input, attention_mask)
    if reduce is not None:
        return list(
            recipe.iter_reduced(cache, reduce, layers, attention_mask=mask, routing=routing)
        )
    it = recipe.iter_layers(cache, layers, tokens=tokens, attention_mask=mask, routing=routing)
    return list(it)


def names_filter(model: Any, **options: Any) -> Any:
    """The ``names_filter`` caching exactly what `decompose` reads with these options
    (``granularity``, ``split_input``, ...), for ``model.run_with_cache``."""
    return DecompositionRecipe.for_model(model, **options).names_filter


__all__ = ["Decomposition", "DecompositionRecipe", "decompose", "decompose_layers", "names_filter"]
