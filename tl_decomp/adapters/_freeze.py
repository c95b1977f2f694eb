"""Where a forward pass's nonlinear quantities live, so a second pass can hold them fixed.

Token-wise decomposition (`granularity="token"`) re-runs the model with every nonlinearity
frozen at its value on the full input: each norm's sigma / rms (``hook_scale``), each
attention pattern (the heads' ``z`` replaced by the full input's pattern times the current
values) and each MLP activation (the down-projection's input replaced by the full input's
ratio ``act(zeta) / zeta`` times the current linear part; for gated MLPs that ratio is the
gate ``act(W_g x)``). With all of them fixed the network is affine in its input embeddings,
which is what makes the per-token split exact. This module only names the hooks; the model
classes differ here and nowhere else.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from tl_decomp._core.aliases import Model
from tl_decomp._core.spec import ModelSpec
from tl_decomp.adapters._bridge import read_norm
from tl_decomp.adapters._common import model_kind, unsupported
from tl_decomp.adapters._experts import moe_module


@dataclass(frozen=True)
class FrozenSites:
    """The hooks a frozen re-run replaces.

    Attributes:
        scales: every norm's sigma / rms on the residual path and before each sublayer
            (attention-internal q/k norms only shape the pattern, which is frozen whole).
        mlps: per block, ``(down-projection input, its linear part)``, or None where the
            block has no MLP.
        plain: norms with neither gain nor bias (OLMo, nanochat), as ``(name, rms)``: a
            bridge rebuilds an edited ``hook_scale`` through a weight they lack, so their
            ``hook_out`` is replaced instead (``(x - mean) / sigma`` or ``x / rms``).
        rounds: some frozen norm computes in float32 whatever the model's dtype (Hugging
            Face's RMSNorm), so the re-run matches the model's own states only to that.
        moes: mixture-of-experts blocks as ``(block, the MoE module's input hook)``: their
            routing and gates are held by `tl_decomp.adapters.freeze_moe` (module hooks, as
            the fused experts have no hook points inside).
    """

    scales: tuple[str, ...]
    mlps: tuple[tuple[str, str] | None, ...]
    plain: tuple[tuple[str, bool], ...] = ()
    rounds: bool = False
    moes: tuple[tuple[int, str], ...] = ()

    def hooks(self) -> list[str]:
        """Every hook whose full-input value a frozen re-run reads."""
        plain = [f"{name}.hook_scale" for name, _ in self.plain]
        mlps = (h for pair in self.mlps if pair for h in pair)
        return [*self.scales, *plain, *mlps, *(h for _, h in self.moes)]


def frozen_sites(model: Model, spec: ModelSpec) -> FrozenSites:
    """The hooks of `model` a frozen re-run replaces; raises `NotImplementedError` naming a
    block whose MLP it cannot freeze (no hooked activation, a fused gate/up projection)."""
    if model not in _SITES:  # each norm's rounding is measured once per model
        _SITES[model] = _derive(model, spec)
    return _SITES[model]


_SITES: weakref.WeakKeyDictionary[Any, FrozenSites] = weakref.WeakKeyDictionary()


def _derive(model: Model, spec: ModelSpec) -> FrozenSites:
    names = set(model.hook_dict)
    scales = tuple(n for n in model.hook_dict if n.endswith(".hook_scale") and ".attn." not in n)
    bridge = model_kind(model) == "TransformerBridge"
    moes = tuple(
        (L, f"blocks.{L}.mlp.hook_in")
        for L in range(spec.n_layers)
        if bridge and spec.blocks[L].mlp_out is not None and moe_module(model, L) is not None
    )
    if any(h not in names for _, h in moes):
        raise unsupported("granularity='token': a mixture of experts with no hooked input", model)
    mlps = tuple(
        None if L in dict(moes) else _mlp(model, spec, L, names) for L in range(spec.n_layers)
    )
    if not bridge:  # its norms compute in the model's dtype
        return FrozenSites(scales, mlps)
    norms = {s: read_norm(model, s.removesuffix(".hook_scale")) for s in scales}
    plain = tuple(
        (s.removesuffix(".hook_scale"), n.rms)
        for s, n in norms.items()
        if n is not None and n.w is None and n.b is None
    )
    kept = tuple(s for s in scales if s.removesuffix(".hook_scale") not in dict(plain))
    rounds = any(n is not None and n.rounds for n in norms.values())
    return FrozenSites(kept, mlps, plain, rounds, moes)


def _mlp(model: Model, spec: ModelSpec, L: int, names: set[str]) -> tuple[str, str] | None:
    if spec.blocks[L].mlp_out is None:
        return None
    p = f"blocks.{L}.mlp"
    if model_kind(model) == "TransformerBridge":  # `in`/`out`, or `dense_in`/`dense_out` (the
        # dense blocks of a mixture-of-experts model): a pair of children named alike
        children = {c for c, _ in model.blocks[L].mlp.named_children() if c[:4] != "hook"}
        pre = next(
            (c[:-3] for c in children if c.endswith("out") and c[:-3] + "in" in children), ""
        )
        pair = (f"{p}.{pre}out.hook_in", f"{p}.{pre}in.hook_out")
    else:  # HookedTransformer: hook_post = act(hook_pre) (* hook_pre_linear when gated)
        gated = f"{p}.hook_pre_linear" in names
        pair = (f"{p}.hook_post", f"{p}.hook_pre_linear" if gated else f"{p}.hook_pre")
    if not set(pair) <= names:
        raise unsupported(
            f"granularity='token': block {L}'s MLP exposes no down-projection input and "
            "linear part to freeze its activation at",
            model,
        )
    return pair


__all__ = ["FrozenSites", "frozen_sites"]
