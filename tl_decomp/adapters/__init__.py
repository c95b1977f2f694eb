"""What a model is and how to run it: the only code that knows TransformerLens's classes
and versions.

`model_spec` derives a `ModelSpec` (norms, multipliers, biases, head maps, key sets and
hooks) from any supported model, reading a `TransformerBridge`'s component tree or a
`HookedTransformer` / `HookedEncoder` config; the runner tokenises, checks input and runs with
temporary hooks; the experts module reads mixture-of-experts routing; the MLM module the
masked-language-model head. Everything above reads a `ModelSpec` and these functions, never a
model class.
"""

from tl_decomp.adapters._derive import model_spec, windows
from tl_decomp.adapters._experts import (
    FrozenMoE,
    Routing,
    capture,
    eager_experts,
    expert_terms,
    freeze_moe,
    hold_experts,
    moe_module,
    shared_module,
    tile_variants,
)
from tl_decomp.adapters._freeze import FrozenSites, frozen_sites
from tl_decomp.adapters._mlm import mlm_logits, tokenize_offsets
from tl_decomp.adapters._running import (
    as_tokens,
    cache_model,
    check_corpus,
    check_finite,
    check_lengths,
    embedding_matrix,
    model_device,
    norm_eps,
    run_with_cache,
    run_with_hooks,
    tokenize,
)
from tl_decomp.adapters._seq2seq import (
    STACKS,
    StackName,
    cross_spec,
    cross_values,
    is_seq2seq,
    rescale,
    run_seq2seq,
    start_tokens,
    unembedding,
)
from tl_decomp.adapters._state import (
    check_no_user_hooks,
    evaluating,
    exclusive,
    load_forward_ad,
    user_hooks,
)
from tl_decomp.adapters._vision import (
    PIXELS_HOOK,
    Image,
    embedding_terms,
    image_corpus,
    image_input,
    input_labels,
    sample_input,
)

__all__ = [
    "STACKS",
    "StackName",
    "FrozenMoE",
    "FrozenSites",
    "Image",
    "PIXELS_HOOK",
    "Routing",
    "as_tokens",
    "cache_model",
    "capture",
    "check_no_user_hooks",
    "check_corpus",
    "check_finite",
    "cross_spec",
    "cross_values",
    "check_lengths",
    "eager_experts",
    "embedding_matrix",
    "embedding_terms",
    "evaluating",
    "exclusive",
    "expert_terms",
    "freeze_moe",
    "frozen_sites",
    "hold_experts",
    "image_corpus",
    "image_input",
    "input_labels",
    "is_seq2seq",
    "load_forward_ad",
    "mlm_logits",
    "model_device",
    "model_spec",
    "moe_module",
    "norm_eps",
    "rescale",
    "run_seq2seq",
    "run_with_cache",
    "run_with_hooks",
    "sample_input",
    "shared_module",
    "start_tokens",
    "tile_variants",
    "tokenize",
    "tokenize_offsets",
    "unembedding",
    "user_hooks",
    "windows",
]
