"""Per-factor statistics without the factor stack: one chunk of heads alive at a time.

Every map between a term's creation and a later layer is linear per token (SPEC 1.1), so a
term can be carried forward alone: a chunk of heads made at block ``b`` goes through every
later norm, leaves its statistic against the model's own state ``e_l`` at each requested
layer (``[chunk batch pos]`` numbers) and is dropped. Only the terms that are sums of parts
stay alive as vectors (the input and correction terms, and all four at ``coarse``), plus one
running sum of the carried terms, so memory does not grow with the number of heads.

Exactness is measured as in the materialised path, at every requested layer: the running
sum plus the kept terms must equal ``e_l`` (``max_abs_error``; raises
`InexactDecompositionError` past the tolerance); and the carried terms themselves must
project onto ``e_l`` as ``e_l`` does: ``sum_k <t_k, e_l> == ||e_l||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_decomp._core import convention
from tl_decomp._core.aliases import Cache, Model
from tl_decomp._core.convention import Layer
from tl_decomp._core.results import Result
from tl_decomp._core.spec import InexactDecompositionError, ModelSpec
from tl_decomp.decomposition._algebra import Rows, check_patterns, is_coarse
from tl_decomp.decomposition._logit import own_logits, pick_bias, token_columns, unembedding

STATISTICS = ("shares", "norm_ratios", "cosines")


@runtime_checkable
class Walker(Protocol):
    """What a reduction needs of a `DecompositionRecipe` (which drives it, from above: this
    module never imports the recipe)."""

    @property
    def spec(self) -> ModelSpec: ...
    @property
    def model(self) -> Model: ...

    def compute_dtype(self) -> torch.dtype: ...
    def check_cache(self, cache: Cache, layers: Sequence[Layer] | None = None) -> None: ...
    def layout(self, cache: Cache | None = None) -> dict[str, str]: ...
    def steps(self, wanted: Sequence[Layer]) -> list[tuple[str, Any]]: ...
    def sublayer(self, norm: Any, scale: float, cache: Cache, dt: torch.dtype) -> Any: ...
    def walk(self, st: Rows, cache: Cache, wanted: Sequence[Layer], dt: torch.dtype,
             routing: Any) -> Iterator[Layer]: ...  # fmt: skip
    def rounded(self, layer: Layer) -> bool: ...
    def check_exact(self, err: float, scale: float, site: str, layer: Layer,
                    dtype: torch.dtype) -> None: ...  # fmt: skip
    def non_finite(self, cache: Cache, layer: Layer) -> str: ...


@dataclass(frozen=True, repr=False)
class Reduced(Result):
    """One statistic of every factor at one layer: what ``getattr(d, statistic)()`` (or
    ``d.logit_attrs(tokens).values``) gives on the materialised `Decomposition`.

    Attributes:
        layer: the residual-stream index (or ``"final"``).
        statistic: ``shares``, ``norm_ratios``, ``cosines`` or ``logit``.
        labels, kinds: as the `Decomposition` at `layer` names its factors (``logit`` adds
            the lens's ``ln_final_center`` / ``ln_final_bias`` and ``b_U`` rows).
        values: ``[factor batch pos]``; ``labels[k]`` names ``values[k]``.
        site: the hook of the model's own state at `layer`.
        max_abs_error: ``max |sum of the factors - target|`` (``logit``: of the logits).
        scale: ``max |target|`` (``logit``: of the model's logits), for `relative_error`.
    """

    layer: Layer
    statistic: str
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    values: Float[Tensor, "factor batch pos"]
    site: str
    attention_mask: Int[Tensor, "batch pos"] | None
    max_abs_error: float
    scale: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.scale, 1e-30)

    def mask(self) -> Tensor:
        """Boolean ``[batch pos]``: the real (unpadded) positions."""
        if self.attention_mask is None:
            return torch.ones(self.values.shape[1:], dtype=torch.bool)
        return self.attention_mask.bool()

    def rows(self) -> list[dict[str, Any]]:
        """One row per factor and real token: ``layer, label, kind, batch, pos, value``."""
        b, p = self.mask().to(self.values.device).nonzero(as_tuple=True)
        vals = self.values[:, b, p].cpu().tolist()
        layer, where = convention.name(self.layer), list(zip(b.tolist(), p.tolist(), strict=True))
        return [
            {"layer": layer, "label": label, "kind": kind, "batch": i, "pos": j, "value": v}
            for label, kind, row in zip(self.labels, self.kinds, vals, strict=True)
            for (i, j), v in zip(where, row, strict=True)
        ]


def check_statistic(statistic: Any, spec: Any = None) -> None:
    """Refuse, before any forward pass, what `iter_reduced` cannot compute."""
    if isinstance(statistic, str) and statistic in STATISTICS:
        return
    if isinstance(statistic, tuple) and len(statistic) in (2, 3) and statistic[0] == "logit":
        if spec is not None and not spec.unembed_reads_final:
            raise NotImplementedError(
                f"logit attribution on {spec.architecture}: a head (BERT's MLM transform) lies "
                "between the final embedding and the unembedding"
            )
        return
    raise ValueError(
        f"reduce must be one of {STATISTICS}, ('logit', tokens) or ('logit', tokens, "
        f"incorrect), not {statistic!r}"
    )


def iter_reduced(
    recipe: Walker,
    cache: Any,
    statistic: Any,
    layers: Sequence[Layer] | None = None,
    *,
    attention_mask: Tensor | None = None,
    routing: Any = None,
) -> Iterator[Reduced]:
    """`Reduced` at each of `layers` (depth order), from one walk over the blocks; see
    `tl_decomp.DecompositionRecipe.iter_reduced`."""
    check_statistic(statistic, recipe.spec)
    spec = recipe.spec
    wanted = sorted(convention.resolve_many(spec, layers), key=partial(convention.depth, spec))
    recipe.check_cache(cache, wanted)
    check_patterns(spec, cache, attention_mask, convention.depth(spec, wanted[-1]))
    dt = recipe.compute_dtype()
    like = cache[spec.embeds[0][1]]
    targets: dict[Any, Target] = {
        layer: Target(recipe, cache, layer, statistic, attention_mask, dt) for layer in wanted
    }
    stream = _Stream(recipe, cache, wanted, targets, like, dt)
    for layer in recipe.walk(stream, cache, wanted, dt, routing):
        yield stream.result(layer, attention_mask)
        del targets[layer]


class Target:
    """The model's own state at one layer, and the statistic of a term against it."""

    def __init__(self, recipe, cache, layer: Layer, statistic, mask, dt):
        self.recipe, self.site = recipe, convention.site(recipe.spec, layer)
        self.layer: Layer = layer
        self.mask = mask
        e = cache[self.site].to(cache[recipe.spec.embeds[0][1]].device, dt)
        self.pad = None
        if mask is not None and not torch.isfinite(e).all():  # as Decomposition zeroes it
            self.pad = ~mask.bool().to(e.device)
            e = e.masked_fill(self.pad[..., None], 0)
        self.e, self.e2 = e, (e * e).sum(-1)
        self.name = statistic if isinstance(statistic, str) else "logit"
        if self.name == "logit":
            self.logit = _Logit(recipe, statistic, e, self.site != recipe.spec.final, dt)

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The statistic of terms ``t`` ``[n batch pos d_model]`` and ``<t, e>``, ``[n b p]``."""
        e = self.e.to(t.device)
        dot = (t * e).sum(-1)
        if self.name == "shares":
            stat = dot / self.e2.to(t.device).clamp_min(1e-30)
        elif self.name == "norm_ratios":
            stat = t.norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-30)
        elif self.name == "cosines":
            stat = torch.nn.functional.cosine_similarity(t, e.unsqueeze(0), dim=-1)
        else:
            stat = self.logit(t)
        if self.name in ("shares", "norm_ratios"):  # a zero state has none (as Decomposition)
            stat = stat.masked_fill(self.e2.to(t.device) == 0, math.nan)
        if self.pad is not None:
            pad = self.pad.to(t.device)
            stat, dot = stat.masked_fill(pad, 0), dot.masked_fill(pad, 0)
        return stat, dot


class _Logit:
    """``<t, W_U[:, token]>`` at the final embedding; at a block output, through
    ``ln_final`` with that output's own mean and scale (the lens), as `tl_decomp.decomposition`."""

    def __init__(self, recipe, statistic, x: Tensor, lens: bool, dt):
        model, spec = recipe.model, recipe.spec
        if not spec.unembed_reads_final or (lens and spec.norm_placement != "pre"):
            raise NotImplementedError(f"logit attribution at this layer of {spec.architecture}")
        tokens, incorrect = statistic[1], statistic[2] if len(statistic) == 3 else None
        W_U, b_U = unembedding(recipe, dt)  # an encoder–decoder's measured scale and bias
        shape = x.shape[:2]
        direction = token_columns(model, W_U, tokens, shape)
        bias = pick_bias(b_U, model, tokens, shape)
        if incorrect is not None:
            direction = direction - token_columns(model, W_U, incorrect, shape)
            bias = bias - pick_bias(b_U, model, incorrect, shape)
        self.direction, self.per_token = direction.to(x.device), None
        self.extra: list[tuple[str, Tensor]] = []
        if lens:
            self._lens(recipe, x)
        if bias.abs().max() > 0:
            self.extra.append(("b_U", bias.to(x.device)))
        # The unembedding run on the model's own state: the check, as `logit` does it.
        d = SimpleNamespace(target=x, site=recipe.spec.final if not lens else "", factors=x)
        self.logits = own_logits(model, recipe, d, tokens, incorrect).to(x.device)

    def _lens(self, recipe, x: Tensor) -> None:
        norm = recipe.spec.ln_final
        if norm is None:
            raise NotImplementedError("the logit lens at a block output needs a final norm")
        eps = norm.eps if norm.eps is not None else float(recipe.model.cfg.eps)
        centred = x if norm.rms else x - x.mean(-1, keepdim=True)
        self.per_token = 1 / (centred.square().mean(-1, keepdim=True) + eps).sqrt()
        bias = None if norm.b is None else (norm.b.to(x) * self.direction).sum(-1)
        if norm.w is not None:  # <t * w / sigma, u> = <t, w * u> / sigma
            self.direction = self.direction * norm.w.to(x)
        if not norm.rms:
            center = -x.mean(-1, keepdim=True) * self.per_token
            self.extra.append(("ln_final_center", (center * self.direction).sum(-1)))
        if bias is not None:
            self.extra.append(("ln_final_bias", bias))

    def __call__(self, t: Tensor) -> Tensor:
        out = (t * self.direction.to(t.device)).sum(-1)
        return out if self.per_token is None else out * self.per_token[..., 0].to(t.device)


class _Stream(Rows):
    """The recipe's walk without the stack: kept terms as vectors, every other term carried
    alone to each requested layer as it is made (`commit`), then dropped."""

    def __init__(self, recipe, cache, wanted, targets: dict[Any, Target], like: Tensor, dt):
        super().__init__(recipe.layout(cache))
        self.recipe, self.targets, self.steps = recipe, targets, recipe.steps(wanted)
        self.cache = cache
        # Every norm on the residual stream, once: [batch pos 1] each plus the model's weight.
        self.maps = {
            i: recipe.sublayer(arg, 1.0, cache, dt)
            for i, (op, arg) in enumerate(self.steps)
            if op == "norm"
        }
        self.kept_all = is_coarse(self.kinds)  # coarse: i, h, [x, m,] f, c are sums
        self.total = like.new_zeros(like.shape, dtype=dt)  # the carried terms, summed
        self.kept = {k: torch.zeros_like(self.total) for k in self.kinds} if self.kept_all else {}
        shape = (len(self.kinds), *like.shape[:2])
        self.values = {layer: like.new_full(shape, math.nan, dtype=dt) for layer in wanted}
        self.dots = {layer: like.new_zeros(like.shape[:2], dtype=dt) for layer in wanted}

    def add(self, label: str, value: Tensor) -> None:
        self.touch([label])
        if not (self.kept_all or self.kinds[label] in ("i", "c")):
            rows = value.expand(self.total.shape)[None].clone()  # the maps run in place
            self.commit([label], rows)
        elif label in self.kept:
            self.kept[label] += value.to(self.total.device)
        else:
            self.kept[label] = value.to(self.total.device).expand(self.total.shape).clone()

    def claim(self, labels: Sequence[str], device: torch.device) -> Tensor:
        self.touch(labels)
        t = self.total
        return torch.empty((len(labels), *t.shape), dtype=t.dtype, device=device)

    def commit(self, labels: Sequence[str], rows: Tensor) -> None:
        self.total += rows.sum(0).to(self.total.device)  # moved only to be summed
        k = self.slot[labels[0]]
        for i in range(self.pos + 1, len(self.steps)):
            op, arg = self.steps[i]
            if op == "norm":
                self.maps[i].apply_(rows)
            elif op == "layer" and arg in self.targets:
                self._record(arg, k, rows)

    def live(self) -> list[Tensor]:
        return [*self.kept.values(), self.total]

    def _record(self, layer: Layer, k: int, rows: Tensor) -> None:
        stat, dot = self.targets[layer](rows)
        self.values[layer][k : k + len(rows)] = stat.to(self.total.device)
        self.dots[layer] += dot.sum(0).to(self.total.device)

    def result(self, layer: Layer, mask: Tensor | None) -> Reduced:
        """The statistic at `layer`, once every term made before it has been recorded."""
        target, recipe = self.targets[layer], self.recipe
        for label, t in self.kept.items():
            self._record(layer, self.slot[label], t[None])
        total = self.total + sum(self.kept.values())
        if target.pad is not None:
            total = total.masked_fill(target.pad[..., None], 0)
        err, scale = (total - target.e).abs().max().item(), target.e.abs().max().item()
        if not math.isfinite(err):
            raise ValueError(recipe.non_finite(self.cache, layer))
        recipe.check_exact(err, scale, target.site, layer, total.dtype)
        self._check_projection(layer, target, scale)
        rows = self.rows()
        labels, kinds = self.labelled(rows)
        values = self.values.pop(layer)[rows]
        name = target.name
        if name == "logit":
            values, labels, kinds, err, scale = _logit_rows(target, values, labels, kinds)
        del self.dots[layer]
        return Reduced(layer, name, labels, kinds, values, target.site, mask, err, scale)

    def _check_projection(self, layer: Layer, target: Target, scale: float) -> None:
        """The carried terms themselves, not only their running sum: ``sum_k <t_k, e>`` must
        be ``||e||^2``, to the sum's tolerance times ``sqrt(d_model)`` (a projection of an
        error vector is at most its norm)."""
        gap = (self.dots[layer] - target.e2).abs() / target.e2.sqrt().clamp_min(1e-30)
        err = gap.max().item()
        rounded = self.recipe.rounded(layer)
        tol = self.recipe.spec.tolerance(self.total.dtype, rounded) * math.sqrt(
            self.total.shape[-1]
        )
        if err > tol * max(scale, 1e-30):
            raise InexactDecompositionError(
                f"the carried terms' projections on {target.site} miss its squared norm by "
                f"{err:.3g} times its norm (relative {err / max(scale, 1e-30):.3g} > {tol:.0e})"
            )


def _logit_rows(target: Target, values: Tensor, labels, kinds):
    """The lens's own rows and ``b_U`` appended, and the sum checked against the
    unembedding's output, as `tl_decomp.decomposition._logit.logit_attribution` does."""
    lg = target.logit
    values = torch.cat([values, *(v[None].to(values.device) for _, v in lg.extra)])
    labels = (*labels, *(label for label, _ in lg.extra))
    kinds = (*kinds, *("c" for _ in lg.extra))
    err = (values.sum(0) - lg.logits.to(values.device)).abs().max().item()
    scale = lg.logits.abs().max().item()
    target.recipe.check_exact(err, scale, "the unembedding", "final", values.dtype)
    return values, labels, kinds, err, scale


__all__ = ["STATISTICS", "Reduced", "Target", "iter_reduced"]
