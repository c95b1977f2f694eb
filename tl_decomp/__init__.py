"""tl_decomp: what a transformer's hidden vectors are made of.

Exact vector-factor decompositions (Mickus et al., TACL 2022) and identifiability analyses
(Brunner et al., ICLR 2020) for TransformerLens models. Importing defines things only.
"""

from tl_decomp import plots, views
from tl_decomp._adapters import ModelSpec, model_spec
from tl_decomp._layers import Layer
from tl_decomp._spec import InexactDecompositionError
from tl_decomp.attention import effective_attention, effective_attention_layers
from tl_decomp.attention import names_filter as attention_names_filter
from tl_decomp.attention_corpus import (
    AttentionCorrelation,
    SpecialTokenAttention,
    attention_correlation,
    special_token_attention,
)
from tl_decomp.attribution import AttributionResult, hidden_token_attribution
from tl_decomp.corpus import load_corpus
from tl_decomp.datasets import LabelledWords, load_pos
from tl_decomp.decompose import (
    Decomposition,
    DecompositionRecipe,
    decompose,
    decompose_layers,
)
from tl_decomp.decompose import names_filter as decomposition_names_filter
from tl_decomp.identifiability import (
    IdentifiabilityResult,
    identifiability_from_states,
    states_from_cache,
    states_names_filter,
    token_identifiability,
)
from tl_decomp.logit import LogitAttribution, logit_attribution
from tl_decomp.masked import MaskedPrediction, masked_prediction
from tl_decomp.models import load_model, tiny_model
from tl_decomp.null_space import NullSpace, attention_null_space
from tl_decomp.probing import (
    SUBSETS,
    ProbeTable,
    WordFactors,
    probe_factors,
    probe_subsets,
    word_factors,
)
from tl_decomp.report import Report, report
from tl_decomp.sources import names_filter as source_names_filter
from tl_decomp.sources import (
    norm_based_attention,
    source_logit_attribution,
    source_norms,
    source_shares,
)
from tl_decomp.stats import (
    CheckpointComparison,
    FFLinearity,
    LayerStats,
    anisotropy,
    compare_checkpoints,
    corpus_statistics,
    ff_linearity,
)

__all__ = [
    "SUBSETS",
    "AttentionCorrelation",
    "AttributionResult",
    "CheckpointComparison",
    "Decomposition",
    "DecompositionRecipe",
    "FFLinearity",
    "IdentifiabilityResult",
    "LogitAttribution",
    "InexactDecompositionError",
    "LabelledWords",
    "Layer",
    "LayerStats",
    "MaskedPrediction",
    "ModelSpec",
    "NullSpace",
    "ProbeTable",
    "Report",
    "SpecialTokenAttention",
    "WordFactors",
    "anisotropy",
    "attention_correlation",
    "attention_names_filter",
    "attention_null_space",
    "compare_checkpoints",
    "corpus_statistics",
    "decompose",
    "decompose_layers",
    "decomposition_names_filter",
    "effective_attention",
    "effective_attention_layers",
    "ff_linearity",
    "plots",
    "hidden_token_attribution",
    "identifiability_from_states",
    "load_corpus",
    "logit_attribution",
    "load_model",
    "load_pos",
    "masked_prediction",
    "model_spec",
    "norm_based_attention",
    "probe_factors",
    "probe_subsets",
    "report",
    "special_token_attention",
    "states_from_cache",
    "states_names_filter",
    "source_logit_attribution",
    "source_names_filter",
    "source_norms",
    "source_shares",
    "tiny_model",
    "token_identifiability",
    "views",
    "word_factors",
]
