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

from tl_decomp._core.spec import TOLERANCE, Block, ModelSpec, Norm
from tl_decomp.adapters._common import b_v, biases, fields, unsupported, vec
from tl_decomp.adapters._state import evaluating, exclusive
from tl_decomp.adapters._vision import sample_input

_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def spec_bridge(model: Any) -> ModelSpec:
    names = set(model.hook_dict)
    layout = _layout(model, names)
    post = layout["post"]
    blocks = tuple(_block(model, L, layout, names) for L in range(model.cfg.n_layers))
    embeds = [("embed", "embed.hook_out")]
    for label, mod in (("pos_embed", "pos_embed"), ("token_type_embed", "token_type_embed")):
        if f"{mod}.hook_out" in names:
            embeds.append((label, f"{mod}.hook_out"))
    # RWKV normalises the embeddings inside block 0 (its ``pre_ln``): an embedding norm all
    # the same, and the residual stream (layer 0) begins after it.
    ln = next((n for n in ("embed_ln", "blocks.0.pre_ln") if f"{n}.hook_in" in names), None)
    embed_ln = read_norm(model, ln) if ln else None
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
        layer0="blocks.0.pre_ln.hook_out" if ln == "blocks.0.pre_ln" else "blocks.0.hook_in",
        input=f"{ln}.hook_in" if ln else "blocks.0.hook_in",
        unembed_reads_final=layout["unembed_reads_final"],
    )
    missing = [h for h in spec.hooks() if h not in names]
    if missing:
        raise unsupported(f"a bridge without the hooks {missing[:4]}", model)
    return spec


def _block(model: Any, L: int, layout: dict[str, Any], names: set[str]) -> Block:
    blk, p, post = model.blocks[L], f"blocks.{L}.", layout["post"]
    late = layout["sublayer_norms"]
    first = lambda *hooks: next((p + h for h in hooks if p + h in names), None)  # noqa: E731
    sub = lambda name: read_norm(model, p + name) if p + name + ".hook_in" in names else None  # noqa: E731
    hf_cfg = getattr(getattr(model, "original_model", None), "config", None)
    mixer = _mixer_name(L, names)
    if p + "attn.hook_pattern" not in names:
        if mixer is None:
            raise unsupported(_no_mixer(model, L, names), model)
        return Block(
            z="",
            pattern="",
            v="",
            mlp_out=first(*(f"{m}.hook_out" for m in ("mlp.out", "mlp", "moe", "channel_mix"))),
            mlp_in=first(*(f"{m}.hook_in" for m in ("mlp.in", "mlp", "moe", "channel_mix"))),
            mlp_shared=first("shared_mlp.hook_out"),
            out=p + "hook_out",
            W_O=torch.zeros(0),
            b_V=None,
            b_O=None,
            b_out=None,
            ln1=None,
            ln2=None,
            attn_post=sub(layout["reads"].get((L, "attn"), "ln1_post")),
            mlp_post=sub(layout["reads"].get((L, "mlp"), "ln2_post")),
            residual_scale=float(getattr(hf_cfg, "residual_multiplier", None) or 1.0),
            mixer=f"{p}{mixer}.hook_out",
            rounds=layout["rounds"],
        )
    W_O, b_V, b_O = _output_maps(model, blk.attn)
    # The values the pattern weighs: after a norm on them where there is one (Gemma-4's v_norm
    # follows v); `check_values` holds z to pattern @ v wherever a split by key needs it.
    v = next(iter(_value_hooks(L, names)), p + "attn.hook_v")
    return Block(
        z=p + "attn.o.hook_in",
        pattern=p + "attn.hook_pattern",
        v=v,
        # The MLP's last linear map where it has one (BERT's MLP module also adds the
        # residual and normalises); the whole MLP (mixture of experts) otherwise.
        mlp_out=first("mlp.out.hook_out", "mlp.hook_out", "moe.hook_out"),
        mlp_in=first("mlp.in.hook_in", "mlp.hook_in", "moe.hook_in"),
        mlp_shared=first("shared_mlp.hook_out"),
        out=p + ("ln2.hook_out" if post else "hook_out"),
        W_O=W_O,
        b_V=b_V,
        b_O=vec(b_O),
        b_out=vec(_maybe(blk.mlp, "b_out")) if p + "mlp.out.hook_out" in names else None,
        ln1=sub("ln1") if post else None,
        ln2=sub("ln2") if post else None,
        attn_post=sub(layout["reads"].get((L, "attn"), "ln1" if late else "ln1_post")),
        mlp_post=sub(layout["reads"].get((L, "mlp"), "ln2" if late else "ln2_post")),
        residual_scale=float(getattr(hf_cfg, "residual_multiplier", None) or 1.0),
        v_pos_axis=getattr(model.hook_dict.get(v), "pos_dim", None) or layout["v_axis"].get(L, 1),
        per_layer_input=first("post_per_layer_input_norm.hook_out"),
        mixer=first(f"{mixer}.hook_out") if mixer else None,  # beside attention (Falcon-H1)
        out_scale=_layer_scalar(model, blk),
    )


