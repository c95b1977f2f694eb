"""Vector-factor decomposition (Mickus et al. 2022): every hidden state written exactly as
input + attention + feed-forward + correction terms, per layer, head, expert or source token.

`Decomposition` is the result; `DecompositionRecipe` turns a cache into one (which hooks to
cache, one walk over the blocks, the exactness check); `_terms` / `_algebra` hold each term's
algebra; `_reduce` streams per-factor statistics without the stack; `_logit` the logit
attribution and lens; `_sources` the attention term by source token; `_stats` corpus
statistics and checkpoint comparison; `_linearity` the FF sublayer's linearity.
"""

from tl_decomp.decomposition._algebra import KINDS, BiasRule, Centering, Granularity, Statistic
from tl_decomp.decomposition._decompose import decompose, decompose_layers, names_filter
from tl_decomp.decomposition._flow import (
    InformationFlow,
    information_flow,
    token_logit_attribution,
)
from tl_decomp.decomposition._linearity import FFLinearity, ff_linearity
from tl_decomp.decomposition._logit import LogitAttribution, logit_attribution
from tl_decomp.decomposition._recipe import DecompositionRecipe
from tl_decomp.decomposition._reduce import STATISTICS, Reduced, check_statistic
from tl_decomp.decomposition._result import Decomposition
from tl_decomp.decomposition._sources import names_filter as source_names_filter
from tl_decomp.decomposition._sources import (
    norm_based_attention,
    source_logit_attribution,
    source_norms,
    source_shares,
)
from tl_decomp.decomposition._stats import (
    CheckpointComparison,
    LayerStats,
    anisotropy,
    compare_checkpoints,
    corpus_statistics,
)

__all__ = [
    "KINDS",
    "BiasRule",
    "STATISTICS",
    "Centering",
    "CheckpointComparison",
    "Decomposition",
    "DecompositionRecipe",
    "FFLinearity",
    "Granularity",
    "InformationFlow",
    "LayerStats",
    "LogitAttribution",
    "Reduced",
    "Statistic",
    "anisotropy",
    "check_statistic",
    "compare_checkpoints",
    "corpus_statistics",
    "decompose",
    "decompose_layers",
    "ff_linearity",
    "information_flow",
    "logit_attribution",
    "names_filter",
    "norm_based_attention",
    "source_logit_attribution",
    "source_names_filter",
    "source_norms",
    "source_shares",
    "token_logit_attribution",
]
