"""Encoder–decoder `TransformerBridge`s (T5, BART and their kin): one `ModelSpec` per stack.

The bridge names an encoder–decoder's parts ``encoder_blocks`` / ``decoder_blocks`` (each
block's ``attn`` or ``self_attn``, a decoder's ``cross_attn``, norms ``ln1 .. ln3`` and their
``_post`` sandwich norms), ``embed``/``pos_embed`` (``decoder_embed``/``decoder_pos_embed``),
``embed_ln`` / ``decoder_embed_ln`` and ``encoder_ln_final`` / ``decoder_ln_final``. Each stack
is described as the math describes a decoder-only model: a decoder block's cross-attention is
a `Cross` sublayer between its self-attention and its MLP, whose values are the encoder's
output, an input the decoder receives (kind ``x``).

What names cannot tell is measured once per model on a six-token run: whether ``ln1`` reads
the block's input (pre-LN) or its input plus the attention (post-LN: BART, Marian, LED),
which embeddings sum to the stack's input (Marian and Pegasus scale theirs inside the stack;
T5's ``embed`` hook never fires), and whether every pattern is one: a pattern hook that never
fires (an attention delegated to Hugging Face), rows that do not sum to 1 (raw scores) or a
shape that is not ``[batch head query key]`` over every key (banded windows) is refused.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from tl_decomp._core.aliases import Cache, Model
from tl_decomp._core.spec import Block, Cross, ModelSpec, Norm
from tl_decomp.adapters import _bridge
from tl_decomp.adapters._common import b_v, fields, unsupported, vec
from tl_decomp.adapters._state import evaluating, exclusive

StackName = Literal["encoder", "decoder"]
STACKS: tuple[StackName, ...] = ("encoder", "decoder")
_EMBEDS = {
    "encoder": ("embed", "encoder_embed", "pos_embed", "token_type_embed"),
    "decoder": ("decoder_embed", "decoder_pos_embed"),
}
_PROBES: weakref.WeakKeyDictionary[Any, dict[str, Tensor]] = weakref.WeakKeyDictionary()
# Norms whose bridge hook_scale is not the scale the module uses (a T5LayerNorm the bridge
# takes for LayerNorm: its hook_scale is the centred sigma); the scale is read off hook_in.
_RESCALED: weakref.WeakKeyDictionary[Any, dict[str, Norm]] = weakref.WeakKeyDictionary()


def is_seq2seq(model: Any) -> bool:
    """Whether `model` is a bridge with an encoder stack and a decoder stack."""
    return hasattr(model, "encoder_blocks") and hasattr(model, "decoder_blocks")


def spec_stack(model: Any, stack: StackName) -> ModelSpec:
    """The `ModelSpec` of one stack of an encoder–decoder bridge, or `NotImplementedError`
    naming the feature the bridge does not expose faithfully."""
    names = set(model.hook_dict)
    probe = _probe(model)
    P = f"{stack}_blocks"
    n_layers = len(getattr(model, P))
    post = not _same(probe, f"{P}.0.ln1.hook_in", f"{P}.0.hook_in")
    blocks = tuple(
        replace(_block(model, stack, L, post, names, probe), window=w)
        for L, w in enumerate(_windows(model, stack, n_layers))
    )
    head = "" if stack == "encoder" else "decoder_"
    embed_ln = _norm(model, f"{head}embed_ln") if f"{head}embed_ln.hook_in" in names else None
    final = f"{stack}_ln_final"
    ln_final = _norm(model, final) if _same(probe, f"{final}.hook_in", blocks[-1].out) else None
    layer0 = f"{P}.0.hook_in"
    input_ = f"{embed_ln.name}.hook_in" if embed_ln is not None else layer0
    common = fields(model, "TransformerBridge", "post" if post else "pre")
    norms = [embed_ln, ln_final, *(n for b in blocks for n in b.norms())]
    present = [n for n in norms if n is not None]
    if present:
        common["norm_type"] = "RMS" if present[0].rms else "LN"
    common.update(n_layers=n_layers, n_heads=blocks[0].W_O.shape[0], d_head=blocks[0].W_O.shape[1])
    common["biases"] = _biases(model, stack, blocks, present)
    return ModelSpec(
        **common,
        token_types=False,
        causal=stack == "decoder",
        embeds=_embeds(probe, stack, input_),
        embed_ln=embed_ln,
        blocks=blocks,
        ln_final=ln_final,
        final=ln_final.output if ln_final is not None and ln_final.output else blocks[-1].out,
        layer0=layer0,
        input=input_,
        unembed_reads_final=stack == "decoder",
    )


def _windows(model: Any, stack: StackName, n_layers: int) -> tuple[int | None, ...]:
    """Per block, the self-attention's sliding window from the stack's Hugging Face config
    (T5Gemma nests one per stack): causal in the decoder (``i - window < j <= i``),
    ``|i - j| <= window`` in the encoder, Hugging Face's bidirectional window. Effective
    attention checks each pattern against the key sets so derived."""
    hf = getattr(getattr(model, "original_model", None), "config", None)
    sub = getattr(hf, stack, None)
    cfg = sub if getattr(sub, "layer_types", None) is not None else hf
    types, w = getattr(cfg, "layer_types", None), getattr(cfg, "sliding_window", None)
    if types is None:
        return (None,) * n_layers
    out: list[int | None] = []
    for t in list(types)[:n_layers]:
        if t not in ("full_attention", "sliding_attention"):
            raise unsupported(f"attention layer type {t!r} in the {stack}", model)
        out.append(int(w) if t == "sliding_attention" and w else None)
    return tuple(out) + (None,) * (n_layers - len(out))


def cross_spec(spec: ModelSpec) -> ModelSpec:
    """A decoder stack's cross-attention as a stack of its own, for effective attention: each
    block's pattern, values and ``W_O`` those of its cross-attention, every decoder query
    seeing every valid encoder position (no causal mask, no window)."""
    crosses = [b.cross for b in spec.blocks]
    if any(x is None for x in crosses):
        raise ValueError(
            "cross=True reads a decoder's cross-attention: an encoder–decoder's decoder, "
            f"each of whose blocks has one ({spec.architecture}'s stack does not)"
        )
    blocks = tuple(
        replace(b, pattern=x.pattern, z=x.z, v=x.v, W_O=x.W_O, b_V=x.b_V, b_O=x.b_O, window=None)
        for b, x in zip(spec.blocks, crosses, strict=True)
        if x is not None
    )
    return replace(spec, causal=False, blocks=blocks)


def _block(
    model: Any, stack: StackName, L: int, post: bool, names: set[str], probe: dict[str, Tensor]
) -> Block:
    p = f"{stack}_blocks.{L}."
    blk = model.get_submodule(p[:-1])
    has = lambda name: p + name + ".hook_in" in names  # noqa: E731
    norm = lambda name: _norm(model, p + name) if has(name) else None  # noqa: E731
    attn = "attn" if has("attn") else "self_attn"
    last = "ln3" if has("ln3") else "ln2"  # the MLP's norm
    cross = None
    if has("cross_attn"):
        cross = Cross(
            **_attention(model, stack, L, "cross_attn", names, probe),
            ln=norm("ln2") if post else None,
            attn_post=norm("ln2_post"),
        )
    mlp_out = next((p + h for h in ("mlp.out.hook_out", "mlp.hook_out") if p + h in names), None)
    b_out = getattr(blk.mlp, "b_out", None) if mlp_out == p + "mlp.out.hook_out" else None
    return Block(
        **_attention(model, stack, L, attn, names, probe),
        mlp_out=mlp_out,
        mlp_in=next((p + h for h in ("mlp.in.hook_in", "mlp.hook_in") if p + h in names), None),
        out=p + "hook_out",
        b_out=vec(b_out),
        ln1=norm("ln1") if post else None,
        ln2=norm(last) if post else None,
        attn_post=norm("ln1_post"),
        mlp_post=norm(f"{last}_post"),
        cross=cross,
    )


def _attention(
    model: Any, stack: StackName, L: int, name: str, names: set[str], probe: dict[str, Tensor]
) -> dict[str, Any]:
    """One attention's hooks and weights, its pattern checked on the probe run."""
    p = f"{stack}_blocks.{L}.{name}."
    what = f"the {stack}'s {'cross' if name == 'cross_attn' else 'self'}-attention in block {L}"
    pattern = p + "hook_pattern"
    if pattern not in probe:
        raise unsupported(f"{what}, whose pattern hook {pattern} never fires,", model)
    a = probe[pattern]
    keys = probe["decoder" if stack == "decoder" and name != "cross_attn" else "encoder"]
    if a.ndim != 4 or a.shape[-1] != keys.shape[-1] or a.shape[-2] != probe[stack].shape[-1]:
        raise unsupported(
            f"{what}, whose pattern {pattern} has shape {tuple(a.shape)}, not [batch head "
            f"query key] over all {keys.shape[-1]} keys (a banded, windowed layout),",
            model,
        )
    rows = a.sum(-1).double()
    off = (rows - 1).abs().max().item()
    if not off <= 1e-6:
        raise unsupported(
            f"{what}, whose pattern {pattern} is not a probability (rows sum to "
            f"{rows.min().item():.3g}..{rows.max().item():.3g}, not 1: raw scores?),",
            model,
        )
    mod = model.get_submodule(p[:-1])
    n_heads = mod.W_O.shape[0]
    return dict(
        z=p + "o.hook_in",
        pattern=pattern,
        v=p + "v.hook_out" if p + "v.hook_out" in names else p + "hook_v",
        W_O=mod.W_O.detach(),
        b_V=b_v(mod, n_heads),
        b_O=vec(getattr(mod, "b_O", None)),
    )


