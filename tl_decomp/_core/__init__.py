"""The package's own vocabulary, below everything else: what a model is to the math
(`spec`), the layer convention (`convention`), input checks (`checks`), the result contract
(`results`), shared type aliases (`aliases`), token classes (`token_classes`),
multi-process helpers (`distributed`), the thread switch (`threads`) and file
writing (`files`). Imports nothing from the rest of tl_decomp.
"""

from tl_decomp._core.aliases import Cache, Model, TextInput
from tl_decomp._core.convention import Layer
from tl_decomp._core.results import Result, Tabular, short_repr, text_table
from tl_decomp._core.spec import TOLERANCE, Block, InexactDecompositionError, ModelSpec, Norm
from tl_decomp._core.token_classes import TokenClassShares, token_class_shares, token_classes

__all__ = [
    "TOLERANCE",
    "Block",
    "Cache",
    "InexactDecompositionError",
    "Layer",
    "Model",
    "ModelSpec",
    "Norm",
    "Result",
    "Tabular",
    "TextInput",
    "TokenClassShares",
    "short_repr",
    "text_table",
    "token_class_shares",
    "token_classes",
]
