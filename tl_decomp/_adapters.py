"""The one place that knows how TransformerLens model classes and versions differ.

`model_spec(model)` describes any supported model in one vocabulary: architecture facts, the
weights the math needs, and the hook names that hold each activation. Every other module
reads a `ModelSpec` and never asks which class or TransformerLens version it got.

Supported: `TransformerBridge` (TransformerLens 3.x and 4.x, raw or compatibility mode),
`HookedTransformer` and `HookedEncoder` (3.x). Anything this module cannot describe raises
`NotImplementedError` naming the feature and the model class: never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

# Bridge architectures whose block layout is verified here. Others raise rather than guess.
_BRIDGE_POST_LN = ("Bert",)
_BRIDGE_PRE_LN = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GPTNeoXForCausalLM",
)


@dataclass(frozen=True)
class Norm:
    """One LayerNorm / RMSNorm site, as the math sees it.

    `inputs` are hooks whose sum is the norm's input (its mean is mu); `scale` holds sigma
    (LayerNorm, eps included) or rms (RMSNorm); `w`/`b` are the gain and bias (None: absent).
    """

    name: str
    inputs: tuple[str, ...]
    scale: str
    output: str | None
    w: Tensor | None
    b: Tensor | None
    rms: bool


@dataclass(frozen=True)
class Block:
    """Hooks and weights of one transformer block. `b_V` is per query head (GQA expanded)."""

    z: str
    pattern: str
    v: str
    mlp_out: str | None
    mlp_in: str | None  # the MLP's input up to a per-feature gain (enough for linear fits)
    out: str
    W_O: Tensor
    b_V: Tensor | None
    b_O: Tensor | None
    b_out: Tensor | None
    ln1: Norm | None  # post-LN only: the norms that rescale the residual stream
    ln2: Norm | None


@dataclass(frozen=True)
class ModelSpec:
    """Everything the decomposition and attention math needs to know about a model."""

    model_class: str
    architecture: str
    norm_placement: Literal["pre", "post"]
    norm_type: Literal["LN", "RMS", "none"]
    parallel: bool
    positional: Literal["learned", "rotary", "none"]
    token_types: bool
    causal: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    d_vocab: int
    biases: frozenset[str]
    embeds: tuple[tuple[str, str], ...]  # (label, hook), summed into the input term
    embed_ln: Norm | None
    blocks: tuple[Block, ...]
    ln_final: Norm | None  # pre-LN: the norm the unembedding reads
    final: str  # hook holding the final embedding
    dtype: torch.dtype
    # The layer-0 input e^0 [B]: what block 0 reads (BERT: the embedding-LN output; decoders:
    # the summed embeddings). A hook replacing it runs the model from e^0 onward.
    layer0: str

    @property
    def kv_head(self) -> tuple[int, ...]:
        """Query head -> the KV head it reads (grouped-query attention)."""
        group = self.n_heads // self.n_kv_heads
        return tuple(h // group for h in range(self.n_heads))

    def hooks(self, layers: Sequence[int] | None = None, *, attention: bool = False) -> list[str]:
        """Hook names the decomposition (or, with `attention`, effective attention) reads."""
        if attention:
            layers = range(self.n_layers) if layers is None else layers
            return [n for L in layers for n in (self.blocks[L].pattern, self.blocks[L].v)]
        names = [h for _, h in self.embeds] + [self.final]
        norms = [self.embed_ln, self.ln_final]
        for blk in self.blocks:
            names += [blk.z, blk.pattern, blk.out] + ([blk.mlp_out] if blk.mlp_out else [])
            norms += [blk.ln1, blk.ln2]
        for n in norms:
            if n is not None:
                names += [*n.inputs, n.scale]
        return list(dict.fromkeys(names))

    def names_filter(self, **kwargs: Any) -> Callable[[str], bool]:
        """A `names_filter` for `run_with_cache` that caches exactly `hooks(**kwargs)`."""
        wanted = frozenset(self.hooks(**kwargs))
        return wanted.__contains__


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


def _vec(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _check_common(model: Any) -> None:
    cfg = model.cfg
    checks = {
        "post-sublayer normalisation (ln1_post/ln2_post, Gemma-2/OLMo-2)": getattr(
            cfg, "use_normalization_before_and_after", False
        ),
        "mixture-of-experts MLPs": getattr(cfg, "num_experts", None),
        "a post-embedding LayerNorm (BLOOM)": getattr(cfg, "post_embedding_ln", False),
        "attention-only blocks": getattr(cfg, "attn_only", False),
        "local/sliding-window attention": getattr(cfg, "use_local_attn", False),
    }
    for feature, on in checks.items():
        if on:
            raise _unsupported(feature, model)
    pos = cfg.positional_embedding_type
    if pos not in ("standard", "rotary"):
        raise _unsupported(f"positional embedding type {pos!r}", model)


def _b_v(attn: Any, n_heads: int) -> Tensor | None:
    b = getattr(attn, "b_V", None)
    if b is None:
        return None
    b = b.detach()
    # A bridge exposes b_V per KV head under GQA; the math wants it per query head.
    return b.repeat_interleave(n_heads // b.shape[0], dim=0) if b.shape[0] != n_heads else b


def _ln_weights(ln: Any, rms: bool) -> tuple[Tensor | None, Tensor | None]:
    w = getattr(ln, "w", None)
    if getattr(ln, "uses_weight_offset", False) or getattr(
        ln.cfg if hasattr(ln, "cfg") else None, "rmsnorm_uses_offset", False
    ):
        raise NotImplementedError("RMSNorm with a (1 + w) gain offset (Gemma) is not supported")
    b = None if rms else getattr(ln, "b", None)
    return _vec(w), _vec(b)


def _norm_type(model: Any) -> Literal["LN", "RMS", "none"]:
    nt = model.cfg.normalization_type
    if nt in ("LN", "LNPre"):
        return "LN"
    if nt in ("RMS", "RMSPre"):
        return "RMS"
    if nt is None:
        return "none"
    raise _unsupported(f"normalization type {nt!r}", model)


def _common(model: Any, kind: str, placement: Literal["pre", "post"]) -> dict[str, Any]:
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    biases = {"b_V", "b_O", "b_in", "b_out", "ln_b"}
    return dict(
        model_class=type(model).__name__,
        architecture=_architecture(model),
        norm_placement=placement,
        norm_type=_norm_type(model),
        parallel=bool(cfg.parallel_attn_mlp),
        positional="learned" if cfg.positional_embedding_type == "standard" else "rotary",
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=n_kv,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        biases=frozenset(biases),
        dtype=next(model.parameters()).dtype,
    )


def _biases(blocks: Sequence[Block], model: Any, norms: Sequence[Norm | None]) -> frozenset[str]:
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


def _spec_hooked_transformer(model: Any) -> ModelSpec:
    cfg = model.cfg
    nt = _norm_type(model)
    rms = nt == "RMS"
    blocks = []
    for L, blk in enumerate(model.blocks):
        p = f"blocks.{L}."
        blocks.append(
            Block(
                z=p + "attn.hook_z",
                pattern=p + "attn.hook_pattern",
                v=p + "attn.hook_v",
                mlp_out=p + "hook_mlp_out",
                out=p + "hook_resid_post",
                # RMSNorm's hook_normalized precedes the gain: a per-feature scale, harmless
                # to standardised fits, which is all this hook is for.
                mlp_in=p + "ln2.hook_normalized"
                if nt != "none"
                else p + ("hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"),
                W_O=blk.attn.W_O.detach(),
                b_V=_b_v(blk.attn, cfg.n_heads),
                b_O=_vec(blk.attn.b_O),
                b_out=_vec(getattr(blk.mlp, "b_out", None)),
                ln1=None,
                ln2=None,
            )
        )
    ln_final = None
    if nt != "none":
        w, b = _ln_weights(model.ln_final, rms)
        ln_final = Norm(
            "ln_final",
            (f"blocks.{cfg.n_layers - 1}.hook_resid_post",),
            "ln_final.hook_scale",
            "unembed.hook_in",
            w,
            b,
            rms,
        )
    embeds = [("embed", "hook_embed")]
    if cfg.positional_embedding_type == "standard":
        embeds.append(("pos_embed", "hook_pos_embed"))
    common = _common(model, "HookedTransformer", "pre")
    common["biases"] = _biases(blocks, model, [ln_final])
    return ModelSpec(
        **common,
        token_types=False,
        causal=cfg.attention_dir == "causal",
        embeds=tuple(embeds),
        embed_ln=None,
        blocks=tuple(blocks),
        ln_final=ln_final,
        final="unembed.hook_in" if ln_final else f"blocks.{cfg.n_layers - 1}.hook_resid_post",
        layer0="blocks.0.hook_resid_pre",
    )


def _spec_hooked_encoder(model: Any) -> ModelSpec:
    cfg = model.cfg
    embeds = (
        ("embed", "embed.hook_embed"),
        ("pos_embed", "embed.hook_pos_embed"),
        ("token_type_embed", "embed.hook_token_type_embed"),
    )
    w, b = _ln_weights(model.embed.ln, False)
    embed_ln = Norm(
        "embed.ln",
        tuple(h for _, h in embeds),
        "embed.ln.hook_scale",
        "blocks.0.hook_resid_pre",
        w,
        b,
        False,
    )
    blocks = []
    for L, blk in enumerate(model.blocks):
        p = f"blocks.{L}."
        w1, b1 = _ln_weights(blk.ln1, False)
        w2, b2 = _ln_weights(blk.ln2, False)
        blocks.append(
            Block(
                z=p + "attn.hook_z",
                pattern=p + "attn.hook_pattern",
                v=p + "attn.hook_v",
                mlp_out=p + "hook_mlp_out",
                out=p + "hook_normalized_resid_post",
                mlp_in=p + "ln1.hook_normalized",
                W_O=blk.attn.W_O.detach(),
                b_V=_b_v(blk.attn, cfg.n_heads),
                b_O=_vec(blk.attn.b_O),
                b_out=_vec(blk.mlp.b_out),
                ln1=Norm(
                    p + "ln1",
                    (p + "hook_resid_mid",),
                    p + "ln1.hook_scale",
                    p + "ln1.hook_normalized",
                    w1,
                    b1,
                    False,
                ),
                ln2=Norm(
                    p + "ln2",
                    (p + "hook_resid_post",),
                    p + "ln2.hook_scale",
                    p + "hook_normalized_resid_post",
                    w2,
                    b2,
                    False,
                ),
            )
        )
    common = _common(model, "HookedEncoder", "post")
    common["positional"] = "learned"
    common["biases"] = _biases(blocks, model, [embed_ln] + [b.ln1 for b in blocks])
    return ModelSpec(
        **common,
        token_types=True,
        causal=False,
        embeds=embeds,
        embed_ln=embed_ln,
        blocks=tuple(blocks),
        ln_final=None,
        final=blocks[-1].out,
        layer0="blocks.0.hook_resid_pre",  # the embedding-LN output
    )


def _bridge_norm(model: Any, name: str, rms: bool) -> Norm:
    w, b = _ln_weights(model.get_submodule(name), rms)
    return Norm(name, (f"{name}.hook_in",), f"{name}.hook_scale", f"{name}.hook_out", w, b, rms)


def _spec_bridge(model: Any) -> ModelSpec:
    cfg = model.cfg
    arch = _architecture(model)
    if arch.startswith(_BRIDGE_POST_LN):
        placement: Literal["pre", "post"] = "post"
    elif arch in _BRIDGE_PRE_LN:
        placement = "pre"
    else:
        raise _unsupported(
            f"TransformerBridge architecture {arch!r} (block layout unverified)", model
        )
    nt = _norm_type(model)
    rms = nt == "RMS"
    names = set(model.hook_dict)
    embeds = [("embed", "embed.hook_out")]
    for label, mod in (("pos_embed", "pos_embed"), ("token_type_embed", "token_type_embed")):
        if f"{mod}.hook_out" in names:
            embeds.append((label, f"{mod}.hook_out"))
    blocks = []
    for L, blk in enumerate(model.blocks):
        p = f"blocks.{L}."
        post = placement == "post"
        blocks.append(
            Block(
                z=p + "attn.o.hook_in",
                pattern=p + "attn.hook_pattern",
                v=p + "attn.v.hook_out",
                mlp_out=p + "mlp.out.hook_out",
                out=p + ("ln2.hook_out" if post else "hook_out"),
                mlp_in=p + "mlp.in.hook_in" if p + "mlp.in.hook_in" in names else None,
                W_O=blk.attn.W_O.detach(),
                b_V=_b_v(blk.attn, cfg.n_heads),
                b_O=_vec(blk.attn.b_O),
                b_out=_vec(getattr(blk.mlp, "b_out", None)),
                ln1=_bridge_norm(model, p + "ln1", rms) if post else None,
                ln2=_bridge_norm(model, p + "ln2", rms) if post else None,
            )
        )
    embed_ln = _bridge_norm(model, "embed_ln", rms) if "embed_ln.hook_in" in names else None
    # On BERT, the bridge's ln_final belongs to the MLM head, not to the encoder.
    ln_final = _bridge_norm(model, "ln_final", rms) if placement == "pre" else None
    common = _common(model, "TransformerBridge", placement)
    common["biases"] = _biases(blocks, model, [embed_ln, ln_final] + [b.ln1 for b in blocks])
    spec = ModelSpec(
        **common,
        token_types=len(embeds) == 3 or "token_type_embed.hook_out" in names,
        # TransformerLens 3.x reports BERT as causal; the encoder is bidirectional.
        causal=placement == "pre" and cfg.attention_dir == "causal",
        embeds=tuple(embeds),
        embed_ln=embed_ln,
        blocks=tuple(blocks),
        ln_final=ln_final,
        final=ln_final.output if ln_final and ln_final.output else blocks[-1].out,
        layer0="blocks.0.hook_in",
    )
    missing = [h for h in spec.hooks() if h not in names]
    if missing:
        raise _unsupported(f"a bridge without the hooks {missing[:4]}", model)
    return spec


def model_spec(model: Any) -> ModelSpec:
    """Describe `model` for the math modules, or raise `NotImplementedError` naming why not.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> spec = model_spec(tiny_model("bert"))
        >>> spec.norm_placement, spec.causal, [label for label, _ in spec.embeds]
        ('post', False, ['embed', 'pos_embed', 'token_type_embed'])
    """
    kind = _kind(model)
    _check_common(model)
    if kind == "TransformerBridge":
        return _spec_bridge(model)
    if kind == "HookedEncoder":
        return _spec_hooked_encoder(model)
    return _spec_hooked_transformer(model)