def _norm(model: Any, name: str) -> Norm | None:
    """`_bridge.read_norm`, trying RMSNorm where the bridge takes a norm for LayerNorm (and
    the reverse): the formula the module computes decides; its scale is then re-read."""
    try:
        return _bridge.read_norm(model, name)
    except NotImplementedError:
        mod = model.get_submodule(name)
        orig = mod.original_component
        rms = not bool(getattr(mod, "uses_rms_norm", False))
        w = vec(_bridge._maybe(mod, "weight"))
        b = None if rms else vec(_bridge._maybe(orig, "bias"))
        eps = _bridge._eps(model, orig)
        rounds = _bridge._rounds(model, name, orig, w, b, rms, eps)  # raises if neither
        hooks = (f"{name}.hook_in",), f"{name}.hook_scale", f"{name}.hook_out"
        norm = Norm(name, *hooks, w, b, rms, rounds=rounds, eps=eps)
        _RESCALED.setdefault(model, {})[name] = norm
        return norm


def rescale(model: Model, cache: Cache) -> Cache:
    """`cache` with the scale of every norm whose bridge ``hook_scale`` is not the module's
    own recomputed from its input (as the module computes it: float32 where it rounds)."""
    held = set(cache.keys())
    fixes = {
        norm.scale: norm for norm in _RESCALED.get(model, {}).values() if norm.inputs[0] in held
    }
    if not fixes:
        return cache
    out = {k: cache[k] for k in cache.keys()}  # noqa: SIM118  # an ActivationCache is no dict
    for scale, norm in fixes.items():
        x = cache[norm.inputs[0]]
        x = x if norm.rms else x - x.mean(-1, keepdim=True)
        eps = norm.eps if norm.eps is not None else 0.0
        if norm.rounds:  # the module's own float32 statistic
            out[scale] = 1 / torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x)
        else:
            out[scale] = (x.square().mean(-1, keepdim=True) + eps).sqrt()
    return out


