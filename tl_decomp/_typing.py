"""Shape aliases in TransformerLens's axis vocabulary (plus ``factor``)."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
Mask = Int[Tensor, "batch pos"]
Resid = Float[Tensor, "batch pos d_model"]
Factors = Float[Tensor, "factor batch pos d_model"]
Pattern = Float[Tensor, "batch head_index query_pos key_pos"]

__all__ = ["Factors", "Mask", "Pattern", "Resid", "Tokens"]
