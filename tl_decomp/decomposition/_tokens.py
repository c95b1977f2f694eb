"""Every hidden state split by input token, exactly (`granularity="token"`; method §10).

Hold every nonlinear quantity of a forward pass at its value on the full input and the
network is affine in its input embeddings: ``F(x) = M x + c``. Token ``k``'s factor at a
layer is ``F(x_k) - F(0)`` (``x_k``: position ``k``'s embeddings, every other position zero)
and ``F(0)`` is the ``bias`` factor, so the factors sum to ``F(x)``, the model's own state.
The quantities held fixed (`tl_decomp.adapters.FrozenSites`) give the rules of Oh & Schuler
(2023) and DecompX (2023), on every architecture the coarse decomposition reads:

- input: a position's token, position and token-type embeddings belong to that position;
- norms: each token's share centred by its own mean (LayerNorm) and divided by the full
  state's sigma / rms, times the gain; the norm's bias goes to ``bias``;
- attention: the model's own pattern applied to each token's share of the values (``z``
  replaced by ``pattern @ v``, checked equal on the full input); ``b_V``, ``b_O`` to ``bias``;
- MLPs: ``theta = act(zeta) / zeta`` of the full pre-activation applied to each token's share
  of ``zeta`` (gated MLPs: the full input's gate times each share of the up-projection);
  ``b_in``'s share and ``b_out`` to ``bias``.

The model runs again on ``chunk_size`` such inputs at a time (plus ``F(0)`` in every run, so
each difference is taken within one batch), stopping after the deepest layer asked for. The
sum is checked against the model's own state like every decomposition; a causal model's later
tokens contribute exactly zero (set, not rounded).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core import convention
from tl_decomp._core.aliases import Cache, Model
from tl_decomp._core.convention import Layer
from tl_decomp._core.spec import ModelSpec
from tl_decomp.decomposition._algebra import check_values, head_values
from tl_decomp.decomposition._reduce import Reduced, Target

Rows = Callable[[Layer, int, Tensor], None]
"""``sink(layer, start, rows)``: token factors ``start ..`` (``[k batch pos d_model]``) at
`layer`; ``start == n_pos`` is the ``bias`` factor."""


def token_labels(n_pos: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``pos0 .. pos{n-1}, bias`` and their kinds (``t``: a token's, ``c``: the biases)."""
    return (*(f"pos{k}" for k in range(n_pos)), "bias"), ("t",) * n_pos + ("c",)


def frozen_hooks(model: Model, spec: ModelSpec) -> list[str]:
    """Every hook whose full-input value the frozen re-run reads."""
    sites = adapters.frozen_sites(model, spec)
    return [*spec.hooks(), *(blk.v for blk in spec.blocks), *sites.hooks()]


def run_tokens(
    model: Model,
    spec: ModelSpec,
    cache: Cache,
    wanted: Sequence[Layer],
    sink: Rows,
    *,
    mask: Tensor | None,
    tokens: Tensor | None,
    chunk_size: int,
    dt: torch.dtype,
) -> None:
    """Feed `sink` every token factor (and the bias) at each of `wanted`, `chunk_size`
    positions per forward pass."""
    frozen = _Frozen(model, spec, cache, dt)
    b, n = cache[spec.embeds[0][1]].shape[:2]
    device = adapters.model_device(model)
    ids = torch.zeros(b, n, dtype=torch.long, device=device) if tokens is None else tokens
    mask = torch.ones(b, n, dtype=torch.long, device=device) if mask is None else mask
    sites: dict[str, Layer] = {convention.site(spec, layer): layer for layer in wanted}
    deepest = max(wanted, key=partial(convention.depth, spec))
    # Stop after the deepest block asked for; the final norm may also run earlier (nanochat
    # normalises its embeddings with it), so a run that wants "final" runs to the end.
    stop_after = None if deepest == "final" else convention.site(spec, deepest)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        V = end - start + 1  # the chunk's tokens, then F(0)
        sel = torch.zeros(V, n, dtype=dt, device=device)
        sel[torch.arange(V - 1), torch.arange(start, end)] = 1
        out: dict[str, Tensor] = {}
        calls = _Calls()
        hooks = [(h, partial(calls.hook, fn, h)) for h, fn in frozen.hooks(sel)]
        hooks += [(s, partial(_keep, out, s, b, V, dt)) for s in sites]
        with torch.no_grad(), warnings.catch_warnings():
            # the bridge rebuilds a norm from its edited hook_scale, and says so each time
            warnings.filterwarnings("ignore", "A forward hook edited hook_scale")
            with adapters.hold_experts(frozen.moes, V, b):
                adapters.run_with_hooks(
                    model,
                    ids.repeat_interleave(V, 0),
                    mask.repeat_interleave(V, 0),
                    hooks,
                    stop_after=stop_after,
                )
        _check_once(spec, calls.counts)
        for site, layer in sites.items():
            y = out[site]  # [V batch pos d_model]
            rows = y[:-1] - y[-1:]
            if spec.causal:  # a position before k never sees k: zero, not rounding
                later = (
                    torch.arange(n, device=rows.device)[None, :]
                    < torch.arange(start, end, device=rows.device)[:, None]
                )
                rows = rows.masked_fill(later[:, None, :, None], 0)
            sink(layer, start, rows)
            if start == 0:
                sink(layer, n, y[-1:])