def _embeds(probe: dict[str, Tensor], stack: StackName, input_: str) -> tuple[tuple[str, str], ...]:
    """The embeddings summed into the stack's input where they sum to it; else the input."""
    x = probe[input_]
    found = [
        (name, f"{name}.hook_out")
        for name in _EMBEDS[stack]
        if f"{name}.hook_out" in probe and probe[f"{name}.hook_out"].shape == x.shape
    ]
    if found and _close(sum(probe[h] for _, h in found), x):  # type: ignore[arg-type]
        return tuple((n.removeprefix("decoder_").removeprefix("encoder_"), h) for n, h in found)
    return (("input", input_),)


def _biases(
    model: Any, stack: StackName, blocks: tuple[Block, ...], norms: list[Norm]
) -> frozenset:
    found = {n for n in ("b_V", "b_O", "b_out") if any(getattr(b, n) is not None for b in blocks)}
    xs = [b.cross for b in blocks if b.cross is not None]
    found |= {n for n in ("b_V", "b_O") if any(getattr(x, n) is not None for x in xs)}
    if getattr(getattr(model, f"{stack}_blocks")[0].mlp, "b_in", None) is not None:
        found.add("b_in")
    if any(n.b is not None for n in norms):
        found.add("ln_b")
    return frozenset(found)


def _probe(model: Any) -> dict[str, Tensor]:
    """Every hook of one six-token run (three decoder tokens), once per model; ``"encoder"``
    and ``"decoder"`` hold the ids."""
    if model in _PROBES:
        return _PROBES[model]
    device = next(model.parameters()).device
    vocab = int(model.cfg.d_vocab)
    enc = (torch.arange(6, device=device)[None] + 3) % vocab
    dec = (torch.tensor([[1, 5, 6]], device=device)) % vocab
    with exclusive(model), torch.no_grad(), evaluating(model):
        logits, cache = model.run_with_cache(enc, decoder_input=dec)
    probe = {k: cache[k] for k in cache.keys()}  # noqa: SIM118
    probe.update(encoder=enc, decoder=dec, logits=logits)
    _PROBES[model] = probe
    return probe


def _same(probe: dict[str, Tensor], a: str, b: str) -> bool:
    return a in probe and b in probe and _close(probe[a], probe[b])


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


