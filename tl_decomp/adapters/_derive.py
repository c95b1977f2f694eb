"""The one place that derives, from a model, what the math needs to know about it.

`model_spec(model)` describes any supported model as a `tl_decomp._core.spec.ModelSpec`: the
norms on the residual path and where they sit, multipliers, biases, the attention's head
map and key sets, and the hooks that hold each activation. For `TransformerBridge` (3.x and
4.x, raw or compatibility mode) the layout is read from the bridge's component tree and
checked numerically: each norm is run once against the formula the math will apply, and
where a norm sits is read off one tiny forward pass. The decomposition then verifies every
result against the model's own activation, so a layout this module misreads raises there
rather than returning a wrong sum. `HookedTransformer` / `HookedEncoder` (3.x) are read from
their config in `tl_decomp.adapters`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tl_decomp._core import checks
from tl_decomp._core.spec import Block, InexactDecompositionError, ModelSpec, Norm
from tl_decomp.adapters import _bridge, _hooked, _seq2seq
from tl_decomp.adapters._common import model_kind, unsupported
from tl_decomp.adapters._state import exclusive

__all__ = ["Block", "InexactDecompositionError", "ModelSpec", "Norm", "model_spec", "windows"]


def model_spec(model: Any, stack: _seq2seq.StackName | None = None) -> ModelSpec:
    """Describe `model` for the math modules, or raise `NotImplementedError` naming why not.

    `stack`: on an encoder–decoder, which stack (``"encoder"`` or ``"decoder"``) to describe;
    it is required there and refused elsewhere.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> spec = model_spec(tiny_model("bert"))
        >>> spec.norm_placement, spec.causal, [label for label, _ in spec.embeds]
        ('post', False, ['embed', 'pos_embed', 'token_type_embed'])
    """
    kind = model_kind(model)
    _check_weights_hold_values(model)
    # Held while read (another thread's run attaches its hooks under the same lock): the
    # outermost hold refuses hooks the caller left on the model, before any work.
    with exclusive(model):
        if stack is not None:
            checks.choice(stack, "stack", _seq2seq.STACKS)
        if kind == "TransformerBridge" and _seq2seq.is_seq2seq(model):
            if stack is None:
                raise unsupported(
                    "an encoder–decoder model outside tl_decomp.decompose / decompose_layers "
                    "with decoder_input= (its decoder) or stack='encoder'",
                    model,
                )
            return _seq2seq.spec_stack(model, stack)
        if stack is not None:
            raise ValueError(f"stack={stack!r} applies to encoder–decoder models only")
        return _spec(model, kind)


def _check_weights_hold_values(model: Any) -> None:
    """A model on the ``meta`` device (``to("meta")``, ``init_empty_weights``) has shapes and
    no values: refused by name here, not by torch's ``Tensor.item()`` deep in a probe."""
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"the model's weights are on the meta device (e.g. {meta}), which holds shapes "
            "and no values: load real weights first (e.g. model.to_empty(device='cpu') and "
            "load_state_dict, or load the model without a meta-device init)"
        )


def _spec(model: Any, kind: str) -> ModelSpec:
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) != model.cfg.n_layers:  # read everywhere below
        raise ValueError(
            f"model.cfg.n_layers is {model.cfg.n_layers!r} but the model has {len(blocks)} "
            "blocks: the config was changed after loading; restore it (or reload the model)"
        )
    if kind == "TransformerBridge":
        spec = _bridge.spec_bridge(model)
    elif kind == "HookedEncoder":
        spec = _hooked.spec_hooked_encoder(model)
    else:
        spec = _hooked.spec_hooked_transformer(model)
    mixers = frozenset(L for L, b in enumerate(spec.blocks) if b.mixer is not None)
    wins, chunks = windows(model, spec.n_layers, mixers), _chunks(model, spec.n_layers)
    blocks = zip(spec.blocks, wins, chunks, strict=True)
    return replace(spec, blocks=tuple(replace(b, window=w, chunk=c) for b, w, c in blocks))


def _chunks(model: Any, n_layers: int) -> tuple[int | None, ...]:
    """Per block: the attention chunk size (Llama 4's ``chunked_attention`` layers, from the
    config's ``layer_types`` and ``attention_chunk_size``), or None. Key j is visible to query
    i when ``j <= i`` and both fall in the same chunk, chunks counted from the first real
    token (Hugging Face's ``chunked_overlay``); the attention code checks the pattern against
    these key sets."""
    hf = getattr(getattr(model, "original_model", None), "config", None)
    types, size = getattr(hf, "layer_types", None), getattr(hf, "attention_chunk_size", None)
    if not types or not size:
        return (None,) * n_layers
    return tuple(int(size) if t == "chunked_attention" else None for t in types[:n_layers])


def windows(
    model: Any, n_layers: int, mixers: frozenset[int] = frozenset()
) -> tuple[int | None, ...]:
    """Per block: how many keys (itself included) a query sees, or None for every earlier key.

    Read from the Hugging Face config (`layer_types` + `sliding_window`, GPT-Neo's
    `attention_layers` + `window_size`, or one `sliding_window` for all layers) or from
    `HookedTransformerConfig` (`attn_types` + `window_size`). Key j is visible to query i when
    ``i - window < j <= i``, Hugging Face's sliding-window mask. `mixers`: blocks that mix
    tokens without attention (their layer type names the mixer). The attention code checks
    the pattern against the key sets derived here, so a window missed here raises there.
    """
    hf = getattr(getattr(model, "original_model", None), "config", None)
    if hf is None:
        cfg = model.cfg
        if not getattr(cfg, "use_local_attn", False):
            return (None,) * n_layers
        types, w = list(cfg.attn_types), cfg.window_size
    else:
        types, w = getattr(hf, "layer_types", None), getattr(hf, "sliding_window", None)
        if types is None and getattr(hf, "attention_layers", None):  # GPT-Neo
            types, w = list(hf.attention_layers), hf.window_size
    if types is None:
        return (int(w) if w else None,) * n_layers
    if len(types) < n_layers:
        raise NotImplementedError(f"{len(types)} attention layer types for {n_layers} blocks")
    out: list[int | None] = []
    for L, t in enumerate(types[:n_layers]):
        # A token mixer that is not attention (its own layer type) has no keys; attention
        # chunks are `_chunks`'.
        if L in mixers or t in ("full_attention", "global", "chunked_attention"):
            out.append(None)
        elif t in ("sliding_attention", "local"):
            out.append(int(w) if w else None)
        else:
            raise NotImplementedError(f"attention layer type {t!r} is not supported by tl_decomp")
    return tuple(out)
