"""Probing subsets of factors (Mickus et al. 2022 §4–6): word factors gathered over a
labelled corpus, classifiers fitted on each subset of ``i, h, f, c``, and masked prediction
from subsets.

`_words` gathers `WordFactors`; `_classifiers` the subsets, splits and classifiers (scikit-
learn); `_probes` the public probing functions; `_masked` masked-token prediction.
"""

from tl_decomp.probing._classifiers import split
from tl_decomp.probing._masked import MaskedPrediction, corrupt, masked_prediction
from tl_decomp.probing._probes import SUBSETS, ProbeTable, probe_factors, probe_subsets
from tl_decomp.probing._words import WordFactors, word_factors

__all__ = [
    "SUBSETS",
    "MaskedPrediction",
    "ProbeTable",
    "WordFactors",
    "corrupt",
    "masked_prediction",
    "probe_factors",
    "probe_subsets",
    "split",
    "word_factors",
]
