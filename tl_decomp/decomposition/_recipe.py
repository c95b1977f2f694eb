"""The decomposition's result and its recipe: which hooks to cache, one walk over the blocks
(materialised factors or streamed reductions), and the exactness check every result passes
(docs/method.md §1). The algebra of each term is `tl_decomp.decomposition`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core import checks, convention
from tl_decomp._core.convention import Layer
from tl_decomp._core.spec import InexactDecompositionError, ModelSpec
from tl_decomp.decomposition._algebra import (
    BiasRule,
    Centering,
    Granularity,
    Rows,
    Stack,
    check_patterns,
)
from tl_decomp.decomposition._encoder import encoder_factors
from tl_decomp.decomposition._reduce import Reduced, check_statistic, iter_reduced
from tl_decomp.decomposition._result import Decomposition
from tl_decomp.decomposition._terms import Terms
from tl_decomp.decomposition._tokens import (
    distribute_bias,
    frozen_hooks,
    iter_materialised,
    reduce_tokens,
    run_tokens,
    token_labels,
)


def _check_token_split(spec: ModelSpec) -> None:
    """Refuse, by name, what the frozen re-run of granularity ``token`` cannot hold fixed."""
    for L, blk in enumerate(spec.blocks):
        feature = None
        if blk.per_layer_input:
            feature = f"a per-layer-input branch (block {L}: its gate is not frozen)"
        elif blk.v_pos_axis != 1:
            feature = f"latent attention (block {L}: values laid out [batch head pos d])"
        elif any(not n.scale for n in blk.norms()):
            feature = f"a norm without hook_scale (block {L}: its sigma cannot be frozen)"
        if feature is not None:
            raise NotImplementedError(
                f"granularity='token' on {spec.architecture}: {feature} is not supported by "
                "tl_decomp; granularity='head' is exact"
            )


@dataclass(frozen=True)
class DecompositionRecipe(Terms):
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
    bias: BiasRule = "separate"
    stack: adapters.StackName | None = None  # an encoder–decoder's stack; None: the only one
    # "encoder": a decoder's cross-attention term split by the encoder's own factors
    cross: Literal["encoder"] | None = None
    encoder: DecompositionRecipe | None = field(default=None, compare=False, repr=False)

    @classmethod
    def for_model(cls, model: Any, **options: Any) -> DecompositionRecipe:
        """A recipe for `model`; raises `NotImplementedError` on unsupported architectures."""
        if options.get("stack") is not None:
            checks.choice(options["stack"], "stack", adapters.STACKS)
        spec = adapters.model_spec(model, stack=options.get("stack"))
        recipe = cls(spec=spec, model=model, **options)
        checks.choice(recipe.granularity, "granularity", get_args(Granularity))
        if recipe.stack is not None and recipe.granularity in ("expert", "token"):
            raise NotImplementedError(
                f"granularity={recipe.granularity!r} on an encoder–decoder "
                f"({spec.architecture}) is not supported by tl_decomp: coarse, layer, head "
                "and source are"
            )
        if recipe.cross is not None:
            recipe = recipe._with_encoder()
        if recipe.granularity == "expert" and not recipe.moe_layers:
            raise ValueError("granularity='expert' needs a mixture-of-experts model")
        checks.choice(recipe.centering, "centering", get_args(Centering))
        checks.choice(recipe.bias, "bias", get_args(BiasRule))
        if recipe.bias != "separate" and recipe.granularity != "token":
            raise ValueError("bias='distribute' spreads the bias over tokens: granularity='token'")
        if recipe.granularity == "token":  # a token's share through a mixer is not hooked
            for L in range(recipe.spec.n_layers):
                recipe.spec.refuse_mixer(L, "granularity='token'")
        if recipe.granularity == "token":  # a token's share is centred by its own mean
            _check_token_split(recipe.spec)
            recipe = replace(recipe, centering="terms")
            frozen_hooks(model, recipe.spec)  # refuses what it cannot freeze, before any work
        checks.dtype(recipe.dtype)
        for name in ("split_input", "split_correction"):
            if not isinstance(getattr(recipe, name), bool):
                raise TypeError(f"{name} must be True or False, not {getattr(recipe, name)!r}")
        checks.integer(recipe.chunk_size, "chunk_size", least=1)
        return recipe

    def _with_encoder(self) -> DecompositionRecipe:
        """This recipe with the encoder's, which `cross="encoder"` composes with."""
        checks.choice(self.cross, "cross", ("encoder",))
        if self.stack != "decoder":
            raise ValueError(
                "cross='encoder' splits a decoder's cross-attention: an encoder–decoder's "
                "decoder (decoder_input= or stack='decoder')"
            )
        options = dict(
            granularity=self.granularity, centering=self.centering, split_input=self.split_input,
            split_correction=self.split_correction, dtype=self.dtype, chunk_size=self.chunk_size,
        )  # fmt: skip
        encoder = DecompositionRecipe.for_model(self.model, stack="encoder", **options)
        return replace(self, encoder=encoder)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Blocks whose MLP is a mixture of experts (split by expert on request)."""
        return tuple(L for L in range(self.spec.n_layers) if adapters.moe_module(self.model, L))

    @property
    def hooks(self) -> list[str]:
        if self.split_input and adapters.image_input(self.model) is not None:  # + the pixels
            return [adapters.PIXELS_HOOK, *replace(self, split_input=False).hooks]
        if self.encoder is not None:  # the encoder's terms, and the values each block reads
            values = [b.cross.v for b in self.spec.blocks if b.cross is not None]
            own = replace(self, cross=None, encoder=None).hooks
            return list(dict.fromkeys(own + self.encoder.hooks + values))
        if self.granularity == "token":  # the nonlinearities a frozen re-run holds
            return list(dict.fromkeys(frozen_hooks(self.model, self.spec)))
        if self.granularity == "source":  # the values each head reads, key by key
            cross = [b.cross.v for b in self.spec.blocks if b.cross is not None]
            return self.spec.hooks() + [blk.v for blk in self.spec.blocks if blk.v] + cross
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

    def iter_layers(
        self,
        cache: Any,
        layers: Sequence[Layer] | None = None,
        *,
        tokens: Tensor | None = None,
        attention_mask: Tensor | None = None,
        routing: adapters.Routing | None = None,
    ) -> Iterator[Decomposition]:
        """One pass over the blocks, yielding the decomposition at each requested layer.

        `layers`: residual-stream indices (0 = the layer-0 input, ``n_layers`` = the last
        block's output, negatives from the end) and ``"final"``, yielded in depth order;
        None: all of them. `routing` (granularity ``expert``): what each block's experts
        module received, as `tl_decomp.decomposition` captures it while it runs the model.

        Memory: one factor buffer plus the decomposition being yielded; consume each before
        asking for the next to keep a single layer alive.
        """
        spec = self.spec
        wanted = sorted(convention.resolve_many(spec, layers), key=partial(convention.depth, spec))
        self.check_cache(cache, wanted)
        check_patterns(spec, cache, attention_mask, convention.depth(spec, wanted[-1]))
        dt = self.compute_dtype()
        if self.granularity == "token":
            yield from self._token_layers(cache, wanted, tokens, attention_mask, dt)
            return
        st = Stack(self.layout(cache), cache[spec.embeds[0][1]], dt)
        last = wanted[-1]
        for layer in self.walk(st, cache, wanted, dt, routing):
            # later layers keep writing into the buffer: copy
            yield self._result(st, cache, layer, tokens, attention_mask, layer != last)

    def iter_reduced(
        self,
        cache: Any,
        statistic: Any,
        layers: Sequence[Layer] | None = None,
        *,
        attention_mask: Tensor | None = None,
        routing: adapters.Routing | None = None,
    ) -> Iterator[Reduced]:
        """`tl_decomp.Reduced` at each requested layer, in depth order: one statistic
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
        if self.granularity == "token":
            return self._token_reduced(cache, statistic, layers, attention_mask)
        self.check_statistic(statistic)
        return iter_reduced(
            self, cache, statistic, layers, attention_mask=attention_mask, routing=routing
        )

    def _token_run(self, cache, wanted, tokens, mask, dt) -> partial[None]:
        return partial(
            run_tokens, self.model, self.spec, cache, wanted, mask=mask, tokens=tokens,
            chunk_size=self.chunk_size, dt=dt,
        )  # fmt: skip

    def _token_reduced(self, cache, statistic, layers, mask) -> Iterator[Reduced]:
        check_statistic(statistic, self.spec)
        if self.bias != "separate":
            raise ValueError("bias='distribute' needs each layer's whole token stack: no reduce=")
        spec = self.spec
        wanted = sorted(convention.resolve_many(spec, layers), key=partial(convention.depth, spec))
        self.check_cache(cache, wanted)
        check_patterns(spec, cache, mask, convention.depth(spec, wanted[-1]))
        dt = self.compute_dtype()
        run = self._token_run(cache, wanted, None, mask, dt)
        return reduce_tokens(self, run, cache, statistic, wanted, mask, dt)

    def check_statistic(self, statistic: Any) -> None:
        """Refuse, before any forward pass, a `reduce=` statistic this recipe cannot stream."""
        if self.encoder is not None:  # a streamed row is recorded once, x.<label> many times
            raise NotImplementedError(
                f"reduce= with cross='encoder' ({self.spec.architecture}) is not supported by "
                "tl_decomp: the materialised decomposition is"
            )
        if self.stack == "encoder" and isinstance(statistic, tuple):  # logits: the decoder's
            raise NotImplementedError(
                f"logit attribution on {self.spec.architecture}'s encoder: its states reach "
                "the logits only through the decoder's cross-attention; decompose the decoder "
                "(decoder_input=) for logits"
            )
        check_statistic(statistic, self.spec)

    def steps(self, wanted: Sequence[Layer]) -> list[tuple[str, Any]]:
        """The walk up to the deepest of `wanted`, in forward order: ``("input", None)``,
        ``("norm", Norm)`` (a norm on the residual stream), ``("attn", block)``,
        ``("mlp", block)``, ``("per_layer_input", block)`` and ``("layer", layer)`` (a
        residual-stream index reached). A block's output multiplier is a ``norm`` step."""
        spec = self.spec
        deepest = max(convention.depth(spec, layer) for layer in wanted)
        steps: list[tuple[str, Any]] = [("input", None)]
        steps += [("norm", spec.embed_ln)] if spec.embed_ln is not None else []
        steps.append(("layer", 0))
        for L, blk in enumerate(spec.blocks[: min(deepest, spec.n_layers)]):
            steps.append(("attn", L))
            steps += [("norm", blk.ln1)] if blk.ln1 is not None else []
            if blk.cross is not None:  # an encoder–decoder's decoder block
                steps.append(("cross", L))
                steps += [("norm", blk.cross.ln)] if blk.cross.ln is not None else []
            steps.append(("mlp", L))
            steps += [("norm", blk.ln2)] if blk.ln2 is not None else []
            steps += [("per_layer_input", L)] if blk.per_layer_input else []
            steps += [("norm", blk.out_norm)] if blk.out_norm is not None else []
            steps.append(("layer", L + 1))
        if deepest > spec.n_layers:
            steps += [("norm", spec.ln_final)] if spec.ln_final is not None else []
            steps.append(("layer", "final"))
        return steps

    def walk(self, st: Rows, cache: Any, wanted: Sequence[Layer], dt, routing) -> Iterator[Layer]:
        """Every step of `_steps` on `st` (a `Stack`, or a streamed reduction), yielding each
        wanted layer once its terms are all in; ``st.pos`` is the step running."""
        enc = None  # the encoder's factors, where cross-attention is composed with them
        for i, (op, arg) in enumerate(self.steps(wanted)):
            st.pos = i
            if op == "input":
                self._input(st, cache, dt)
            elif op == "norm":
                self._norm(st, arg, cache, dt)
            elif op == "attn":
                self._attention(st, arg, cache, dt)
            elif op == "cross":
                if self.encoder is not None and enc is None:
                    enc = encoder_factors(self.encoder, cache, self.spec.blocks[arg].cross)
                self._cross_attention(st, arg, cache, dt, enc)
            elif op == "mlp":
                self._mlp(st, arg, cache, dt, routing)
            elif op == "per_layer_input":
                self._per_layer_input(st, arg, cache, dt)
            elif arg in wanted:
                yield arg

    def _input(self, st: Rows, cache: Any, dt: torch.dtype) -> None:
        spec = self.spec
        if self.split_input and adapters.image_input(self.model) is not None:
            # patches, prefix tokens, positions: recomputed from the pixels, checked
            hooked, pixels = cache[spec.embeds[0][1]], cache[adapters.PIXELS_HOOK]
            for label, term in adapters.embedding_terms(self.model, pixels, hooked, dt):
                st.add(self._label("i", label), term)
        elif self.split_input or not spec.input:
            for label, hook in spec.embeds:
                st.add(self._label("i", label if self.split_input else "input"), cache[hook].to(dt))
        else:  # the summed embeddings as the model holds them (scaled: Gemma, Granite)
            st.add(self._label("i", "input"), cache[spec.input].to(dt))

    def decompose(
        self,
        cache: Any,
        layer: Layer = "final",
        *,
        tokens: Tensor | None = None,
        attention_mask: Tensor | None = None,
        routing: adapters.Routing | None = None,
    ) -> Decomposition:
        """The decomposition at residual-stream index `layer` (``"final"``: the final
        embedding)."""
        it = self.iter_layers(
            cache,
            [convention.resolve(self.spec, layer)],
            tokens=tokens,
            attention_mask=attention_mask,
            routing=routing,
        )
        return next(iter(it))

    def _token_layers(self, cache, wanted, tokens, mask, dt) -> Iterator[Decomposition]:
        like = cache[self.spec.embeds[0][1]]
        run = self._token_run(cache, wanted, tokens, mask, dt)
        stacks = iter_materialised(run, wanted, like, dt)
        labels, kinds = token_labels(like.shape[1])
        for layer in wanted:
            stack = stacks.pop(layer)
            if self.bias == "distribute":
                stack = distribute_bias(stack, cache[convention.site(self.spec, layer)])
            yield self._finish(stack, labels, kinds, cache, layer, tokens, mask)

    def _result(self, st: Stack, cache, layer: Layer, tokens, mask, copy):
        return self._finish(*st.snapshot(copy), cache, layer, tokens, mask)

    def _finish(self, factors, labels, kinds, cache, layer: Layer, tokens, mask):
        site = convention.site(self.spec, layer)
        target = cache[site].to(factors.device)  # where the terms were summed
        if mask is not None and not torch.isfinite(target).all():
            # Sliding windows leave padded queries with no key: the model's own state there
            # is NaN. Padding carries no meaning; zero it so it poisons no statistic.
            pad = ~mask.bool().to(target.device)[..., None]
            target = target.masked_fill(pad, 0)
            factors = factors.masked_fill(pad, 0)
        err = (factors.sum(0) - target.to(factors.dtype)).abs().max().item()
        if not math.isfinite(err):  # NaN or inf anywhere upstream reaches the sum
            raise ValueError(self.non_finite(cache, layer))
        self.check_exact(err, target.abs().max().item(), site, layer, factors.dtype)
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

    def hooks_to(self, layers: Sequence[Layer] | None = None) -> list[str]:
        """The hooks read to reach the deepest of `layers` (None: every layer): what a
        ``run_with_cache(stop_at_layer=k)`` cache holds serves the layers up to ``k``."""
        spec = self.spec
        wanted = convention.resolve_many(spec, layers)
        deepest = max(convention.depth(spec, layer) for layer in wanted)
        if deepest > spec.n_layers or self.granularity == "token":  # the re-run runs them all
            return self.hooks
        keep = {convention.site(spec, layer) for layer in wanted}
        # TransformerLens names every hook of block L "blocks.L.…", on both lines
        later = tuple(f"blocks.{L}." for L in range(deepest, spec.n_layers))
        final = {spec.final, *spec._norm_hooks(spec.ln_final)}
        return [h for h in self.hooks if h in keep or not (h.startswith(later) or h in final)]

    def check_cache(self, cache: Any, layers: Sequence[Layer] | None = None) -> None:
        """`cache` holds every hook the decomposition at `layers` reads (None: every layer)."""
        source = adapters.cache_model(cache)
        if source is not None and self.model is not None and source is not self.model:
            raise ValueError(
                "this cache comes from another model than the recipe's; "
                "decompose a cache with a recipe built for the model that produced it"
            )
        keys = set(cache.keys())
        missing = [h for h in self.hooks_to(layers) if h not in keys]
        if missing:
            served = [
                layer
                for layer in convention.every(self.spec)
                if all(h in keys for h in self.hooks_to([layer]))
            ]
            held = f"; it serves layers {served[0]}..{served[-1]}" if served else ""
            raise ValueError(
                f"the cache lacks {len(missing)} hook(s) the decomposition reads, e.g. "
                f"{missing[:5]}{held} (a run_with_cache(stop_at_layer=k) cache holds layers "
                "0..k); cache them with "
                "model.run_with_cache(tokens, names_filter=td.decomposition_names_filter(model))"
            )

    def check_exact(self, err: float, scale: float, site: str, layer, dtype) -> None:
        """Raise rather than return a sum that misses the model's activation."""
        tol = self.spec.tolerance(dtype, self.rounded(layer))
        if err > tol * max(scale, 1e-30):
            raise InexactDecompositionError(
                f"the factors miss the model's own activation {site} by {err:.3g} "
                f"(relative {err / max(scale, 1e-30):.3g} > tolerance {tol:.0e}): "
                f"{self.spec.architecture} does something on its residual path that "
                "tl_decomp did not derive; please report it"
            )

    def rounded(self, layer: Layer) -> bool:
        """Whether a norm computed in float32, or a block rounding the residual stream to
        float32, lies on the way to `layer`."""
        spec = self.spec
        if self.granularity == "token" and adapters.frozen_sites(self.model, spec).rounds:
            return True  # the re-run recomputes every norm, sublayer inputs' included
        blocks = spec.blocks[: convention.depth(spec, layer)]
        if blocks and self.encoder is not None and self.encoder.rounded("final"):
            return True  # the encoder's factors sum to its states to its own rounding
        norms = [spec.embed_ln, *(n for b in blocks for n in b.norms())]
        norms += [spec.ln_final] if layer == "final" else []
        return any(n is not None and n.rounds for n in norms) or any(b.rounds for b in blocks)

    def non_finite(self, cache: Any, layer: Layer) -> str:
        """Why `layer`'s sum is not finite: the first activation read holding NaN or inf, and
        its block, so a broken late block is not taken for a broken model."""
        held = (h for h in self.hooks if h in cache)  # a stop_at_layer cache holds a prefix
        bad = next((h for h in held if not torch.isfinite(cache[h]).all()), "unknown")
        message = f"the model's activation {bad} contains NaN or inf"
        block = re.match(r"blocks\.(\d+)\.", bad)  # TransformerLens's names on both lines
        if block is None:
            return message
        b = int(block.group(1))
        before = f" (layers 0..{b} read only the blocks before it)" if b > 0 else ""
        return f"{message}: block {b}, which layer {layer!r} reads{before}"
