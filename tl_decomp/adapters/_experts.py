"""Mixture-of-experts MLPs split by expert: ``f = sum_e f_e (+ shared expert)``, exactly.

Hugging Face's MoE blocks hand one module, ``experts``, the tokens with their routing
(``experts(hidden, top_k_index, top_k_weights)``, with index ``num_experts`` meaning "no
expert"). The routing each block's ``experts`` received is captured during the forward pass
(a temporary pre-hook, removed afterwards), and expert ``e``'s term is the same module called
with every other expert's slots masked. A shared expert (Qwen2-MoE, GLM-4-MoE) is computed
from its own module and optional sigmoid gate. Both are verified against the MLP output the
model produced; a block that does anything else raises `NotImplementedError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

Routing = dict[int, tuple[Any, ...]]


def moe_module(model: Any, L: int) -> Any | None:
    """Block `L`'s Hugging Face MoE module, or None for a dense MLP."""
    hf = getattr(getattr(model.blocks[L], "mlp", None), "original_component", None)  # SSM: none
    experts = getattr(hf, "experts", None)
    return hf if experts is not None and hasattr(experts, "num_experts") else None


def shared_module(moe: Any) -> Any | None:
    return next(
        (getattr(moe, n) for n in ("shared_expert", "shared_experts") if hasattr(moe, n)), None
    )


@contextlib.contextmanager
def capture(model: Any, layers: list[int]) -> Iterator[Routing]:
    """Record the arguments each listed block's ``experts`` module is called with."""
    routing: Routing = {}
    handles = []
    try:
        for L in layers:
            record = lambda mod, args, L=L: routing.__setitem__(L, args)  # noqa: E731
            handles.append(moe_module(model, L).experts.register_forward_pre_hook(record))
        yield routing
    finally:
        for h in handles:
            h.remove()


def expert_terms(model: Any, L: int, args: tuple[Any, ...], mlp_in: Tensor, mlp_out: Tensor):
    """``(terms [expert batch pos d_model], labels)`` summing to `mlp_out`, checked."""
    moe = moe_module(model, L)
    experts = moe.experts
    if len(args) < 3:  # Llama 4 routes before its experts: they get scaled tokens, no routing
        raise NotImplementedError(
            f"splitting block {L}'s {type(experts).__name__} by expert (called without routing: "
            "the block scales its tokens before the experts); granularity='layer' keeps the "
            "MLP whole"
        )
    hidden, index, weights, *rest = args
    n = int(experts.num_experts)
    shape = mlp_out.shape
    # The "index n = no expert" slots are the eager loop's convention; grouped_mm reads them
    # as memory (measured: terms off by 1e29), so the split always runs the eager loop.
    with torch.no_grad(), eager_experts(model):
        full = experts(hidden, index, weights, *rest)
        try:  # a module without the "index n = no expert" convention fails here or below
            terms = [
                experts(hidden, torch.where(index == e, index, n), weights, *rest).reshape(shape)
                for e in range(n)
            ]
        except (RuntimeError, IndexError, TypeError, ValueError) as err:
            raise NotImplementedError(
                f"splitting block {L}'s {type(experts).__name__} by expert ({err}); "
                "granularity='layer' keeps the MLP whole"
            ) from err
        labels = [f"{L}_expert{e}" for e in range(n)]
        shared = shared_module(moe)
        if shared is not None:
            x = mlp_in.reshape(-1, mlp_in.shape[-1])
            s = shared(x)
            gate = getattr(moe, "shared_expert_gate", None)
            s = s if gate is None else torch.sigmoid(gate(x)) * s
            terms.append(s.reshape(shape))
            labels.append(f"{L}_shared_expert")
    stack = torch.stack(terms)
    _verify(model, L, stack[:n].sum(0), full.reshape(shape), "the experts' own sum")
    _verify(model, L, stack.sum(0), mlp_out, "the MLP output")
    return stack, labels


def _verify(model: Any, L: int, got: Tensor, want: Tensor, what: str) -> None:
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    tol = 1e-9 if want.dtype == torch.float64 else 1e-4
    if not rel <= tol:
        raise NotImplementedError(
            f"block {L}'s mixture of experts ({type(moe_module(model, L)).__name__}) does "
            f"something tl_decomp cannot split by expert: the terms miss {what} by {rel:.2g} "
            "(relative); granularity='layer' keeps the MLP whole"
        )


@contextlib.contextmanager
def eager_experts(model: Any) -> Iterator[None]:
    """Every mixture-of-experts module runs Hugging Face's eager loop for the duration (the
    same numbers): its default ``grouped_mm`` kernel has no forward-mode AD, which Hidden
    Token Attribution needs. The model's own choice is restored afterwards, even on error."""
    hf = getattr(model, "original_model", None)
    modules = hf.modules() if hf is not None else []
    configs = {
        id(m.config): m.config
        for m in modules
        if getattr(getattr(m, "config", None), "_experts_implementation_internal", None)
    }
    saved = [(cfg, cfg._experts_implementation_internal) for cfg in configs.values()]
    try:
        for cfg, _ in saved:
            cfg._experts_implementation_internal = "eager"
        yield
    finally:
        for cfg, value in saved:
            cfg._experts_implementation_internal = value


