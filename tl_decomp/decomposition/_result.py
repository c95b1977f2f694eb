"""The decomposition's result: the factor stack, its labels and kinds, the target it sums
to and the error measured when it was built (docs/method.md §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core.convention import Layer
from tl_decomp._core.results import Result
from tl_decomp.decomposition._algebra import ALL_KINDS, KINDS, Centering
from tl_decomp.decomposition._logit import logit_attribution


@dataclass(frozen=True, repr=False)
class Decomposition(Result):
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
        tokens, attention_mask: the input (mask 1 = real token, 0 = padding); a vision
            model's input is its pixel values ``[batch channels height width]``.
        max_abs_error: ``max |factors.sum(0) - target|`` over every position, padding included.
    """

    factors: Float[Tensor, "factor batch pos d_model"]
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    target: Float[Tensor, "batch pos d_model"]
    site: str
    layer: Layer
    tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch channels height width"] | None
    attention_mask: Int[Tensor, "batch pos"] | None
    max_abs_error: float
    centering: Centering = "correction"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def relative_error(self) -> float:
        """`max_abs_error` divided by ``max |target|``."""
        return self.max_abs_error / max(self.target.abs().max().item(), 1e-30)

    def coarse(self) -> Decomposition:
        """The same decomposition summed into the paper's four terms ``i, h, f, c`` (and ``x``
        cross-attention, ``m`` token mixers where the model has them)."""
        if "t" in self.kinds:
            raise ValueError(
                "a decomposition by token has no i, h, f, c terms: decompose with "
                "granularity='coarse' (or 'head') for those"
            )
        kinds = tuple(k for k in ALL_KINDS if k in KINDS or k in self.kinds)
        index = torch.tensor([kinds.index(k) for k in self.kinds], device=self.factors.device)
        out = self.factors.new_zeros((len(kinds), *self.factors.shape[1:]))
        out.index_add_(0, index, self.factors)
        return replace(self, factors=out, labels=kinds, kinds=kinds)

    def shares(self) -> Float[Tensor, "factor batch pos"]:
        """The paper's statistic ``<e, t> / ||e||^2`` per factor (signed; sums to 1). A
        state that is exactly zero has no shares: NaN there, not a row of zeros."""
        e = self.target.to(self.factors.dtype)
        return self._over_state((self.factors * e).sum(-1), (e * e).sum(-1))

    def norm_ratios(self) -> Float[Tensor, "factor batch pos"]:
        """``||t|| / ||e||`` per factor (Mickus & Vazquez 2023); NaN where ``e`` is zero."""
        e = self.target.to(self.factors.dtype)
        return self._over_state(self.factors.norm(dim=-1), e.norm(dim=-1))

    def _over_state(self, num: Tensor, den: Tensor) -> Tensor:
        # Padding zeroed by the decomposition (sliding windows) keeps 0, as streamed ones do.
        zero = (den == 0) & self.mask().to(den.device)
        return (num / den.clamp_min(1e-30)).masked_fill(zero, math.nan)

    def cosines(self) -> Float[Tensor, "factor batch pos"]:
        """``cos(t, e)`` per factor."""
        e = self.target.to(self.factors.dtype)
        return torch.nn.functional.cosine_similarity(self.factors, e.unsqueeze(0), dim=-1)

    def logit_attrs(self, tokens: Any, incorrect: Any = None) -> Any:
        """Each factor's logit for `tokens` (minus `incorrect`'s): exact for the final
        embedding, the decomposed logit lens at a block output. See
        `tl_decomp.decomposition._logit.logit_attribution`."""
        return logit_attribution(self, tokens, incorrect)

    def str_tokens(self, batch: int = 0) -> list[str]:
        """The input's tokens as text (each id decoded alone), to set beside ``pos{k}``; a
        vision model's positions as ``CLS``, ``patch0 (r0,c0)``, ... (row-major patches)."""
        image = adapters.image_input(self.meta["recipe"].model) if "recipe" in self.meta else None
        if image is not None:
            return image.labels()
        if self.tokens is None:
            raise ValueError("this decomposition was read from a cache: it holds no token ids")
        tokenizer = self.meta["recipe"].model.tokenizer
        ids = self.tokens[batch][self.mask()[batch].to(self.tokens.device)].tolist()
        return [tokenizer.decode([i]) for i in ids]

    def mask(self) -> Tensor:
        """Boolean ``[batch pos]``: the real (unpadded) positions."""
        if self.attention_mask is None:
            return torch.ones(self.target.shape[:2], dtype=torch.bool)
        return self.attention_mask.bool()

    def rows(self) -> list[dict[str, Any]]:
        """One row per factor, real position: ``factor, kind, batch, pos, share, norm_ratio,
        cosine`` (padding positions left out)."""
        stats = torch.stack([self.shares(), self.norm_ratios(), self.cosines()], -1)
        out = []
        for b, p in self.mask().nonzero().tolist():
            for k, (label, kind) in enumerate(zip(self.labels, self.kinds, strict=True)):
                share, ratio, cos = stats[k, b, p].tolist()
                out.append({"factor": label, "kind": kind, "batch": b, "pos": p, "share": share,
                            "norm_ratio": ratio, "cosine": cos})  # fmt: skip
        return out