class _Calls:
    """How often each frozen hook runs in a pass. A module called again at once on the same
    input (TransformerLens 3's blocks apply `ln1` to the query, key and value inputs in turn)
    is one place, frozen by one value; any other second call is a second place."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.last: tuple[str, Tensor] | None = None

    def hook(self, fn: Callable[..., Any], name: str, t: Tensor, *, hook: Any):
        again = self.last is not None and self.last[0] == name and torch.equal(self.last[1], t)
        if not again:
            self.counts[name] += 1
        self.last = (name, t)
        return fn(t, hook=hook)


def _check_once(spec: ModelSpec, calls: Counter[str]) -> None:
    """One frozen value stands for one call: a module run twice in a pass cannot be frozen."""
    again = [(h, c) for h, c in calls.items() if c > 1]
    if again:
        hook, count = again[0]
        raise NotImplementedError(
            f"granularity='token' on {spec.architecture}: {hook} runs {count} times in one "
            "forward pass (one module used at two places), so no single frozen value holds it"
        )


def _keep(out: dict[str, Tensor], site: str, b: int, V: int, dt, t: Tensor, *, hook: Any) -> None:
    out[site] = einops.rearrange(t.detach().to(dt), "(b v) p d -> v b p d", b=b, v=V)


class _Frozen:
    """The full input's nonlinear quantities, and the hooks that hold them in a re-run."""

    def __init__(self, model: Model, spec: ModelSpec, cache: Cache, dt: torch.dtype):
        self.spec, self.cache = spec, cache
        self.sites = adapters.frozen_sites(model, spec)
        self.ratios: list[Tensor | None] = []
        for L, pair in enumerate(self.sites.mlps):
            self.ratios.append(None if pair is None else _ratio(spec, L, cache, *pair))
        # routing and each expert's gate, from the MoE block's cached input
        self.moes = [adapters.freeze_moe(model, L, cache[h]) for L, h in self.sites.moes]
        for L in range(spec.n_layers):  # only then is z the pattern times the values
            a = cache[spec.blocks[L].pattern].to(dt)
            v = head_values(spec, L, cache, slice(None), dt, value_bias=True)
            z = cache[spec.blocks[L].z].to(dt)
            if z.ndim == 3:
                z = einops.rearrange(z, "b q (h dh) -> b q h dh", h=spec.n_heads)
            check_values(spec, L, a, v, z, dt)

    def hooks(
        self, sel: Tensor, leaves: list[Tensor] | None = None
    ) -> list[tuple[str, Callable[..., Any]]]:
        """The re-run's hooks; with `leaves`, each injected embedding is a leaf tensor that
        requires grad, appended there."""
        V, b = sel.shape[0], self.cache[self.spec.embeds[0][1]].shape[0]
        hooks: list[tuple[str, Callable[..., Any]]] = []
        for _, h in self.spec.embeds:
            inject = partial(_inject, self.cache[h], sel, b)
            hooks.append((h, inject if leaves is None else partial(_leaf, inject, leaves)))
        for s in self.sites.scales:
            hooks.append((s, partial(_fixed, self.cache[s], V, b)))
        for name, rms in self.sites.plain:
            store: dict[str, Tensor] = {}
            scale = self.cache[f"{name}.hook_scale"]
            hooks.append((f"{name}.hook_in", partial(_store, store, "x")))
            hooks.append((f"{name}.hook_out", partial(_normalise, scale, rms, store, V, b)))
        for L, blk in enumerate(self.spec.blocks):
            store: dict[str, Tensor] = {}
            pattern = self.cache[blk.pattern].nan_to_num(0.0)  # padded queries with no key
            hooks.append((blk.v, partial(_store, store, "v")))
            hooks.append((blk.z, partial(_attend, pattern, self.spec.kv_head, store, V, b)))
            pair, ratio = self.sites.mlps[L], self.ratios[L]
            if pair is not None and ratio is not None:
                hooks.append((pair[1], partial(_store, store, "lin")))
                hooks.append((pair[0], partial(_activate, ratio, store, V, b)))
        return hooks


