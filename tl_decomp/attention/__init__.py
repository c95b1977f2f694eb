"""Attention beyond its pattern (Brunner et al. 2020 §3): effective attention (the pattern's
component outside the value-output null space), the null-space diagnostics, and corpus
analyses (correlation with raw attention, attention to special tokens).

`_effective` holds the public functions and the per-block options; `_projection` / `_causal`
the projections (full, causal, windowed); `_null_space` the diagnostics; `_corpus` the
corpus loops.
"""

from tl_decomp.attention._corpus import (
    AttentionCorrelation,
    SpecialTokenAttention,
    attention_correlation,
    special_token_attention,
)
from tl_decomp.attention._effective import (
    effective_attention,
    effective_attention_layers,
    names_filter,
)
from tl_decomp.attention._null_space import NullSpace, attention_null_space, null_space_from

__all__ = [
    "AttentionCorrelation",
    "NullSpace",
    "SpecialTokenAttention",
    "attention_correlation",
    "attention_null_space",
    "effective_attention",
    "effective_attention_layers",
    "names_filter",
    "null_space_from",
    "special_token_attention",
]
