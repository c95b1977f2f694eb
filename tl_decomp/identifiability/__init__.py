"""Identifiability (Brunner et al. 2020 §4–5): can a token be recovered from its hidden
state, and how much of each input token does a hidden state hold?

`_states` gathers the states and runs token identifiability; `_scoring` fits the maps back to
layer 0 and scores nearest-neighbour lookups; `_maps` the maps themselves (naive, linear,
MLP); `_attribution` Hidden Token Attribution, over the Jacobian-vector products of
`_jacobian`.
"""

from tl_decomp.identifiability._attribution import AttributionResult, hidden_token_attribution
from tl_decomp.identifiability._jacobian import layer_sites, runner, source_activation
from tl_decomp.identifiability._maps import LinearFit, StoredPairs, fit_maps
from tl_decomp.identifiability._scoring import (
    IdentifiabilityResult,
    StateBatch,
    Vocab,
    identifiability_from_states,
)
from tl_decomp.identifiability._states import (
    gather_states,
    split_corpus,
    states_from_cache,
    states_names_filter,
    token_identifiability,
)

__all__ = [
    "AttributionResult",
    "LinearFit",
    "StoredPairs",
    "fit_maps",
    "gather_states",
    "layer_sites",
    "runner",
    "source_activation",
    "split_corpus",
    "IdentifiabilityResult",
    "StateBatch",
    "Vocab",
    "hidden_token_attribution",
    "identifiability_from_states",
    "states_from_cache",
    "states_names_filter",
    "token_identifiability",
]