def _ratio(spec: ModelSpec, L: int, cache: Cache, out_in: str, linear: str) -> Tensor:
    """``act(zeta) / zeta`` (gated: the gate) on the full input; 0 where ``zeta`` is 0 (the
    activation's output is 0 there too, so any ratio gives the same sum)."""
    act, lin = cache[out_in], cache[linear]
    if act.shape != lin.shape:
        raise NotImplementedError(
            f"granularity='token' on {spec.architecture}: block {L}'s MLP input to the "
            f"down-projection {tuple(act.shape)} is not elementwise in its linear part "
            f"{tuple(lin.shape)} (a fused gate/up projection?)"
        )
    return torch.where(lin != 0, act / lin, torch.zeros_like(lin)).nan_to_num(0.0)


def _inject(full: Tensor, sel: Tensor, b: int, t: Tensor, *, hook: Any) -> Tensor:
    """Variant v keeps the positions `sel[v]` selects of the full input's embeddings."""
    V, n = sel.shape
    x = full.to(t.device, t.dtype)
    x = x.expand(b, *x.shape[1:])
    out = x[:, None] * sel.to(t.device, t.dtype).view(1, V, n, *([1] * (x.ndim - 2)))
    return out.reshape(-1, *x.shape[1:])


def _leaf(inject: Callable[..., Tensor], leaves: list[Tensor], t: Tensor, *, hook: Any) -> Tensor:
    x = inject(t, hook=hook).detach().requires_grad_(True)
    leaves.append(x)
    return x


def token_logits(
    model: Model,
    spec: ModelSpec,
    cache: Cache,
    direction: Float[Tensor, "batch d_model"],
    position: Tensor,
    *,
    tokens: Tensor | None,
    mask: Tensor | None,
) -> tuple[Float[Tensor, "factor batch"], Float[Tensor, " batch"]]:
    """Each input token's direct logit (``<final embedding, direction>``) at one position
    per example, from one frozen forward pass and one backward pass: the frozen network is
    affine, so token ``k``'s term is ``<d logit / d x_k, x_k>`` exactly, and the last row, the
    logit of ``F(0)`` (no token), is what they leave of ``F(x)``'s logit. That the frozen
    network is affine is checked once per model, on a short probe, against a run of ``F(0)``
    (`_check_affine`). Returns ``(values [pos + 1, batch], F(x)'s logit)``."""
    _check_affine(model, spec, direction.dtype)
    values, logit = _gradient_logits(model, spec, cache, direction, position, tokens, mask)
    values[-1] = logit.to(values) - values[:-1].sum(0)
    return values, logit


def _gradient_logits(
    model: Model,
    spec: ModelSpec,
    cache: Cache,
    direction: Tensor,
    position: Tensor,
    tokens: Tensor | None,
    mask: Tensor | None,
    zero: bool = False,
) -> tuple[Tensor, Tensor]:
    """``<d logit / d x_k, x_k>`` per token (rows ``0 .. n-1``) and ``F(x)``'s logit; with
    `zero`, the last row holds ``F(0)``'s logit from a second frozen run (else 0)."""
    frozen = _Frozen(model, spec, cache, direction.dtype)
    b, n = cache[spec.embeds[0][1]].shape[:2]
    device = adapters.model_device(model)
    ids = torch.zeros(b, n, dtype=torch.long, device=device) if tokens is None else tokens
    mask = torch.ones(b, n, dtype=torch.long, device=device) if mask is None else mask
    run = partial(_frozen_final, model, spec, frozen, ids, mask)
    rows, position = torch.arange(b), position.cpu()
    leaves: list[Tensor] = []
    # gradients for the injected embeddings only: the graph keeps no input a weight's
    # gradient would need, and the unembedding is never run
    with torch.enable_grad(), _frozen_parameters(model):
        at = run(torch.ones(1, n, dtype=direction.dtype, device=device), leaves)
        logit = (at[rows, position] * direction.to(at)).sum(-1)  # [batch]
        grads = torch.autograd.grad(logit.sum(), leaves, allow_unused=True)
    values = torch.zeros(n + 1, b, dtype=logit.dtype, device=logit.device)
    for x, g in zip(leaves, grads, strict=True):
        if g is not None:
            values[:n] += (g * x).detach().reshape(b, n, -1).sum(-1).T.to(values)
    del at, leaves, grads
    if zero:
        with torch.no_grad():
            f0 = run(torch.zeros(1, n, dtype=direction.dtype, device=device), None)
            values[n] = (f0[rows, position] * direction.to(f0)).sum(-1).to(values)
    return values, logit.detach()


