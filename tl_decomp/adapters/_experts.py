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
from typing import Any

import torch
from torch import Tensor

Routing = dict[int, tuple[Any, ...]]


def moe_module(model: Any, L: int) -> Any | None:
    """Block `L`'s Hugging Face MoE module, or None for a dense MLP."""
    hf = getattr(model.blocks[L].mlp, "original_component", None)
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