def _output_maps(model: Any, attn: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``W_O`` per head, ``b_V`` per query head and ``b_O``.

    Latent attention (MLA) has no per-head value projection to read ``b_V`` from: its values
    come out of one shared up-projection, which Hugging Face builds without a bias, so ``b_V``
    is None. Where the bridge cannot split ``W_O`` (it splits by the query/key head size, and
    MLA's value heads are ``v_head_dim`` wide), the output projection's own weight is split
    into the query heads whose concatenated outputs it reads."""
    n = model.cfg.n_heads
    try:
        b_V = b_v(attn, n)
    except NotImplementedError:  # MLAAttentionBridge raises for W_Q/W_K/W_V/b_*
        b_V = None
    try:
        return attn.W_O.detach(), b_V, attn.b_O
    except (AttributeError, NotImplementedError, ValueError) as err:
        o = _maybe(_maybe(attn, "o"), "weight")
        if not isinstance(o, Tensor) or o.ndim != 2 or o.shape[1] % n:
            raise unsupported(
                f"attention {type(attn).__name__} without per-head W_O ({err})", model
            ) from err
    W_O = o.detach().T.unflatten(0, (n, o.shape[1] // n))  # [d_model, n*d] -> [n, d, d_model]
    return W_O, b_V, _maybe(attn, "b_O")


def _layer_scalar(model: Any, blk: Any) -> float:
    """What the block multiplies its whole output by (Gemma-4's learned ``layer_scalar``)."""
    s = _maybe(getattr(blk, "original_component", None), "layer_scalar")
    if s is None:
        return 1.0
    if not isinstance(s, Tensor) or s.numel() != 1:
        shape = tuple(getattr(s, "shape", ()))
        raise unsupported(f"a block output scaled by a layer_scalar of shape {shape}", model)
    return float(s.item())


# TransformerLens's names for a block's token mixer when it is not attention: state-space
# models (Mamba; Falcon-H1's runs beside attention), short convolutions (LFM2), linear
# attention (Qwen3-Next, OLMo hybrid), RWKV's time mixing.
_MIXERS = ("mixer", "mamba", "conv", "linear_attn", "time_mix")


def _no_mixer(model: Any, L: int, names: set[str]) -> str:
    """Why block `L` has no term to read: an attention without a pattern, or an opaque block."""
    p = f"blocks.{L}."
    if any(n.startswith(p + "attn.") for n in names):
        return "an attention without a cached pattern (hook_pattern)"
    if not any(n.startswith(p) for n in names):
        return f"a model without TransformerLens's blocks.{L} (its blocks are named otherwise)"
    return (
        f"an opaque block (block {L} hooks its input and output, and neither an attention "
        "pattern nor a token mixer in between)"
    )


def _mixer_name(L: int, names: set[str]) -> str | None:
    """Block `L`'s token mixer that is not attention, by TransformerLens's name, or None."""
    return next((m for m in _MIXERS if f"blocks.{L}.{m}.hook_out" in names), None)


def _maybe(module: Any, name: str) -> Any:
    try:
        return getattr(module, name, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _layout(model: Any, names: set[str]) -> dict[str, Any]:
    """Where ``ln1`` and ``ln_final`` sit, whether the model is causal and whether its mixer
    blocks round the residual stream, measured once."""
    if model in _LAYOUTS:
        return _LAYOUTS[model]
    n_layers = model.cfg.n_layers
    attends = [L for L in range(n_layers) if f"blocks.{L}.attn.hook_pattern" in names]
    mixes = [L for L in range(n_layers) if _mixer_name(L, names)]
    opaque = sorted(set(range(n_layers)) - set(attends) - set(mixes))
    if opaque:
        raise unsupported(_no_mixer(model, opaque[0], names), model)
    pattern_hook = f"blocks.{attends[0]}.attn.hook_pattern" if attends else None
    last = f"blocks.{n_layers - 1}.hook_out"
    want = {"blocks.0.hook_in", "blocks.0.ln1.hook_in", *([pattern_hook] if pattern_hook else [])}
    post_out = f"blocks.{model.cfg.n_layers - 1}.ln2.hook_out"  # post-LN blocks' output
    want |= {"blocks.0.attn.hook_out", "unembed.hook_in", "ln_final.hook_out", post_out}
    want |= {last, "ln_final.hook_in"}
    patterns = [f"blocks.{L}.attn.hook_pattern" for L in attends]
    values = {L: v for L in attends for v in _value_hooks(L, names)[:1]}
    want |= set(patterns) | set(values.values()) | _sublayer_hooks(n_layers, names)
    _check_mixers(model, mixes, names)
    # as many tokens as no head count: the value hooks' position axis is then read off
    n = min(next(k for k in (4, 5, 6) if k != model.cfg.n_heads), int(model.cfg.n_ctx))
    tokens = sample_input(model, n)  # a vision model's: one image
    # A NaN in a late block would make every comparison after it false: the layout of the
    # final norm and unembedding is read from a finite stand-in for the last block's output.
    finite = model.hooks(fwd_hooks=[(last, _finite)])
    with exclusive(model), finite, torch.no_grad(), evaluating(model):
        _, cache = model.run_with_cache(tokens, names_filter=lambda h: h in want)
    same = lambda a, b: a in cache and b in cache and _close(cache[a], cache[b])  # noqa: E731
    for hook in patterns:
        _check_pattern(model, hook, cache)
    ln1_reads_resid = same("blocks.0.ln1.hook_in", "blocks.0.hook_in")
    # TransformerLens 3.x names OLMo-2's post-sublayer norms ln1/ln2: they read the output.
    sublayer = same("blocks.0.ln1.hook_in", "blocks.0.attn.hook_out")
    post = "blocks.0.ln1.hook_in" in cache and not ln1_reads_resid and not sublayer
    layout = dict(
        post=post,
        reads={} if post else _post_norms(n_layers, names, same),
        sublayer_norms=sublayer,
        final_norm=same("ln_final.hook_in", last),
        # BERT's unembedding reads its MLM head, whose own LayerNorm is the bridge's ln_final.
        unembed_reads_final=(
            same("ln_final.hook_in", last) and same("unembed.hook_in", "ln_final.hook_out")
        )
        or same("unembed.hook_in", last)
        or same("unembed.hook_in", post_out),
        causal=_causal(model, cache[pattern_hook] if pattern_hook else None, tokens),
        # [batch pos head d] on most bridges, [batch head pos d] for latent attention's values
        v_axis={
            L: _pos_axis(cache[h], cache["blocks.0.hook_in"].shape[1])
            for L, h in values.items()
            if h in cache
        },
        rounds=bool(mixes) and _rounds_residual(model, names),
    )
    _LAYOUTS[model] = layout
    return layout


_NORMS = ("ln1_post", "ln2_post", "ln1", "ln2")


def _sublayer_hooks(n_layers: int, names: set[str]) -> set[str]:
    """Each block's sublayer outputs and the inputs of its norms (see `_post_norms`)."""
    out = set()
    for L in range(n_layers):
        p = f"blocks.{L}."
        mixer = _mixer_name(L, names)
        ends = ["attn.hook_out", "mlp.hook_in", "mlp.hook_out"]
        ends += [f"{mixer}.hook_out"] if mixer else []
        ends += [f"{n}.hook_{io}" for n in _NORMS for io in ("in", "out")]
        out |= {p + h for h in ends if p + h in names}
    return out


def _post_norms(n_layers: int, names: set[str], same: Any) -> dict[tuple[int, str], str]:
    """Which norm of each pre-LN block reads its token mixer's output and which its MLP's
    (post-sublayer norms), measured: TransformerLens names them ln1_post/ln2_post on one line
    and ln1/ln2 or ln2/ln2_post on another (OLMo-2, OLMo hybrid)."""
    reads = {}
    for L in range(n_layers):
        p = f"blocks.{L}."
        mixer = _mixer_name(L, names)
        sources = {"attn": [p + "attn.hook_out", *([f"{p}{mixer}.hook_out"] if mixer else [])]}
        sources["mlp"] = [p + "mlp.hook_out"]
        # BLOOM's attention returns residual + attention: the norm reading it feeds the MLP
        feeding = {n for n in _NORMS if same(f"{p}{n}.hook_out", p + "mlp.hook_in")}
        for part, outs in sources.items():
            found = (n for n in _NORMS for o in outs if same(f"{p}{n}.hook_in", o))
            norm = next((n for n in found if n not in feeding), None)
            if norm is not None:
                reads[L, part] = norm
    return reads


def _value_hooks(L: int, names: set[str]) -> list[str]:
    p = f"blocks.{L}.attn."
    return [p + h for h in ("v_norm.hook_out", "v.hook_out", "hook_v") if p + h in names]


def _pos_axis(v: Tensor, n: int) -> int:
    """The axis of a ``[batch, ·, ·, d]`` value tensor that holds the `n` positions."""
    return 2 if v.ndim == 4 and v.shape[1] != n and v.shape[2] == n else 1


def _check_pattern(model: Any, hook: str, cache: Any) -> None:
    """A pattern the decomposition can read: it fires, it is ``[batch head query key]`` over
    every key, and it weighs keys as probabilities do (non-negative, rows summing to at most 1:
    an attention sink takes the rest). Raw scores or a banded layout are refused by name."""
    if hook not in cache:
        raise unsupported(f"an attention whose pattern hook {hook} never fires", model)
    a = cache[hook]
    n = cache["blocks.0.hook_in"].shape[1]
    if a.ndim != 4 or tuple(a.shape[-2:]) != (n, n):
        raise unsupported(
            f"an attention whose pattern {hook} has shape {tuple(a.shape)}, not [batch head "
            f"query key] over all {n} keys (a banded, windowed layout)",
            model,
        )
    rows = a.double().nan_to_num(0.0).sum(-1)
    tol = max(1e-6, TOLERANCE.get(a.dtype, 1e-4))  # a half-precision softmax rounds its rows
    if float(a.double().nan_to_num(0.0).min()) < -tol or float(rows.max()) > 1 + tol:
        raise unsupported(
            f"an attention whose pattern {hook} is not a probability (rows sum to "
            f"{rows.min().item():.3g}..{rows.max().item():.3g}: raw scores?)",
            model,
        )


def _check_mixers(model: Any, mixes: list[int], names: set[str]) -> None:
    """One mixer component wrapping modules of different kinds is a pass-through the bridge
    does not model (Nemotron-H wraps its attention and MoE layers as "mixers"): refused."""
    found: dict[str, set[str]] = {}
    for L in mixes:
        m = _mixer_name(L, names) or ""
        orig = getattr(model.blocks[L].get_submodule(m), "original_component", None)
        found.setdefault(m, set()).add(type(orig).__name__)
    for m, kinds in found.items():
        if len(kinds) > 1:
            raise unsupported(
                f"an opaque token mixer (the bridge's {m} component passes through modules "
                f"of {len(kinds)} kinds, {', '.join(sorted(kinds))}, without modelling them)",
                model,
            )


def _causal(model: Any, pattern: Tensor | None, tokens: Tensor) -> bool:
    """Causal when the first attention's pattern weighs no later key; a model without
    attention is causal when changing the last token leaves every earlier output unchanged."""
    if pattern is not None:
        return bool((pattern.triu(1) == 0).all()) and pattern.shape[-1] > 1
    if tokens.is_floating_point():
        raise unsupported("a vision model without attention", model)
    n = tokens.shape[-1]
    other = tokens.clone()
    other[0, -1] = (other[0, -1] + 1) % model.cfg.d_vocab
    with torch.no_grad(), evaluating(model):
        a, b = model(tokens), model(other)
    return n > 1 and bool(torch.equal(a[:, :-1], b[:, :-1]))


def _rounds_residual(model: Any, names: set[str]) -> bool:
    """Whether mixer blocks round the residual stream they carry to float32 (Mamba's
    ``residual_in_fp32``): a block's output misses input + mixer + MLP by float32 rounding
    only. Every block is looked at: block 0's input (float32 embeddings cast up) can be exact."""
    if next(model.parameters()).dtype != torch.float64:
        return False
    sums: list[list[str]] = []
    for L in range(model.cfg.n_layers):
        p = f"blocks.{L}."
        parts = [p + f"{m}.hook_out" for m in (*_MIXERS, "mlp", "channel_mix")]
        parts = [h for h in parts if h in names]
        if parts and parts[0].split(".")[2] in _MIXERS:
            sums.append([p + "hook_in", p + "hook_out", *parts])
    tokens = sample_input(model, 6, random=True)
    wanted = {h for parts in sums for h in parts}
    with torch.no_grad(), evaluating(model):
        _, cache = model.run_with_cache(tokens, names_filter=wanted.__contains__)
    for parts in sums:
        out = cache[parts[1]]
        err = (out - cache[parts[0]] - sum(cache[h] for h in parts[2:])).abs().max().item()
        if 1e-12 * out.abs().max().item() < err < 1e-5 * out.abs().max().item():
            return True
    return False


def _finite(t: Tensor, *, hook: Any) -> Tensor:
    if bool(torch.isfinite(t).all()):
        return t
    gen = torch.Generator().manual_seed(0)
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


def read_norm(model: Any, name: str) -> Norm | None:
    """One norm, its gain convention and float32 rounding checked against the formula.

    A norm the bridge wraps as a plain component (Gemma-4's) declares neither its type nor
    its gain convention, and has no ``hook_scale``: both are found by running it against each
    formula (RMS or LayerNorm, ``w`` or ``1 + w``), and sigma is computed from its input."""
    mod = model.get_submodule(name)
    orig = getattr(mod, "original_component", None)
    if orig is None or isinstance(orig, torch.nn.Identity):
        return None
    declared = hasattr(mod, "uses_rms_norm")
    options = (
        [(bool(mod.uses_rms_norm), bool(getattr(mod, "uses_weight_offset", False)))]
        if declared
        else [(True, False), (True, True), (False, False), (False, True)]
    )
    eps = _eps(model, orig)
    for i, (rms, offset) in enumerate(options):
        w = _maybe(mod, "weight")
        w = 1 + w if w is not None and offset else w
        b = None if rms else _maybe(orig, "bias")
        w, b = vec(w), vec(b)
        try:
            rounds = _rounds(model, name, orig, w, b, rms, eps)
        except NotImplementedError:
            if i == len(options) - 1:
                raise
            continue
        scale = f"{name}.hook_scale" if f"{name}.hook_scale" in model.hook_dict else ""
        return Norm(name, (f"{name}.hook_in",), scale, f"{name}.hook_out", w, b, rms, rounds, eps)
    return None  # unreachable: the last option raises


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