# -- the token split: a mixture of experts with its routing and gates held fixed --------------
@dataclass(frozen=True)
class FrozenMoE:
    """One block's mixture of experts on the full input, to hold fixed in a re-run
    (`granularity="token"`): the routing (which experts, with which weights, per token), each
    routed expert's gate ``act(W_g x)`` (an ungated expert: ``act(zeta) / zeta``), and the
    shared expert's gate and sigmoid gate. With them held, the block is affine in its input.

    Attributes:
        block: the block's index.
        experts: the module the block calls with ``(hidden, top_k_index, top_k_weights)``.
        index, weights: the full input's routing, ``[(batch pos) top_k]``.
        gates: each slot's frozen gate ``[(batch pos) top_k d_mlp]``.
        shared: the shared expert the block calls and its frozen gate ``[(batch pos) d_mlp]``,
            or None.
        shared_gate: the shared expert's gate module and its full-input logit, or None.
    """

    block: int
    experts: Any
    index: Tensor
    weights: Tensor
    gates: Tensor
    shared: tuple[Any, Tensor] | None
    shared_gate: tuple[Any, Tensor] | None


def freeze_moe(model: Any, L: int, mlp_in: Tensor) -> FrozenMoE:
    """Block `L`'s routing and gates on the full input `mlp_in` (the MoE block's input),
    each of our affine expert forms checked against the module's own output there (with
    whatever kernel the model was booted with); `NotImplementedError` names what cannot be
    held fixed."""
    moe = moe_module(model, L)
    if moe is None:
        raise _refuse(model, L, "no Hugging Face MoE module")
    called = {"experts": moe.experts, "shared": shared_module(moe)}
    called["gate"] = getattr(moe, "shared_expert_gate", None) if called["shared"] else None
    seen: dict[str, tuple[tuple[Any, ...], Any]] = {}
    handles = [
        mod.register_forward_hook(lambda _m, a, o, k=k: seen.__setitem__(k, (a, o)))
        for k, mod in called.items()
        if mod is not None
    ]
    try:
        with torch.no_grad():
            moe(mlp_in)
    finally:
        for h in handles:
            h.remove()
    args, out = seen["experts"]
    if len(args) != 3 or not isinstance(out, Tensor):  # (hidden, top_k_index, top_k_weights)
        raise _refuse(model, L, f"{type(_own(moe.experts)).__name__} is not called with the "
                      "routing (hidden, top_k_index, top_k_weights)")  # fmt: skip
    hidden, index, weights = args
    hf = _own(moe.experts)
    gates = _expert_gates(model, L, hf, hidden, index)
    with torch.no_grad():
        mine = _experts_out(hf, hidden, index, weights, gates)
    _verify(model, L, mine, out, "the routed experts' own output")
    shared = gate = None
    if called["shared"] is not None:
        (x, *_), s_out = seen["shared"]
        shared = (called["shared"], _shared_gate(model, L, _own(called["shared"]), x))
        with torch.no_grad():
            _verify(model, L, _shared_out(shared, x), s_out, "the shared expert's own output")
    if called["gate"] is not None:
        gate = (called["gate"], seen["gate"][1].detach())
    return FrozenMoE(L, moe.experts, index, weights.detach(), gates, shared, gate)


def _own(module: Any) -> Any:
    """The Hugging Face module behind a bridge component (its weights and flags)."""
    own = getattr(module, "original_component", None)
    return module if own is None else own


def _refuse(model: Any, L: int, why: str) -> NotImplementedError:
    from tl_decomp.adapters._common import unsupported

    return unsupported(f"granularity='token' on block {L}'s mixture of experts ({why})", model)


def _expert_gates(model: Any, L: int, hf: Any, hidden: Tensor, index: Tensor) -> Tensor:
    """Each (token, slot)'s gate on the full input, read from the experts module's layout
    flags (Hugging Face's ``use_experts_implementation``, which its own kernels read)."""
    name = type(hf).__name__
    if not hasattr(hf, "has_gate"):
        raise _refuse(model, L, f"{name} declares no expert layout (use_experts_implementation)")
    gate_fn = getattr(type(hf), "_apply_gate", None)
    if hf.has_gate and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        raise _refuse(model, L, f"{name}._apply_gate, its own gate, is not act(gate) * up")
    if not hasattr(hf, "act_fn"):
        raise _refuse(model, L, f"{name} has no activation act_fn")
    if getattr(hf, "has_post_expert_norm", False):
        raise _refuse(model, L, f"{name} normalises each expert's output")
    n = int(hf.num_experts)
    with torch.no_grad():
        z = torch.zeros(*index.shape, _width(hf), dtype=hidden.dtype, device=hidden.device)
        for e, rows in _slots(index, n):
            z[rows] = _up(hf, e, hidden[rows[0]])
        if not hf.has_gate:  # act(zeta) / zeta on the full input (0 where zeta is 0)
            return torch.where(z != 0, hf.act_fn(z) / z, torch.zeros_like(z)).nan_to_num(0.0)
        return hf.act_fn(_halves(hf, z)[0])


