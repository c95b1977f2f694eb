"""`TransformerBridge` specs, read from the bridge's component tree and checked numerically.

TransformerLens names a bridge's parts the same way across architectures (``embed``,
``pos_embed``, ``embed_ln``, ``blocks.L.{ln1,ln2,ln1_post,ln2_post,attn,mlp}``, ``ln_final``),
so the layout is read from which parts exist. Two facts names cannot tell are measured once
per model on a four-token forward pass: whether ``ln1`` sits on the residual path (post-LN:
BERT, RoBERTa, post-norm OPT) or feeds the attention, and whether ``ln_final`` normalises the
last block's output (decoders) or belongs to a head (BERT's MLM head). Each norm is run once
against the formula the decomposition applies, which checks its type and gain convention
(Gemma's ``1 + w``) and finds the norms Hugging Face computes in float32.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor

from tl_decomp._core.spec import Block, ModelSpec, Norm
from tl_decomp.adapters._common import b_v, biases, fields, unsupported, vec
from tl_decomp.adapters._state import evaluating, exclusive

_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()


def spec_bridge(model: Any) -> ModelSpec:
    names = set(model.hook_dict)
    layout = _layout(model, names)
    post = layout["post"]
    blocks = tuple(_block(model, L, layout, names) for L in range(model.cfg.n_layers))
    embeds = [("embed", "embed.hook_out")]
    for label, mod in (("pos_embed", "pos_embed"), ("token_type_embed", "token_type_embed")):
        if f"{mod}.hook_out" in names:
            embeds.append((label, f"{mod}.hook_out"))
    embed_ln = read_norm(model, "embed_ln") if "embed_ln.hook_in" in names else None
    ln_final = read_norm(model, "ln_final") if layout["final_norm"] else None
    common = fields(model, "TransformerBridge", "post" if post else "pre")
    residual_norms = [embed_ln, ln_final, *(n for b in blocks for n in b.norms())]
    common["biases"] = biases(blocks, model, residual_norms)
    present = [n for n in residual_norms if n is not None]
    if common["norm_type"] == "none" and present:  # the config says none; the tree has norms
        common["norm_type"] = "RMS" if present[0].rms else "LN"
    spec = ModelSpec(
        **common,
        token_types="token_type_embed.hook_out" in names,
        causal=layout["causal"],
        embeds=tuple(embeds),
        embed_ln=embed_ln,
        blocks=blocks,
        ln_final=ln_final,
        final=ln_final.output if ln_final and ln_final.output else blocks[-1].out,
        layer0="blocks.0.hook_in",
        input="embed_ln.hook_in" if embed_ln else "blocks.0.hook_in",
        unembed_reads_final=layout["unembed_reads_final"],
    )
    missing = [h for h in spec.hooks() if h not in names]
    if missing:
        raise unsupported(f"a bridge without the hooks {missing[:4]}", model)
    return spec


def _block(model: Any, L: int, layout: dict[str, bool], names: set[str]) -> Block:
    blk, p, post = model.blocks[L], f"blocks.{L}.", layout["post"]
    late = layout["sublayer_norms"]
    first = lambda *hooks: next((p + h for h in hooks if p + h in names), None)  # noqa: E731
    sub = lambda name: read_norm(model, p + name) if p + name + ".hook_in" in names else None  # noqa: E731
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    try:  # attention variants without per-head value/output maps (latent attention)
        W_O, b_V, b_O = blk.attn.W_O.detach(), b_v(blk.attn, model.cfg.n_heads), blk.attn.b_O
    except (AttributeError, NotImplementedError) as err:
        raise unsupported(
            f"attention {type(blk.attn).__name__} without per-head W_O / b_V ({err})", model
        ) from err
    return Block(
        z=p + "attn.o.hook_in",
        pattern=p + "attn.hook_pattern",
        v=p + "attn.v.hook_out" if p + "attn.v.hook_out" in names else p + "attn.hook_v",
        # The MLP's last linear map where it has one (BERT's MLP module also adds the
        # residual and normalises); the whole MLP (mixture of experts) otherwise.
        mlp_out=first("mlp.out.hook_out", "mlp.hook_out"),
        mlp_in=first("mlp.in.hook_in", "mlp.hook_in"),
        out=p + ("ln2.hook_out" if post else "hook_out"),
        W_O=W_O,
        b_V=b_V,
        b_O=vec(b_O),
        b_out=vec(_maybe(blk.mlp, "b_out")) if p + "mlp.out.hook_out" in names else None,
        ln1=sub("ln1") if post else None,
        ln2=sub("ln2") if post else None,
        attn_post=sub("ln1" if late else "ln1_post"),
        mlp_post=sub("ln2" if late else "ln2_post"),
        residual_scale=float(getattr(hf_cfg, "residual_multiplier", None) or 1.0),
    )


def _maybe(module: Any, name: str) -> Any:
    try:
        return getattr(module, name, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _layout(model: Any, names: set[str]) -> dict[str, bool]:
    """Where ``ln1`` and ``ln_final`` sit and whether attention is causal, measured once."""
    if model in _LAYOUTS:
        return _LAYOUTS[model]
    if "blocks.0.attn.hook_pattern" not in names:
        raise unsupported("an attention without a cached pattern (hook_pattern)", model)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_out"
    want = {"blocks.0.hook_in", "blocks.0.ln1.hook_in", "blocks.0.attn.hook_pattern"}
    post_out = f"blocks.{model.cfg.n_layers - 1}.ln2.hook_out"  # post-LN blocks' output
    want |= {"blocks.0.attn.hook_out", "unembed.hook_in", "ln_final.hook_out", post_out}
    want |= {last, "ln_final.hook_in"}
    n = min(4, int(model.cfg.n_ctx))
    tokens = torch.arange(n, device=next(model.parameters()).device)[None] % model.cfg.d_vocab
    # A NaN in a late block would make every comparison after it false: the layout of the
    # final norm and unembedding is read from a finite stand-in for the last block's output.
    finite = model.hooks(fwd_hooks=[(last, _finite)])
    with exclusive(model), finite, torch.no_grad(), evaluating(model):
        _, cache = model.run_with_cache(tokens, names_filter=lambda h: h in want)
    same = lambda a, b: a in cache and b in cache and _close(cache[a], cache[b])  # noqa: E731
    pattern = cache["blocks.0.attn.hook_pattern"]
    ln1_reads_resid = same("blocks.0.ln1.hook_in", "blocks.0.hook_in")
    # TransformerLens 3.x names OLMo-2's post-sublayer norms ln1/ln2: they read the output.
    sublayer = same("blocks.0.ln1.hook_in", "blocks.0.attn.hook_out")
    layout = dict(
        post="blocks.0.ln1.hook_in" in cache and not ln1_reads_resid and not sublayer,
        sublayer_norms=sublayer,
        final_norm=same("ln_final.hook_in", last),
        # BERT's unembedding reads its MLM head, whose own LayerNorm is the bridge's ln_final.
        unembed_reads_final=(
            same("ln_final.hook_in", last) and same("unembed.hook_in", "ln_final.hook_out")
        )
        or same("unembed.hook_in", last)
        or same("unembed.hook_in", post_out),
        causal=bool((pattern.triu(1) == 0).all()) and n > 1,
    )
    _LAYOUTS[model] = layout
    return layout


def _finite(t: Tensor, *, hook: Any) -> Tensor:
    if bool(torch.isfinite(t).all()):
        return t
    gen = torch.Generator().manual_seed(0)
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


def read_norm(model: Any, name: str) -> Norm | None:
    """One norm, its gain convention and float32 rounding checked against the formula."""
    mod = model.get_submodule(name)
    orig = getattr(mod, "original_component", None)
    if orig is None or isinstance(orig, torch.nn.Identity):
        return None
    rms = bool(getattr(mod, "uses_rms_norm", False))
    w = _maybe(mod, "weight")
    if w is not None and getattr(mod, "uses_weight_offset", False):
        w = 1 + w
    b = None if rms else _maybe(orig, "bias")
    w, b = vec(w), vec(b)
    eps = _eps(model, orig)
    return Norm(
        name,
        (f"{name}.hook_in",),
        f"{name}.hook_scale",
        f"{name}.hook_out",
        w,
        b,
        rms,
        rounds=_rounds(model, name, orig, w, b, rms, eps),
        eps=eps,
    )


def _eps(model: Any, orig: Any) -> float:
    found = (_maybe(orig, "eps"), _maybe(orig, "variance_epsilon"))
    return next((float(e) for e in found if isinstance(e, (int, float))), float(model.cfg.eps))


def _rounds(
    model: Any, name: str, orig: Any, w: Tensor | None, b: Tensor | None, rms: bool, eps: float
) -> bool:
    """Run the norm on a fixed input: True where it matches the exact formula only to float32
    rounding; a larger difference means the formula is wrong for this norm, and raises."""
    d = model.cfg.d_model
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, d, generator=gen, dtype=torch.float64) + 1).to(ref)
    with torch.no_grad():
        y = orig(x).double()
    x = x.double()
    c = x if rms else x - x.mean(-1, keepdim=True)
    exact = c / (c.square().mean(-1, keepdim=True) + eps).sqrt()
    exact = exact * (1 if w is None else w.double()) + (0 if b is None else b.double())
    # Compare where the weights are finite: a NaN gain (a broken later block) says nothing
    # of the formula, and only matters where the block is read (the sum checks that).
    seen = torch.isfinite(exact)
    if not seen.any():
        return False
    if not bool(torch.isfinite(y[seen]).all()):
        rel = math.inf
    else:
        rel = ((y - exact)[seen].abs().max() / exact[seen].abs().max().clamp_min(1e-30)).item()
    exact_limit = {torch.float64: 1e-12, torch.float32: 1e-5}.get(ref.dtype, 2e-2)
    if rel <= exact_limit:
        return False
    if ref.dtype == torch.float64 and rel <= 1e-5:
        return True
    raise unsupported(
        f"norm {name} ({type(orig).__name__}), which does not compute "
        f"{'g * x / rms(x)' if rms else 'g * (x - mean) / sigma + b'} as tl_decomp reads it "
        f"(relative difference {rel:.2g}),",
        model,
    )


__all__ = ["spec_bridge"]