_AFFINE: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _check_affine(model: Model, spec: ModelSpec, dtype: torch.dtype) -> None:
    """Once per model: on a six-token probe, the tokens' gradient terms plus ``F(0)``'s logit
    (its own frozen run) must give ``F(x)``'s logit. A nonlinearity the freeze misses makes
    the frozen network non-affine, and every gradient term wrong: raised, naming it."""
    if _AFFINE.get(model):
        return
    n = min(6, spec.n_ctx)
    ids = adapters.sample_input(model, n, random=True)
    mask = torch.ones_like(ids)
    names = frozenset(frozen_hooks(model, spec))
    with adapters.exclusive(model):
        cache = adapters.run_with_cache(model, ids, mask, names.__contains__)
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(1, spec.d_model, generator=gen, dtype=torch.float64).to(dtype)
    position = torch.tensor([n - 1])
    values, logit = _gradient_logits(model, spec, cache, direction, position, ids, mask, True)
    err = (values.sum(0) - logit.to(values)).abs().max().item()
    scale = max(values.abs().sum(0).max().item(), 1e-30)
    if err > spec.tolerance(values.dtype, True) * scale:
        raise NotImplementedError(
            f"the frozen re-run of {spec.architecture} is not affine in its input embeddings "
            f"(the tokens' terms and F(0) miss F(x) by {err / scale:.2g} relative on a probe): "
            "a nonlinearity tl_decomp does not freeze; granularity='token' is not supported"
        )
    _AFFINE[model] = True


def _frozen_final(
    model: Model,
    spec: ModelSpec,
    frozen: _Frozen,
    ids: Tensor,
    mask: Tensor,
    sel: Tensor,
    leaves: list[Tensor] | None,
) -> Float[Tensor, "batch pos d_model"]:
    """The final embedding of one frozen run (`sel`: ``[1 pos]``), stopped before the
    unembedding where the model hooks its input."""
    out: dict[str, Tensor] = {}
    calls = _Calls()
    hooks = [(h, partial(calls.hook, fn, h)) for h, fn in frozen.hooks(sel, leaves)]
    hooks.append((spec.final, partial(_store, out, "final")))
    stop = "unembed.hook_in" if "unembed.hook_in" in model.hook_dict else None
    with warnings.catch_warnings(), adapters.hold_experts(frozen.moes, 1, ids.shape[0]):
        warnings.filterwarnings("ignore", "A forward hook edited hook_scale")
        adapters.run_with_hooks(model, ids, mask, hooks, stop_after=stop)
    _check_once(spec, calls.counts)
    return out["final"]


