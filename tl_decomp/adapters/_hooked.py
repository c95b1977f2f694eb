"""Model specs of TransformerLens 3.x's own classes, `HookedTransformer` and `HookedEncoder`.

Their layouts are fixed by `HookedTransformerConfig`, so they are read from it; features
those classes express in ways this module does not handle raise `NotImplementedError`.
"""

from __future__ import annotations

from typing import Any

from tl_decomp._core.spec import Block, ModelSpec, Norm
from tl_decomp.adapters._common import b_v, biases, check_hooked, fields, ln_weights, norm_type, vec


def _block(model: Any, L: int, **layout: Any) -> Block:
    """Block `L`: the hooks and weights both classes name alike, plus `layout`'s."""
    p, blk = f"blocks.{L}.", model.blocks[L]
    return Block(
        z=p + "attn.hook_z",
        pattern=p + "attn.hook_pattern",
        v=p + "attn.hook_v",
        mlp_out=p + "hook_mlp_out",
        W_O=blk.attn.W_O.detach(),
        b_V=b_v(blk.attn, model.cfg.n_heads),
        b_O=vec(blk.attn.b_O),
        b_out=vec(getattr(blk.mlp, "b_out", None)),
        **layout,
    )


def spec_hooked_transformer(model: Any) -> ModelSpec:
    check_hooked(model)
    cfg = model.cfg
    nt = norm_type(model)
    rms = nt == "RMS"
    blocks = []
    for L in range(cfg.n_layers):
        p = f"blocks.{L}."
        blocks.append(
            _block(
                model,
                L,
                out=p + "hook_resid_post",
                # RMSNorm's hook_normalized precedes the gain: a per-feature scale, harmless
                # to standardised fits, which is all this hook is for.
                mlp_in=p + "ln2.hook_normalized"
                if nt != "none"
                else p + ("hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"),
                ln1=None,
                ln2=None,
            )
        )
    ln_final = None
    if nt != "none":
        w, b = ln_weights(model.ln_final, rms)
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
    common = fields(model, "HookedTransformer", "pre")
    common["biases"] = biases(blocks, model, [ln_final])
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
        input="blocks.0.hook_resid_pre",
    )


def spec_hooked_encoder(model: Any) -> ModelSpec:
    check_hooked(model)
    embeds = (
        ("embed", "embed.hook_embed"),
        ("pos_embed", "embed.hook_pos_embed"),
        ("token_type_embed", "embed.hook_token_type_embed"),
    )
    w, b = ln_weights(model.embed.ln, False)
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
        w1, b1 = ln_weights(blk.ln1, False)
        w2, b2 = ln_weights(blk.ln2, False)
        blocks.append(
            _block(
                model,
                L,
                out=p + "hook_normalized_resid_post",
                mlp_in=p + "ln1.hook_normalized",
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
    common = fields(model, "HookedEncoder", "post")
    common["positional"] = "learned"
    common["biases"] = biases(blocks, model, [embed_ln] + [b.ln1 for b in blocks])
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
        unembed_reads_final=False,  # the MLM head lies between
    )