def _width(hf: Any) -> int:
    w = hf.gate_up_proj if hf.has_gate else hf.up_proj
    return int(w.shape[-1] if hf.is_transposed else w.shape[-2])


def _slots(index: Tensor, n: int) -> list[tuple[int, tuple[Tensor, Tensor]]]:
    """``(expert, (token rows, slots))`` for every expert the routing uses."""
    out = []
    for e in index.unique().tolist():
        if 0 <= e < n:  # index n: no expert (the eager loop's convention)
            out.append((int(e), torch.where(index == e)))
    return out


def _linear(hf: Any, x: Tensor, name: str, e: int) -> Tensor:
    w = getattr(hf, name)[e].to(x.dtype)
    y = x @ w if hf.is_transposed else x @ w.T
    bias = getattr(hf, f"{name}_bias", None) if getattr(hf, "has_bias", False) else None
    return y if bias is None else y + bias[e].to(x.dtype)


def _up(hf: Any, e: int, x: Tensor) -> Tensor:
    return _linear(hf, x, "gate_up_proj" if hf.has_gate else "up_proj", e)


def _halves(hf: Any, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(gate, up)`` of a fused projection: ``[gate; up]`` or interleaved."""
    if getattr(hf, "is_concatenated", True):
        gate, up = z.chunk(2, dim=-1)
        return gate, up
    return z[..., ::2], z[..., 1::2]


def _experts_out(hf: Any, hidden: Tensor, index: Tensor, weights: Tensor, gates: Tensor):
    """The routed experts with frozen gates: affine in `hidden` (``[(batch pos) d_model]``)."""
    out = torch.zeros_like(hidden)
    for e, (tok, slot) in _slots(index, int(hf.num_experts)):
        z = _up(hf, e, hidden[tok])
        y = gates[tok, slot].to(z) * (_halves(hf, z)[1] if hf.has_gate else z)
        y = _linear(hf, y, "down_proj", e) * weights[tok, slot, None].to(z)
        out = out.index_add(0, tok, y)
    return out


def _shared_gate(model: Any, L: int, hf: Any, x: Tensor) -> Tensor:
    """The shared expert's gate ``act(gate_proj(x))`` on the full input."""
    if not all(hasattr(hf, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        raise _refuse(model, L, f"shared expert {type(hf).__name__} is not a gated MLP")
    with torch.no_grad():
        return hf.act_fn(_dense(hf.gate_proj, x))


def _dense(lin: Any, x: Tensor) -> Tensor:
    """A linear layer by its weights (a bridged one would fire its hooks again)."""
    bias = getattr(lin, "bias", None)
    bias = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, lin.weight.to(x.dtype), bias)


def _shared_out(shared: tuple[Any, Tensor], x: Tensor) -> Tensor:
    hf, gate = _own(shared[0]), shared[1]
    return _dense(hf.down_proj, gate.to(x) * _dense(hf.up_proj, x))


@contextlib.contextmanager
def hold_experts(frozen: list[FrozenMoE], V: int, b: int) -> Iterator[None]:
    """For the duration, each block's experts (and shared expert) compute their affine form
    with the full input's routing and gates, on a batch of `V` variants per example
    (batch-major, as the token split runs). Hooks are removed afterwards, even on error."""
    handles = []
    try:
        for f in frozen:
            handles.append(f.experts.register_forward_hook(partial(_routed, f, V, b)))
            if f.shared is not None:
                hook = partial(_shared, f.shared, V, b)
                handles.append(f.shared[0].register_forward_hook(hook))
            if f.shared_gate is not None:
                fixed = partial(_fixed_out, f.shared_gate[1], V, b)
                handles.append(f.shared_gate[0].register_forward_hook(fixed))
        yield
    finally:
        for h in handles:
            h.remove()


def tile_variants(t: Tensor, V: int, b: int) -> Tensor:
    """The full input's `t` for each of `V` variants per example: batch-major, whether `t` is
    ``[batch ...]`` or flattened ``[(batch pos) ...]``."""
    if t.shape[0] == 1 < b:  # broadcast over the batch
        return t
    return t.reshape(b, -1).repeat_interleave(V, 0).reshape(-1, *t.shape[1:])


def _routed(f: FrozenMoE, V: int, b: int, _module, args, _out) -> Tensor:
    hidden = args[0]
    tiled = [tile_variants(t, V, b).to(hidden.device) for t in (f.index, f.weights, f.gates)]
    return _experts_out(_own(f.experts), hidden, *tiled)


def _shared(shared: tuple[Any, Tensor], V: int, b: int, _module, args, _out) -> Tensor:
    x = args[0]
    return _shared_out((shared[0], tile_variants(shared[1], V, b)), x).reshape(_out.shape)


def _fixed_out(full: Tensor, V: int, b: int, _module, _args, out: Tensor) -> Tensor:
    return tile_variants(full, V, b).to(out)