@contextlib.contextmanager
def _frozen_parameters(model: Model) -> Iterator[None]:
    """No parameter requires grad for the duration (restored afterwards, even on error)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _fixed(full: Tensor, V: int, b: int, t: Tensor, *, hook: Any) -> Tensor:
    return adapters.tile_variants(full, V, b).to(t.device, t.dtype)


def _normalise(scale: Tensor, rms: bool, store, V: int, b: int, t: Tensor, *, hook: Any):
    x = store["x"]
    c = x if rms else x - x.mean(-1, keepdim=True)
    return (c / adapters.tile_variants(scale, V, b).to(x.device, x.dtype)).to(t.dtype)


def _store(store: dict[str, Tensor], key: str, t: Tensor, *, hook: Any) -> None:
    store[key] = t


def _attend(
    pattern: Tensor, kv_head: Sequence[int], store, V: int, b: int, t: Tensor, *, hook: Any
) -> Tensor:
    """``z = pattern @ v`` with the full input's pattern and this run's values."""
    v = store["v"]
    if v.shape[2] != pattern.shape[1]:  # grouped-query attention: each query head's KV head
        v = v[:, :, list(kv_head)]
    a = adapters.tile_variants(pattern, V, b).to(v.device, v.dtype)
    return einops.einsum(a, v, "b h q k, b k h dh -> b q h dh").reshape(t.shape)


def _activate(ratio: Tensor, store, V: int, b: int, t: Tensor, *, hook: Any) -> Tensor:
    lin = store["lin"]
    return adapters.tile_variants(ratio, V, b).to(lin.device, lin.dtype) * lin


def iter_materialised(
    run: Callable[[Rows], None], wanted: Sequence[Layer], like: Tensor, dt: torch.dtype
) -> dict[Layer, Tensor]:
    """Each wanted layer's ``[n_pos + 1, batch, pos, d_model]`` stack, filled by `run`."""
    n = like.shape[1]
    stacks: dict[Layer, Tensor] = {
        layer: like.new_zeros((n + 1, *like.shape), dtype=dt) for layer in wanted
    }

    def sink(layer: Layer, start: int, rows: Tensor) -> None:
        stacks[layer][start : start + len(rows)] = rows.to(stacks[layer].device)

    run(sink)
    return stacks


def distribute_bias(
    stack: Float[Tensor, "factor batch pos d_model"], e: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "factor batch pos d_model"]:
    """The ``bias`` factor (the last) spread over the token factors in proportion to
    ``|<t_k, e>|`` at each position (evenly where every token's is 0); the sum is unchanged
    and ``bias`` is left zero."""
    tokens, bias = stack[:-1], stack[-1]
    weight = (tokens * e.to(stack)).sum(-1).abs()
    total = weight.sum(0, keepdim=True)
    weight = torch.where(total > 0, weight / total.clamp_min(1e-300), 1.0 / len(tokens))
    out = stack.clone()
    out[:-1] += weight[..., None] * bias
    out[-1] = 0
    return out


def reduce_tokens(
    recipe: Any,
    run: Callable[[Rows], None],
    cache: Cache,
    statistic: Any,
    wanted: Sequence[Layer],
    mask: Tensor | None,
    dt: torch.dtype,
) -> Iterator[Reduced]:
    """`Reduced` per wanted layer from the token factors, one chunk of tokens alive at a time:
    the statistic of each factor, the running sum checked against the model's own state."""
    like = cache[recipe.spec.embeds[0][1]]
    n = like.shape[1]
    targets = {layer: Target(recipe, cache, layer, statistic, mask, dt) for layer in wanted}
    values = {layer: like.new_zeros((n + 1, *like.shape[:2]), dtype=dt) for layer in wanted}
    totals = {layer: like.new_zeros(like.shape, dtype=dt) for layer in wanted}

    def sink(layer: Layer, start: int, rows: Tensor) -> None:
        target = targets[layer]
        totals[layer] += rows.sum(0).to(totals[layer].device)
        if target.name == "logit" and target.logit.per_token is not None:
            norm = recipe.spec.ln_final  # the lens: each token's share centred by its own mean
            rows = rows if norm is None or norm.rms else rows - rows.mean(-1, keepdim=True)
        stat, _ = target(rows)
        values[layer][start : start + len(rows)] = stat.to(values[layer].device)

    run(sink)
    labels, kinds = token_labels(n)
    for layer in wanted:
        yield _token_reduced(recipe, targets[layer], values[layer], totals[layer], labels, kinds)


def _token_reduced(recipe, target: Target, values, total, labels, kinds) -> Reduced:
    if target.pad is not None:
        total = total.masked_fill(target.pad[..., None], 0)
    err, scale = (total - target.e).abs().max().item(), target.e.abs().max().item()
    recipe.check_exact(err, scale, target.site, target.layer, total.dtype)
    if target.name == "logit":  # the biases the unembedding adds belong to no token
        lg = target.logit
        for label, extra in lg.extra:
            if label != "ln_final_center":  # each token's share was centred instead
                values[-1] += extra.to(values.device)
        err = (values.sum(0) - lg.logits.to(values.device)).abs().max().item()
        scale = lg.logits.abs().max().item()
        recipe.check_exact(err, scale, "the unembedding", "final", values.dtype)
    return Reduced(
        target.layer, target.name, labels, kinds, values, target.site, target.mask, err, scale
    )


__all__ = [
    "distribute_bias",
    "frozen_hooks",
    "iter_materialised",
    "reduce_tokens",
    "run_tokens",
    "token_labels",
]
