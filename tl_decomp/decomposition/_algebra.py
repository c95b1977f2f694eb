"""The term algebra under the decomposition: where factor rows live, and the norm maps.

A norm with the forward pass's own mu and sigma is linear per token (SPEC 1.1), so it is a
`NormMap`: optional centring, then a per-token gain (``1 / sigma`` times a sublayer multiplier)
and a per-feature gain (the norm's weight). The gains stay factored: a map costs
``[batch pos 1]`` plus the model's own weight, so every map of a run can be held at once
(`tl_decomp.decomposition` carries each term alone through all of them).

`Stack` holds the factor rows of the materialised decomposition in one buffer; the streamed
reductions use the same interface (`add`, `claim`, `commit`, `live`), so the recipe's walk
over the blocks is written once.

Devices: a map's gains move to the device of the term it is applied to (they are small);
terms move to a buffer only where they are summed into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_decomp._core.spec import ModelSpec

# The option sets, written once: checks, signatures and the CLI's choices derive from them.
Granularity = Literal["coarse", "layer", "head", "source", "expert", "token"]
Centering = Literal["correction", "terms"]
Statistic = Literal["shares", "norm_ratios", "cosines"]
BiasRule = Literal["separate", "distribute"]

KINDS = ("i", "h", "f", "c")  # the paper's four; `ModelSpec.kinds` adds x (cross), m (mixer)
ALL_KINDS = ("i", "h", "x", "m", "f", "c")


def is_coarse(kinds: dict[str, str]) -> bool:
    """A coarse layout: one row per kind, labelled by its kind."""
    return all(label == kind for label, kind in kinds.items())


class Rows:
    """Which factor labels exist so far, in TransformerLens's order: the bookkeeping a
    materialised stack and a streamed reduction share.

    Terms enter in layout order, so the live non-correction rows are a growing prefix;
    correction rows sit at the end.
    """

    def __init__(self, kinds: dict[str, str]):
        self.kinds = kinds
        self.slot = {label: k for k, label in enumerate(kinds)}  # the layout puts c rows last
        self.n_terms = sum(kind != "c" for kind in kinds.values())
        self.touched: set[str] = set()
        self.end = 0  # rows [0, end) hold live non-correction terms
        self.pos = 0  # the recipe's current step (see DecompositionRecipe.steps)
        if is_coarse(kinds):  # coarse decompositions always hold every kind
            self.touched, self.end = set(kinds), len(kinds) - 1

    def touch(self, labels: Sequence[str]) -> int:
        """Mark `labels` (consecutive) live; their first slot."""
        k = self.slot[labels[0]]
        self.touched.update(labels)
        if self.kinds[labels[0]] != "c":
            self.end = max(self.end, k + len(labels))
        return k

    def rows(self) -> list[int]:
        """The slots of the live rows, in order."""
        c_rows = sorted(self.slot[label] for label in self.touched if self.kinds[label] == "c")
        return [*range(self.end), *c_rows]

    def add(self, label: str, value: Tensor) -> None:
        """Add `value` to the term `label` (summed when it already holds one)."""
        raise NotImplementedError

    def claim(self, labels: Sequence[str], device: torch.device) -> Tensor:
        """Rows ``[len(labels) batch pos d_model]`` for new consecutive labels (head outputs),
        to be written in place and then handed to `commit`."""
        raise NotImplementedError

    def commit(self, labels: Sequence[str], rows: Tensor) -> None:
        """`claim`'s rows hold their final values."""
        raise NotImplementedError

    def live(self) -> list[Tensor]:
        """Every live term a norm on the residual stream maps (in place)."""
        raise NotImplementedError

    def labelled(self, rows: list[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        labels = list(self.kinds)
        picked = tuple(labels[k] for k in rows)
        return picked, tuple(self.kinds[label] for label in picked)


class Stack(Rows):
    """Factor rows at fixed places in one ``[factor batch pos d_model]`` buffer. A finished
    stack is already ordered and needs no copy."""

    def __init__(self, kinds: dict[str, str], like: Tensor, dtype: torch.dtype):
        super().__init__(kinds)
        self.buf = like.new_empty((len(kinds), *like.shape), dtype=dtype)
        if is_coarse(kinds):
            self.buf.zero_()

    def add(self, label: str, value: Tensor) -> None:
        k, first = self.slot[label], label not in self.touched
        self.touch([label])
        value = value.to(self.buf.device)  # terms are summed here
        if first:  # the row holds uninitialised memory
            self.buf[k].copy_(value)
        else:
            self.buf[k] += value

    def claim(self, labels: Sequence[str], device: torch.device) -> Tensor:
        k = self.touch(labels)  # the buffer's own rows, wherever the block runs
        return self.buf[k : k + len(labels)]

    def commit(self, labels: Sequence[str], rows: Tensor) -> None:
        pass  # written in place already

    def live(self) -> list[Tensor]:
        c_rows = sorted(self.slot[label] for label in self.touched if self.kinds[label] == "c")
        return [self.buf[: self.end], *(self.buf[k] for k in c_rows)]

    def snapshot(self, copy: bool) -> tuple[Tensor, tuple[str, ...], tuple[str, ...]]:
        """The live rows in order; a view of the buffer when `copy` is False and it can be."""
        rows = self.rows()
        has_c = len(rows) > self.end
        if rows == list(range(len(rows))) and (self.end == self.n_terms or not has_c):
            factors = self.buf[: len(rows)]
            factors = factors.clone() if copy else factors
        else:
            factors = self.buf.index_select(0, torch.tensor(rows, device=self.buf.device))
        return (factors, *self.labelled(rows))


@dataclass(frozen=True)
class NormMap:
    """``t -> w * (per_token * t)`` (each term centred first where `center`): a norm with
    fixed sigma, or a sublayer's multiplier. `per_token`: ``[batch pos 1]`` or a number;
    `w`: per feature ``[d_model]`` or None."""

    per_token: Tensor | float
    center: bool
    w: Tensor | None = None

    @property
    def gain(self) -> Tensor | float:
        """Both gains multiplied out (``[batch pos d_model]`` where the norm has a weight)."""
        return self.per_token if self.w is None else self.per_token * self.w

    @property
    def identity(self) -> bool:
        plain = isinstance(self.per_token, float) and self.per_token == 1.0
        return plain and not self.center and self.w is None

    def scale(self, t: Tensor) -> Tensor:
        """The gains alone, never centring (a norm's own centering term)."""
        t = t * _on(self.per_token, t)
        return t if self.w is None else t * self.w.to(t.device)

    def __call__(self, t: Tensor) -> Tensor:
        if self.identity:  # most blocks: no copy
            return t
        return self.scale(t - t.mean(-1, keepdim=True) if self.center else t)

    def apply_(self, t: Tensor) -> None:
        if self.center:
            t.sub_(t.mean(-1, keepdim=True))
        if not self.identity:
            t.mul_(_on(self.per_token, t))
            if self.w is not None:
                t.mul_(self.w.to(t.device))


def _on(gain: Tensor | float, t: Tensor) -> Tensor | float:
    return gain.to(t.device) if isinstance(gain, Tensor) else gain


def head_values(
    spec: ModelSpec, L: int, cache, heads: slice, dt: torch.dtype, value_bias: bool = False
) -> Float[Tensor, "batch key_pos head_index d_head"]:
    """The values query heads `heads` of block `L` read (their KV heads under grouped-query
    attention), without ``b_V`` unless `value_bias`: ``hook_v`` holds it (`check_values`)."""
    blk = spec.blocks[L]
    v = blk.values(cache)  # [batch pos head d], whatever the hook's axis order
    v = v[:, :, heads] if v.shape[2] == spec.n_heads else v[:, :, list(spec.kv_head[heads])]
    v = v.to(dt)
    return v if value_bias or blk.b_V is None else v - blk.b_V[heads].to(v.device, dt)


def check_patterns(
    spec: ModelSpec, cache, mask: Tensor | None, n_blocks: int | None = None
) -> None:
    """Check every real query's pattern (of the first `n_blocks` blocks, those read) against
    what the run must have been, before work.

    - a causal model whose pattern weighs later keys is refused: the forward pass is not the
      model's (TransformerLens's bridge drops ``openai-gpt``'s causal mask under an attention
      mask), so no decomposition of it answers a question about the model;
    - weight on a key `mask` calls padding means the cache was run without that mask (or with
      another): decomposing it under this one would mix two runs.
    """
    for L, blk in enumerate(spec.blocks[:n_blocks]):
        if blk.mixer is not None:  # no pattern to check
            continue
        a = cache[blk.pattern].nan_to_num(0.0)
        real = None if mask is None else mask.bool().to(a.device)  # [batch pos]
        rows = torch.ones_like(a, dtype=torch.bool) if real is None else real[:, None, :, None]
        if spec.causal:
            later = torch.ones(a.shape[-2:], dtype=torch.bool, device=a.device).triu(1)
            leak = a.masked_fill(~(later & rows), 0.0).abs().max().item()
            if leak > 1e-6:
                _not_causal(spec, L, leak)
        if real is not None:
            padded = a.masked_fill(~(rows & ~real[:, None, None, :]), 0.0).abs().max().item()
            if padded > 1e-6:
                raise ValueError(
                    f"block {L}'s pattern gives padded keys weight up to {padded:.2g}: this "
                    "cache was not run with this attention_mask; pass the mask it was run with"
                )


def _not_causal(spec: ModelSpec, L: int, leak: float) -> None:
    raise NotImplementedError(
        f"{spec.architecture} is causal, but block {L}'s pattern {spec.blocks[L].pattern} "
        f"gives later keys weight up to {leak:.2g}: this run drops the causal mask (a "
        "TransformerLens bridge bug on openai-gpt), so tl_decomp refuses to decompose it"
    )


def check_values(spec: ModelSpec, L: int, a: Tensor, v: Tensor, z: Tensor, dt) -> None:
    """Refuse unless ``z == pattern @ v`` (both with ``b_V`` or both without): only then do
    the terms per key position sum to the heads' outputs. Output gates (Laguna, AFMoE) and
    norms between the heads and ``W_O`` (BitNet) break it. NaN rows (padded queries that see
    no key in a sliding window) are left to the sum's own check."""
    diff = einops.einsum(a, v, "b h q k, b k h dh -> b q h dh") - z
    err = diff.abs().nan_to_num(0.0).max().item()
    scale = max(z.abs().nan_to_num(0.0).max().item(), 1e-30)
    if err > spec.tolerance(dt, True) * scale:
        blk = spec.blocks[L]
        raise NotImplementedError(
            f"splitting heads by key position on {spec.architecture}: block {L}'s {blk.z} is "
            f"not {blk.pattern} times {blk.v} (relative error {err / scale:.2g}; an output gate "
            "or a norm between the heads and W_O?); granularity='head' splits them exactly"
        )
