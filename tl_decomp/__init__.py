"""tl_decomp: what a transformer's hidden vectors are made of.

Exact vector-factor decompositions (Mickus et al., TACL 2022) and identifiability analyses
(Brunner et al., ICLR 2020) for TransformerLens models. Importing defines things only.

The subpackages, lowest first (each imports only those below it; `CONTRIBUTING.md`):
`_core` (vocabulary, layer convention, checks, result contract) · `adapters` (what a model
is, how to run it) · `models`, `datasets` (bundled, offline) · `decomposition` ·
`attention`, `identifiability`, `probing` · `viz` · `reporting` · `cli`.
"""

from tl_decomp._core import (
    Cache,
    InexactDecompositionError,
    Layer,
    Model,
    ModelSpec,
    TextInput,
    TokenClassShares,
    token_class_shares,
)
from tl_decomp.adapters import model_spec
from tl_decomp.attention import (
    AttentionCorrelation,
    NullSpace,
    SpecialTokenAttention,
    attention_correlation,
    attention_null_space,
    effective_attention,
    effective_attention_layers,
    special_token_attention,
)
from tl_decomp.attention import names_filter as attention_names_filter
from tl_decomp.datasets import LabelledWords, load_corpus, load_pos
from tl_decomp.decomposition import (
    CheckpointComparison,
    Decomposition,
    DecompositionRecipe,
    FFLinearity,
    InformationFlow,
    LayerStats,
    LogitAttribution,
    Reduced,
    anisotropy,
    compare_checkpoints,
    corpus_statistics,
    decompose,
    decompose_layers,
    ff_linearity,
    information_flow,
    logit_attribution,
    norm_based_attention,
    source_logit_attribution,
    source_names_filter,
    source_norms,
    source_shares,
    token_logit_attribution,
)
from tl_decomp.decomposition import names_filter as decomposition_names_filter
from tl_decomp.identifiability import (
    AttributionResult,
    IdentifiabilityResult,
    hidden_token_attribution,
    identifiability_from_states,
    states_from_cache,
    states_names_filter,
    token_identifiability,
)
from tl_decomp.models import load_model, tiny_model
from tl_decomp.probing import (
    SUBSETS,
    MaskedPrediction,
    ProbeTable,
    WordFactors,
    masked_prediction,
    probe_factors,
    probe_subsets,
    word_factors,
)
from tl_decomp.reporting import Report, report
from tl_decomp.viz import plots, views

__all__ = [
    "SUBSETS",
    "AttentionCorrelation",
    "AttributionResult",
    "Cache",
    "CheckpointComparison",
    "Decomposition",
    "DecompositionRecipe",
    "FFLinearity",
    "IdentifiabilityResult",
    "InformationFlow",
    "InexactDecompositionError",
    "LabelledWords",
    "Layer",
    "LayerStats",
    "LogitAttribution",
    "MaskedPrediction",
    "Model",
    "ModelSpec",
    "NullSpace",
    "ProbeTable",
    "Reduced",
    "Report",
    "SpecialTokenAttention",
    "TextInput",
    "TokenClassShares",
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
    "hidden_token_attribution",
    "identifiability_from_states",
    "information_flow",
    "load_corpus",
    "load_model",
    "load_pos",
    "logit_attribution",
    "masked_prediction",
    "model_spec",
    "norm_based_attention",
    "plots",
    "probe_factors",
    "probe_subsets",
    "report",
    "source_logit_attribution",
    "source_names_filter",
    "source_norms",
    "source_shares",
    "special_token_attention",
    "states_from_cache",
    "states_names_filter",
    "tiny_model",
    "token_class_shares",
    "token_logit_attribution",
    "token_identifiability",
    "views",
    "word_factors",
]
