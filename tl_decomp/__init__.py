"""tl_decomp: what a transformer's hidden vectors are made of.

Exact vector-factor decompositions (Mickus et al., TACL 2022) and identifiability analyses
(Brunner et al., ICLR 2020) for TransformerLens models. Importing defines things only.
"""

from tl_decomp._adapters import ModelSpec, model_spec
from tl_decomp.corpus import load_corpus
from tl_decomp.decompose import (
    Decomposition,
    DecompositionRecipe,
    decompose,
    decompose_layers,
)
from tl_decomp.models import load_model, tiny_model
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
    "CheckpointComparison",
    "Decomposition",
    "DecompositionRecipe",
    "FFLinearity",
    "LayerStats",
    "ModelSpec",
    "anisotropy",
    "compare_checkpoints",
    "corpus_statistics",
    "decompose",
    "decompose_layers",
    "ff_linearity",
    "load_corpus",
    "load_model",
    "model_spec",
    "tiny_model",
]
