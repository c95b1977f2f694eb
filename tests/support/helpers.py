"""The project's tolerances, imported from the library (docs/method.md §1.4), hook checks and
the effective-attention reference."""

from __future__ import annotations

import torch
from torch import Tensor

from tl_decomp._core.spec import TOLERANCE as RTOL  # the library's own, never a copy


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """max |actual - expected| <= RTOL[dtype] * max |expected|."""
    expected = expected.to(actual.dtype)
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL[dtype] * scale, f"{what}: max abs error {err:.3g} vs |target| {scale:.3g}"


def projected_row(row: Tensor, t: Tensor, keys: list[int]) -> Tensor:
    """Effective attention's reference for one query row: its weights on exactly `keys`
    projected onto the column space of ``T = V W_O`` over those keys (one SVD; the rank
    cut at ``eps * max(keys, d_model) * s_0``), zero elsewhere."""
    u, s, _ = torch.linalg.svd(t, full_matrices=False)
    basis = u[:, s > torch.finfo(torch.float64).eps * max(t.shape) * s[0]]
    want = torch.zeros_like(row)
    want[keys] = row[keys] @ basis @ basis.T
    return want


def hook_state(model) -> dict[str, tuple[int, ...]]:
    """Ids of every hook function on every hook point (some bridges own permanent ones)."""
    state = {}
    for name, hp in model.hook_dict.items():
        fns = [
            *hp._forward_hooks.values(),
            *hp._backward_hooks.values(),
            *hp._forward_pre_hooks.values(),
        ]
        if fns:
            state[name] = tuple(sorted(id(f) for f in fns))
    return state


class NoHooksLeft:
    """``with NoHooksLeft(model): ...`` fails if the block leaves a hook behind, even on error."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.before = hook_state(self.model)
        return self

    def __exit__(self, *exc):
        after = hook_state(self.model)
        assert after == self.before, f"hooks left behind: {set(after) ^ set(self.before)}"
        return False