def run_seq2seq(
    model: Any,
    tokens: Tensor,
    attention_mask: Tensor | None,
    decoder_tokens: Tensor,
    decoder_attention_mask: Tensor | None,
    names_filter: Any,
) -> Cache:
    """Run an encoder–decoder on encoder and decoder ids and cache what `names_filter`
    selects (norm scales read as `rescale` reads them); no hook survives."""
    with exclusive(model), torch.no_grad(), evaluating(model):
        _, cache = model.run_with_cache(
            tokens,
            attention_mask=attention_mask,
            decoder_input=decoder_tokens,
            decoder_attention_mask=decoder_attention_mask,
            names_filter=names_filter,
        )
    return rescale(model, cache)


def unembedding(model: Any) -> tuple[float, Tensor | None]:
    """``(scale, bias)`` with ``logits = unembed(scale * final) + bias``, measured on the probe
    run: what lies between the decoder's final embedding and ``lm_head`` (T5 multiplies it by
    ``d_model ** -0.5`` when its embeddings are tied) and a bias added after ``lm_head``
    (BART's ``final_logits_bias``; None where there is none). A map after ``lm_head`` that
    is not a bias (soft-capping) is left out: the logits are the unembedding's output."""
    probe, spec = _probe(model), spec_stack(model, "decoder")
    x, final = probe["unembed.hook_in"].double(), probe[spec.final].double()
    scale = ((x * final).sum() / final.square().sum()).item()
    if not torch.allclose(x, scale * final, rtol=1e-6, atol=1e-9 * final.abs().max().item()):
        raise unsupported(
            f"logit attribution through what lies between {spec.final} and the unembedding "
            "(not a fixed multiplier)",
            model,
        )
    diff = (probe["logits"] - probe["unembed.hook_out"]).double()
    rows = diff.flatten(0, -2)
    if not torch.allclose(rows, rows[:1].expand_as(rows), rtol=1e-6, atol=1e-9):
        return scale, None  # not one bias at every position: a map after lm_head
    bias = rows[0].to(probe["logits"].dtype)
    return scale, bias if bias.abs().max() > 0 else None


def cross_values(model: Any, L: int) -> Tensor:
    """``W_V`` ``[kv_head d_model d_head]`` of decoder block `L`'s cross-attention: its values
    are ``encoder_final @ W_V + b_V`` (checked by the caller on the run it decomposes)."""
    W_V = getattr(model.decoder_blocks[L].cross_attn, "W_V", None)
    if not isinstance(W_V, Tensor) or W_V.ndim != 3:
        raise unsupported(
            f"composing decoder block {L}'s cross-attention, which exposes no W_V, with the "
            "encoder",
            model,
        )
    return W_V.detach()


def shift_right(model: Any, labels: Tensor) -> Tensor:
    """Target ids `labels` ``[batch pos]`` shifted right one place behind the decoder's start
    token, as Hugging Face's training feeds the decoder: the model's own
    ``prepare_decoder_input_ids_from_labels`` where it has one (T5Gemma's start is its
    decoder's BOS; mBART's, each row's last real label wrapped round), else
    ``config.decoder_start_token_id`` (``shift_tokens_right``)."""
    hf = getattr(model, "original_model", None)
    prepare = getattr(hf, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return torch.as_tensor(prepare(labels=labels))
    start = getattr(getattr(hf, "config", None), "decoder_start_token_id", None)
    if not isinstance(start, int):
        raise unsupported(
            "decoder_input as text on a model whose config names no decoder_start_token_id "
            "(pass the decoder's token ids)",
            model,
        )
    return torch.cat([labels.new_full((labels.shape[0], 1), start), labels[:, :-1]], 1)


def decoder_text_ids(model: Any, text: str) -> list[int]:
    """One text's decoder ids: the tokenizer's ids of it as a target (``text_target=``, its own
    special tokens for labels, e.g. a closing EOS) `shift_right`ed, as long as the labels."""
    labels = model.tokenizer(text_target=text)["input_ids"]
    return shift_right(model, torch.tensor([labels], dtype=torch.long))[0].tolist()


def start_tokens(model: Any, batch: int, device: torch.device) -> Tensor:
    """One decoder-start token per example: what an encoder-only question runs the decoder on
    (the encoder never reads it; 0 where the config names none)."""
    hf = getattr(getattr(model, "original_model", None), "config", None)
    start = getattr(hf, "decoder_start_token_id", None)
    start = start if isinstance(start, int) else 0
    return torch.full((batch, 1), start, dtype=torch.long, device=device)


__all__ = [
    "STACKS",
    "StackName",
    "cross_spec",
    "cross_values",
    "decoder_text_ids",
    "is_seq2seq",
    "rescale",
    "run_seq2seq",
    "shift_right",
    "spec_stack",
    "start_tokens",
    "unembedding",
]
