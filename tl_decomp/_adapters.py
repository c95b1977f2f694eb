"""The one place that derives, from a model, what the math needs to know about it.

`model_spec(model)` describes any supported model as a `tl_decomp._spec.ModelSpec`: the
norms on the residual path and where they sit, multipliers, biases, the attention's head
map and key sets, and the hooks that hold each activation. For `TransformerBridge` (3.x and
4.x, raw or compatibility mode) the layout is read from the bridge's component tree and
checked numerically: each norm is run once against the formula the math will apply, and
where a norm sits is read off one tiny forward pass. The decomposition then verifies every
result against the model's own activation, so a layout this module misreads raises there
rather than returning a wrong sum. `HookedTransformer` / `HookedEncoder` (3.x) are read from
their config in `tl_decomp._hooked`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from torch import Tensor

from tl_decomp._spec import Block, InexactDecompositionError, ModelSpec, Norm

__all__ = ["Block", "InexactDecompositionError", "ModelSpec", "Norm", "model_spec", "windows"]


def model_spec(model: Any) -> ModelSpec:
    """Describe `model` for the math modules, or raise `NotImplementedError` naming why not.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> spec = model_spec(tiny_model("bert"))
        >>> spec.norm_placement, spec.causal, [label for label, _ in spec.embeds]
        ('post', False, ['embed', 'pos_embed', 'token_type_embed'])
    """
    from tl_decomp import _bridge, _hooked

    kind = _kind(model)
    if kind == "TransformerBridge":
        spec = _bridge.spec_bridge(model)
    elif kind == "HookedEncoder":
        spec = _hooked.spec_hooked_encoder(model)
    else:
        spec = _hooked.spec_hooked_transformer(model)
    wins = windows(model, spec.n_layers)
    return replace(
        spec, blocks=tuple(replace(b, window=w) for b, w in zip(spec.blocks, wins, strict=True))
    )


def windows(model: Any, n_layers: int) -> tuple[int | None, ...]:
    """Per block: how many keys (itself included) a query sees, or None for every earlier key.

    Read from the Hugging Face config (`layer_types` + `sliding_window`, GPT-Neo's
    `attention_layers` + `window_size`, or one `sliding_window` for all layers) or from
    `HookedTransformerConfig` (`attn_types` + `window_size`). Key j is visible to query i when
    ``i - window < j <= i``, Hugging Face's sliding-window mask. The attention code checks
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
    for t in types[:n_layers]:
        if t in ("full_attention", "global"):
            out.append(None)
        elif t in ("sliding_attention", "local"):
            out.append(int(w) if w else None)
        else:
            raise NotImplementedError(f"attention layer type {t!r} is not supported by tl_decomp")
    return tuple(out)


def _kind(model: Any) -> str:
    names = [c.__name__ for c in type(model).__mro__]
    for k in ("TransformerBridge", "HookedEncoder", "HookedTransformer"):
        if k in names:
            return k
    raise NotImplementedError(
        f"tl_decomp does not support model class {type(model).__name__}: expected a "
        "TransformerBridge, HookedTransformer or HookedEncoder"
    )


def _unsupported(feature: str, model: Any) -> NotImplementedError:
    return NotImplementedError(
        f"{feature} is not supported by tl_decomp (model class {type(model).__name__}, "
        f"architecture {_architecture(model)})"
    )


def _architecture(model: Any) -> str:
    cfg = model.cfg
    return str(getattr(cfg, "architecture", None) or cfg.original_architecture or "unknown")


def vec(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def check_hooked(model: Any) -> None:
    """Features `HookedTransformer` expresses in ways `tl_decomp._hooked` does not read."""
    cfg = model.cfg
    checks = {
        "post-sublayer normalisation on HookedTransformer (use a TransformerBridge)": getattr(
            cfg, "use_normalization_before_and_after", False
        ),
        "mixture-of-experts MLPs on HookedTransformer (use a TransformerBridge)": getattr(
            cfg, "num_experts", None
        ),
        "a post-embedding LayerNorm on HookedTransformer (use a TransformerBridge)": getattr(
            cfg, "post_embedding_ln", False
        ),
        "attention-only blocks": getattr(cfg, "attn_only", False),
    }
    for feature, on in checks.items():
        if on:
            raise _unsupported(feature, model)
    pos = cfg.positional_embedding_type
    if pos not in ("standard", "rotary"):
        raise _unsupported(f"positional embedding type {pos!r} on HookedTransformer", model)


def b_v(attn: Any, n_heads: int) -> Tensor | None:
    b = getattr(attn, "b_V", None)
    if b is None:
        return None
    b = b.detach()
    # A bridge exposes b_V per KV head under GQA; the math wants it per query head.
    return b.repeat_interleave(n_heads // b.shape[0], dim=0) if b.shape[0] != n_heads else b


def ln_weights(ln: Any, rms: bool) -> tuple[Tensor | None, Tensor | None]:
    """A HookedTransformer norm's gain and bias."""
    if getattr(getattr(ln, "cfg", None), "rmsnorm_uses_offset", False):
        raise NotImplementedError("RMSNorm with a (1 + w) gain on HookedTransformer")
    return vec(getattr(ln, "w", None)), None if rms else vec(getattr(ln, "b", None))


def norm_type(model: Any) -> Literal["LN", "RMS", "none"]:
    nt = model.cfg.normalization_type
    if nt in ("LN", "LNPre"):
        return "LN"
    if nt in ("RMS", "RMSPre"):
        return "RMS"
    if nt is None:
        return "none"
    raise _unsupported(f"normalization type {nt!r}", model)


def fields(model: Any, kind: str, placement: Literal["pre", "post"]) -> dict[str, Any]:
    """The ModelSpec fields every model class fills the same way."""
    cfg = model.cfg
    pos = {"standard": "learned", "rotary": "rotary", "alibi": "alibi"}
    return dict(
        model_class=type(model).__name__,
        architecture=_architecture(model),
        norm_placement=placement,
        norm_type=norm_type(model),
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        positional=pos.get(str(cfg.positional_embedding_type), "none"),
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        biases=frozenset(),
        dtype=next(model.parameters()).dtype,
    )


def biases(blocks: Sequence[Block], model: Any, norms: Sequence[Norm | None]) -> frozenset[str]:
    found = set()
    for name in ("b_V", "b_O", "b_out"):
        if any(getattr(b, name) is not None for b in blocks):
            found.add(name)
    b_in = getattr(model.blocks[0].mlp, "b_in", None)
    if b_in is not None:
        found.add("b_in")
    if any(n is not None and n.b is not None for n in norms):
        found.add("ln_b")
    return frozenset(found)
