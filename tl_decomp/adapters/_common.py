"""What every model class's reader shares: the model's class and architecture, the
unsupported-feature error, and the `ModelSpec` fields filled the same way for all classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor

from tl_decomp._core.spec import Block, Norm


def model_kind(model: Any) -> str:
    names = [c.__name__ for c in type(model).__mro__]
    for k in ("TransformerBridge", "HookedEncoder", "HookedTransformer"):
        if k in names:
            return k
    raise NotImplementedError(
        f"tl_decomp does not support model class {type(model).__name__}: expected a "
        "TransformerBridge, HookedTransformer or HookedEncoder"
    )


def unsupported(feature: str, model: Any) -> NotImplementedError:
    return NotImplementedError(
        f"{feature} is not supported by tl_decomp (model class {type(model).__name__}, "
        f"architecture {architecture(model)})"
    )


def architecture(model: Any) -> str:
    cfg = model.cfg
    return str(getattr(cfg, "architecture", None) or cfg.original_architecture or "unknown")


def vec(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def check_hooked(model: Any) -> None:
    """Features `HookedTransformer` expresses in ways `tl_decomp.adapters` does not read."""
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
            raise unsupported(feature, model)
    pos = cfg.positional_embedding_type
    if pos not in ("standard", "rotary"):
        raise unsupported(f"positional embedding type {pos!r} on HookedTransformer", model)


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
    raise unsupported(f"normalization type {nt!r}", model)


def fields(model: Any, kind: str, placement: Literal["pre", "post"]) -> dict[str, Any]:
    """The ModelSpec fields every model class fills the same way."""
    cfg = model.cfg
    pos = {"standard": "learned", "rotary": "rotary", "alibi": "alibi"}
    return dict(
        model_class=type(model).__name__,
        architecture=architecture(model),
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
    b_in = getattr(getattr(model.blocks[0], "mlp", None), "b_in", None)  # SSM blocks: no MLP
    if b_in is not None:
        found.add("b_in")
    if any(n is not None and n.b is not None for n in norms):
        found.add("ln_b")
    return frozenset(found)
