"""Encoder–decoders: each stack's decomposition against Hugging Face's own hidden states.

One tiny random model per encoder–decoder family of the zoo, a padded batch on both sides:
every layer of the encoder (``stack="encoder"``) and of the decoder (``decoder_input=``), at
every granularity the stacks support, must sum to ``encoder_hidden_states`` /
``decoder_hidden_states`` of the same weights run by Hugging Face alone. A stack whose
attention the bridge does not expose faithfully must be refused by name.
"""

from __future__ import annotations

import functools
import importlib
import random
from typing import Any

import pytest
import torch
from support import zoo
from support.models import TL3

import tl_decomp as td

ENC = torch.tensor([[1, 5, 6, 7, 5, 8, 9, 10, 2], [1, 5, 6, 7, 2, 0, 0, 0, 0]])
ENC_MASK = (torch.arange(9) < torch.tensor([[9], [5]])).long()
DEC = torch.tensor([[1, 5, 6, 7, 8, 5], [1, 9, 10, 0, 0, 0]])
DEC_MASK = (torch.arange(6) < torch.tensor([[6], [3]])).long()
SEQ2SEQ = [name for name, family in zoo.FAMILIES.items() if family.seq2seq]
pytestmark = pytest.mark.skipif(TL3, reason="the bridge zoo is TransformerLens 4.x's")
GRAINS = ("coarse", "layer", "head", "source")
# What the bridge does not expose faithfully (the library finds it; this is the expectation).
REFUSED = {
    ("longt5", "encoder"): "never fires",  # local attention delegated to Hugging Face
    ("led", "encoder"): "banded",  # Longformer's windowed chunks
    ("switch_transformers", "encoder"): "not a probability",  # hook_pattern holds raw scores
    ("switch_transformers", "decoder"): "not a probability",
}


@functools.cache
def _model(family: str):
    return zoo.boot(family)


@functools.cache
def _reference(family: str):
    hf = zoo.hf_reference(family)
    with torch.inference_mode():
        out = hf(
            input_ids=ENC,
            attention_mask=ENC_MASK,
            decoder_input_ids=DEC,
            decoder_attention_mask=DEC_MASK,
            output_hidden_states=True,
        )
    return {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}


def _decompose_layers(model, stack: Any, granularity: Any):
    return td.decompose_layers(
        model,
        ENC,
        attention_mask=ENC_MASK,
        decoder_input=DEC if stack == "decoder" else None,
        decoder_attention_mask=DEC_MASK if stack == "decoder" else None,
        stack=stack,
        granularity=granularity,
    )


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_stack_matches_hugging_face(family: str, stack: str) -> None:
    model = _model(family)
    if (family, stack) in REFUSED:
        with pytest.raises(NotImplementedError, match=REFUSED[family, stack]):
            _decompose_layers(model, stack, "coarse")
        return
    states = _reference(family)[stack]
    real = (DEC_MASK if stack == "decoder" else ENC_MASK).bool()
    n = len(states) - 1  # Hugging Face: the input, then each block's output ...
    for granularity in GRAINS:
        ds = _decompose_layers(model, stack, granularity)
        has_final = ds[-1].layer == "final"  # ... the last one after the stack's final norm
        assert [d.layer for d in ds] == [*range(n + 1), *(["final"] * has_final)]
        assert {"i", "h", "f"} <= set(ds[-1].kinds) <= {"i", "h", "x", "f", "c"}
        assert ("x" in ds[-1].kinds) == (stack == "decoder")  # cross-attention: the decoder's
        for d in ds:
            if has_final and d.layer == n:
                continue  # the last block's own output: Hugging Face does not return it
            ref = states[n if d.layer == "final" else d.layer]
            err = (d.factors.sum(0) - ref)[real].abs().max() / ref[real].abs().max()
            recipe = d.meta["recipe"]  # HF norms computing in float32 (T5Gemma) round its states
            tol = recipe.spec.tolerance(torch.float64, recipe.rounded(d.layer))
            assert err.item() <= tol, (family, stack, granularity, d.layer, err.item())


def test_cross_attention_labels_and_splits() -> None:
    """Cross heads are X{block}H{head}, by encoder position X{block}H{head}K{k}; the source
    split sums to the head split, which sums to the layer term."""
    model = _model("bart")
    by = {g: _decompose_layers(model, "decoder", g)[2] for g in ("layer", "head", "source")}
    assert "1_cross_out" in by["layer"].labels
    heads = [i for i, label in enumerate(by["head"].labels) if label.startswith("X1H")]
    assert [by["head"].labels[i] for i in heads] == [f"X1H{h}" for h in range(4)]
    src = [i for i, label in enumerate(by["source"].labels) if label.startswith("X1H2K")]
    assert len(src) == ENC.shape[1]
    h2 = by["head"].factors[by["head"].labels.index("X1H2")]
    assert torch.allclose(by["source"].factors[src].sum(0), h2, atol=1e-12)
    layer = by["layer"].factors[by["layer"].labels.index("1_cross_out")]
    assert torch.allclose(by["head"].factors[heads].sum(0), layer, atol=1e-12)


def test_decompose_one_layer_of_each_stack() -> None:
    model = _model("t5")
    d = td.decompose(model, ENC, attention_mask=ENC_MASK, decoder_input=DEC, layer=2)
    assert d.labels == ("i", "h", "x", "f", "c") and d.relative_error < 1e-12
    assert d.site == "decoder_blocks.1.hook_out" and d.tokens is not None
    assert torch.equal(d.tokens, DEC)
    e = td.decompose(model, ENC, attention_mask=ENC_MASK, stack="encoder", layer="final")
    assert e.labels == ("i", "h", "f", "c") and e.site == "encoder_ln_final.hook_out"
    assert e.tokens is not None and torch.equal(e.tokens, ENC)


def test_refusals_by_message() -> None:
    model = _model("bart")
    with pytest.raises(NotImplementedError, match="encoder–decoder model outside"):
        td.decompose(model, ENC)
    with pytest.raises(ValueError, match="needs decoder_input"):
        td.decompose(model, ENC, stack="decoder")
    with pytest.raises((ValueError, TypeError), match="stack must be one of|stack"):
        td.decompose(model, ENC, stack="middle")  # type: ignore[arg-type]  # TypeError: jaxtyping
    with pytest.raises(NotImplementedError, match="granularity='token' on an encoder–decoder"):
        td.decompose(model, ENC, decoder_input=DEC, granularity="token")
    with pytest.raises(ValueError, match="examples but decoder_input"):
        td.decompose(model, ENC, decoder_input=DEC[:1])


# -- cross-attention composed with the encoder ----------------------------------------------
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_composed_cross_attention_sums_as_the_plain_one(family: str) -> None:
    """``cross="encoder"`` splits x into rows ``x.<encoder label>``: at every layer and
    granularity the stack still sums to the model's state, and the x rows to the plain x.
    Either stack refused refuses the composition by the same name."""
    model, real = _model(family), DEC_MASK.bool()
    refused = REFUSED.get((family, "encoder")) or REFUSED.get((family, "decoder"))
    if refused:
        with pytest.raises(NotImplementedError, match=refused):
            td.decompose(model, ENC, decoder_input=DEC, cross="encoder")
        return
    for granularity in GRAINS:
        kw: dict[str, Any] = dict(attention_mask=ENC_MASK, decoder_attention_mask=DEC_MASK)
        kw.update(decoder_input=DEC, granularity=granularity)
        composed = td.decompose_layers(model, ENC, cross="encoder", **kw)
        plain = td.decompose_layers(model, ENC, **kw)
        enc = td.decompose(model, ENC, attention_mask=ENC_MASK, stack="encoder",
                           granularity=granularity)  # fmt: skip
        for d, p in zip(composed, plain, strict=True):
            recipe = d.meta["recipe"]
            tol = recipe.spec.tolerance(torch.float64, recipe.rounded(d.layer))
            scale = p.target[real].abs().max()
            assert (d.factors.sum(0) - p.target)[real].abs().max() <= tol * scale
            if d.layer == 0:
                continue
            xs = [label for label in d.labels if label.startswith("x.")]
            assert xs == [f"x.{label}" for label in recipe.encoder.layout(n_pos=ENC.shape[1])]
            assert {label[2:] for label in xs} >= set(enc.labels)
            assert set(d.kinds[d.labels.index(label)] for label in xs) == {"x"}
            x, px = d.coarse(), p.coarse()
            gap = x.factors[x.labels.index("x")] - px.factors[px.labels.index("x")]
            assert gap[real].abs().max() <= tol * scale, (family, granularity, d.layer)


def test_composed_cross_attention_refusals() -> None:
    model = _model("bart")
    with pytest.raises(ValueError, match="cross='encoder' splits a decoder's"):
        td.decompose(model, ENC, stack="encoder", cross="encoder")
    with pytest.raises((ValueError, TypeError), match="cross"):
        td.decompose(model, ENC, decoder_input=DEC, cross="decoder")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="reduce= with cross='encoder'"):
        td.decompose_layers(model, ENC, decoder_input=DEC, cross="encoder", reduce="shares")


def _hf_cross(hf: Any, L: int) -> tuple[Any, Any]:
    """Hugging Face's own value and output maps of decoder block `L`'s cross-attention."""
    decoder = hf.get_decoder()
    if hasattr(decoder, "block"):  # T5
        mod = decoder.block[L].layer[1].EncDecAttention
        return mod.v, mod.o
    layer = decoder.layers[L]
    mod = getattr(layer, "encoder_attn", None) or layer.cross_attn
    return mod.v_proj, getattr(mod, "out_proj", None) or mod.o_proj


def _hf_cross_out(a: torch.Tensor, v: torch.Tensor, o_map: Any) -> torch.Tensor:
    """``o_map(a @ v)`` without its bias: values ``[batch key (kv_head d_head)]`` shared by
    each group of query heads, as Hugging Face repeats them."""
    n_heads = a.shape[1]
    d_head = o_map.weight.shape[1] // n_heads
    v = v.unflatten(-1, (-1, d_head))
    v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
    z = torch.einsum("bhqk,bkhd->bqhd", a, v).flatten(-2)
    return o_map(z) - (0 if o_map.bias is None else o_map.bias)


# pre-LN, no sandwich norm: nothing on the residual stream between a cross output and a state
@pytest.mark.parametrize("family", ["t5", "mbart", "m2m100"])
def test_composed_cross_attention_matches_hugging_face_per_encoder_factor(family: str) -> None:
    """Each row ``x.<label>`` against Hugging Face's own cross-attention modules run on that
    encoder factor alone, under Hugging Face's own cross pattern (frozen), value and output
    biases left out, summed over the blocks below the layer (pre-LN decoders carry each
    sublayer's output unchanged)."""
    model, hf, real = _model(family), zoo.hf_reference(family), DEC_MASK.bool()
    with torch.inference_mode():
        out = hf(input_ids=ENC, attention_mask=ENC_MASK, decoder_input_ids=DEC,
                 decoder_attention_mask=DEC_MASK, output_attentions=True)  # fmt: skip
    enc = td.decompose(model, ENC, attention_mask=ENC_MASK, stack="encoder", layer="final",
                       granularity="layer")  # fmt: skip
    assert torch.allclose(enc.target, out.encoder_last_hidden_state, rtol=0, atol=1e-6)
    n = len(out.cross_attentions)
    d = td.decompose(model, ENC, attention_mask=ENC_MASK, decoder_input=DEC,
                     decoder_attention_mask=DEC_MASK, layer=n, granularity="layer",
                     cross="encoder")  # fmt: skip
    worst = 0.0
    for label, factor in zip(enc.labels, enc.factors, strict=True):
        want = torch.zeros_like(d.target)
        for L in range(n):
            v_map, o_map = _hf_cross(hf, L)
            a = out.cross_attentions[L]  # [batch head query key]
            with torch.inference_mode():
                v = v_map(factor) - (0 if v_map.bias is None else v_map.bias)
                want += _hf_cross_out(a, v, o_map)
        got = d.factors[d.labels.index(f"x.{label}")]
        worst = max(worst, ((got - want)[real].abs().max() / d.target[real].abs().max()).item())
    assert worst <= 1e-12, (family, worst)


def test_user_cache_with_both_masks() -> None:
    """A cache of the user's own run decomposes as the run made by `decompose` does (composed
    with the encoder too); the cross pattern is checked against the encoder mask given."""
    model = _model("mbart")
    names = td.decomposition_names_filter(model, stack="decoder", granularity="head",
                                          cross="encoder")  # fmt: skip
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            ENC,
            attention_mask=ENC_MASK,
            decoder_input=DEC,
            decoder_attention_mask=DEC_MASK,
            names_filter=names,
        )
        _, unmasked = model.run_with_cache(ENC, decoder_input=DEC, names_filter=names)
    masks: dict[str, Any] = dict(attention_mask=ENC_MASK, decoder_attention_mask=DEC_MASK)
    own = td.decompose(model, cache, stack="decoder", granularity="head", cross="encoder",
                       **masks)  # fmt: skip
    ran = td.decompose(model, ENC, decoder_input=DEC, granularity="head", cross="encoder",
                       **masks)  # fmt: skip
    assert own.labels == ran.labels and torch.equal(own.factors, ran.factors)
    with pytest.raises(ValueError, match="padded encoder positions weight"):
        td.decompose(model, unmasked, stack="decoder", **masks)


# -- token identifiability on either stack -------------------------------------------------
_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "is", "big"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def _brute_force_rates(family: str, stack: str, corpus, decoder, test, n_layers: int):
    """Naive cosine identifiability from Hugging Face's own hidden states, one sequence at a
    time (no padding): a token is identified when the nearest layer-0 vector of its own
    sequence holds its id."""
    hf, model = zoo.hf_reference(family), _model(family)
    hits: list[list[bool]] = [[] for _ in range(n_layers)]
    for i in test:
        enc = torch.tensor([model.tokenizer(corpus[i])["input_ids"]])
        dec = td.adapters.tokenize(model, [decoder[i]], encoder=False)[0]  # the decoder's ids
        with torch.inference_mode():
            out = hf(input_ids=enc, decoder_input_ids=dec, output_hidden_states=True)
        states = out.encoder_hidden_states if stack == "encoder" else out.decoder_hidden_states
        ids = (enc if stack == "encoder" else dec)[0]
        e0 = torch.nn.functional.normalize(states[0][0], dim=-1)
        for layer in range(n_layers):
            nearest = (torch.nn.functional.normalize(states[layer][0], dim=-1) @ e0.T).argmax(-1)
            hits[layer] += (ids[nearest] == ids).tolist()
    return [sum(h) / len(h) for h in hits]


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_token_identifiability_on_either_stack(family: str, stack: Any) -> None:
    """Per-layer rates of either stack: layer 0 identifies itself under every map, and the
    naive rates equal a brute-force nearest-neighbour search over Hugging Face's states
    (layers below the last: Hugging Face returns that one after the stack's final norm)."""
    model, corpus, decoder = _model(family), _texts(60, 0), _texts(60, 1)
    kw: dict[str, Any] = dict(stack=stack, progress=False, batch_size=16)
    kw["decoder_input"] = decoder if stack == "decoder" else None
    n = td.model_spec(model, stack).n_layers
    naive = td.token_identifiability(model, corpus, mapping="naive", layers=range(n), **kw)
    linear = td.token_identifiability(model, corpus, **kw)
    assert linear.layers == tuple(range(n + 1)) and naive.layers == tuple(range(n))
    assert naive.rate(0) == 1.0 and linear.rate(0) == 1.0
    want = _brute_force_rates(family, stack, corpus, decoder, naive.test, n)
    assert naive.rates.tolist() == pytest.approx(want, abs=1e-12), (want, naive.rates)


def test_token_identifiability_stack_refusals() -> None:
    model, corpus = _model("bart"), _texts(8, 0)
    with pytest.raises(ValueError, match="needs decoder_input"):
        td.token_identifiability(model, corpus, stack="decoder", progress=False)
    with pytest.raises(ValueError, match="one each"):
        td.token_identifiability(model, corpus, decoder_input=corpus[:3], progress=False)
    with pytest.raises(NotImplementedError, match="lookup='vocab' on an encoder–decoder"):
        td.token_identifiability(model, corpus, stack="encoder", lookup="vocab", progress=False)


# -- effective attention, logits, the architecture table ------------------------------------
ATTENTIONS = (("encoder", False), ("decoder", False), ("decoder", True))  # (stack, cross)


def _attention_error(family: str, stack: Any, cross: bool) -> float:
    """Max |A_eff - A P_row| over every block, head and real query row, ``P_row`` from one
    SVD of ``T = V W_O`` over exactly the keys the model's own pattern gives that row weight
    (causal prefix, padding, T5Gemma's windows; cross: the encoder's valid positions)."""
    model = _model(family)
    names = td.attention_names_filter(model, stack=stack, cross=cross)
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            ENC, attention_mask=ENC_MASK, decoder_input=DEC, decoder_attention_mask=DEC_MASK,
            names_filter=names,
        )  # fmt: skip
    spec = td.model_spec(model, stack)
    queries = DEC_MASK if stack == "decoder" else ENC_MASK
    worst = 0.0
    for L, blk in enumerate(spec.blocks):
        x = blk.cross if cross else blk
        assert x is not None
        kw = dict(stack=stack, cross=cross, attention_mask=ENC_MASK)
        if stack == "decoder":
            kw["decoder_attention_mask"] = DEC_MASK
        eff = td.effective_attention(cache, L, **kw)  # type: ignore[arg-type]
        ns = td.attention_null_space(cache, [L], **kw)  # type: ignore[arg-type]
        a, W_O = cache[x.pattern].double(), x.W_O.double()
        v = cache[x.v].double()
        v = v[:, :, [h * v.shape[2] // spec.n_heads for h in range(spec.n_heads)]]  # GQA
        for b in range(ENC.shape[0]):
            last = int(queries[b].sum()) - 1
            for q in range(last + 1):
                keys = (a[b, :, q] != 0).any(0).nonzero()[:, 0].tolist()
                for h in range(spec.n_heads):
                    u, s, _ = torch.linalg.svd(v[b, keys, h] @ W_O[h], full_matrices=False)
                    tol = torch.finfo(torch.float64).eps * max(len(keys), spec.d_model) * s[0]
                    basis = u[:, s > tol]
                    want = torch.zeros_like(a[b, h, q])
                    want[keys] = a[b, h, q, keys] @ basis @ basis.T
                    worst = max(worst, (eff[b, h, q] - want).abs().max().item())
                    if q == last:  # the null space describes the last query's keys
                        rank = basis.shape[1]
                        assert ns.rank[0, b, h] == rank, (family, stack, cross, L, b, h)
                        assert ns.null_dim[0, b, h] == len(keys) - rank
            n_keys = int((ENC_MASK if cross or stack == "encoder" else DEC_MASK)[b].sum())
            assert ns.n_keys[b] == n_keys
    return worst


def _hf_unembed(hf, family: str, hidden: torch.Tensor, lens: bool) -> torch.Tensor:
    """Hugging Face's own logits of `hidden` (the lens: through its decoder's final norm),
    before any soft-capping: T5 scales by d_model**-0.5 (``scale_decoder_outputs``)."""
    decoder = hf.get_decoder()
    if lens:
        norm = next(getattr(decoder, n) for n in ("final_layer_norm", "layer_norm", "norm")
                    if getattr(decoder, n, None) is not None)  # fmt: skip
        hidden = norm(hidden)
    if getattr(hf.config, "scale_decoder_outputs", False):
        hidden = hidden * hf.config.d_model**-0.5
    out = hf.lm_head(hidden)
    bias = getattr(hf, "final_logits_bias", None)
    return out if bias is None else out + bias


def _logit_error(family: str) -> float:
    """Max relative error of decoder logit attribution: the final embedding's against Hugging
    Face's logits (soft-capping undone), each block output's against Hugging Face's own lens
    ``lm_head(final_norm(h_l))``; post-LN decoders (no final norm) refuse the lens by name."""
    hf = zoo.hf_reference(family)
    states = _reference(family)["decoder"]
    with torch.inference_mode():
        out = hf(input_ids=ENC, attention_mask=ENC_MASK, decoder_input_ids=DEC,
                 decoder_attention_mask=DEC_MASK)  # fmt: skip
    cap = getattr(getattr(hf.config, "decoder", hf.config), "final_logit_softcapping", None)
    final = out.logits if cap is None else cap * torch.atanh(out.logits / cap)
    real, n, worst = DEC_MASK.bool(), len(states) - 1, 0.0
    ds = _decompose_layers(_model(family), "decoder", "head")
    post = ds[-1].layer != "final"  # no final norm: post-LN (BART, Marian)
    for d in ds:
        if d.layer == n and not post:
            continue  # the last block's own output: Hugging Face does not return it
        if d.layer not in ("final", n) and post:
            with pytest.raises(NotImplementedError, match="logit lens"):
                d.logit_attrs(torch.tensor([5, 9]), incorrect=7)
            continue
        la = d.logit_attrs(torch.tensor([5, 9]), incorrect=7)
        if d.layer in ("final", n):
            ref = final
        else:
            with torch.inference_mode():
                ref = _hf_unembed(hf, family, states[d.layer], lens=True)
        want = ref[..., [5, 9]].diagonal(dim1=0, dim2=-1).T - ref[..., 7]
        err = (la.values.sum(0) - want)[real].abs().max() / want[real].abs().max()
        worst = max(worst, err.item())
    return worst


def _decomposition_error(family: str, stack: str) -> float:
    states = _reference(family)[stack]
    real = (DEC_MASK if stack == "decoder" else ENC_MASK).bool()
    n, worst = len(states) - 1, 0.0
    for granularity in GRAINS:
        ds = _decompose_layers(_model(family), stack, granularity)
        for d in ds:
            if d.layer == n and ds[-1].layer == "final":
                continue  # the last block's own output: Hugging Face does not return it
            ref = states[n if d.layer == "final" else d.layer]
            err = (d.factors.sum(0) - ref)[real].abs().max() / ref[real].abs().max()
            worst = max(worst, err.item())
    return worst


@functools.cache
def seq2seq_outcome(family: str) -> tuple[str, str]:
    """(status, detail) for the README's architecture table: ``("exact", "<max relative
    error> (float64)")`` over both stacks (every granularity against Hugging Face's hidden
    states), effective attention of every attention (per-row SVD reference) and the
    decoder's logits and lens, or ``("refused", reason)``."""
    try:
        worst = max(_decomposition_error(family, s) for s in ("encoder", "decoder"))
        worst = max(worst, *(_attention_error(family, s, c) for s, c in ATTENTIONS))
        worst = max(worst, _logit_error(family))
    except NotImplementedError as err:
        return "refused", str(err).split(" is not supported")[0]
    return "exact", f"{worst:.1e} (float64)"


@pytest.mark.parametrize(("stack", "cross"), ATTENTIONS)
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_effective_attention_matches_per_row_svd(family: str, stack: str, cross: bool) -> None:
    refused = REFUSED.get((family, stack)) or (cross and REFUSED.get((family, "decoder")))
    if refused:
        with pytest.raises(NotImplementedError, match=refused):
            _attention_error(family, stack, cross)
        return
    assert _attention_error(family, stack, cross) <= 1e-10


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_decoder_logits_match_hugging_face(family: str) -> None:
    if (family, "decoder") in REFUSED:
        with pytest.raises(NotImplementedError, match=REFUSED[family, "decoder"]):
            _logit_error(family)
        return
    assert _logit_error(family) <= 1e-6  # T5's decoder_ln_final rounds its scale to float32


def test_t5_unembedding_scale_is_derived() -> None:
    """T5 with tied embeddings multiplies the final embedding by d_model**-0.5 before
    lm_head; the scale is measured on the model, not assumed."""
    model = _model("t5")
    scale, bias = td.adapters.unembedding(model)
    assert abs(scale - model.cfg.d_model**-0.5) < 1e-12 and bias is None
    assert td.adapters.unembedding(_model("bart"))[0] == pytest.approx(1.0, abs=1e-12)


def test_seq2seq_refusals_by_name() -> None:
    model = _model("bart")
    e = td.decompose(model, ENC, attention_mask=ENC_MASK, stack="encoder")
    with pytest.raises(NotImplementedError, match="encoder: its states reach the logits"):
        e.logit_attrs(5)
    with pytest.raises(NotImplementedError, match="encoder–decoder model outside"):
        td.token_identifiability(model, ["the cat sat on the mat ."] * 4, progress=False)
    with pytest.raises(NotImplementedError, match="encoder: its states reach the logits"):
        td.decompose_layers(model, ENC, stack="encoder", reduce=("logit", 5))
    with pytest.raises(ValueError, match="cross=True is the decoder's"):
        td.attention_names_filter(model, stack="encoder", cross=True)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seq2seq_outcome(family: str) -> None:
    status, detail = seq2seq_outcome(family)
    refused = any(f == family for f, _ in REFUSED)
    assert status == ("refused" if refused else "exact"), detail
    if status == "exact":
        assert float(detail.split()[0]) <= 1e-6, detail


# -- decoder text as the decoder reads it; streamed decoder logits ---------------------------
def _hf_shift(family: str, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's own shift of target ids behind the decoder's start token."""
    hf = zoo.hf_reference(family)
    if family == "t5":
        return hf._shift_right(labels)
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return module.shift_tokens_right(
        labels, hf.config.pad_token_id, hf.config.decoder_start_token_id
    )


@pytest.mark.parametrize("family", ["t5", "bart", "marian"])
def test_decoder_text_is_shifted_behind_the_start_token(family: str) -> None:
    """``decoder_input=`` text feeds the decoder what Hugging Face's training does:
    ``labels = tokenizer(text_target=...)`` shifted right behind ``decoder_start_token_id``;
    ids stay as given; the decomposition sums to Hugging Face's decoder state on those ids."""
    model, hf = _model(family), zoo.hf_reference(family)
    texts, targets = ["the cat sat on the mat", "a dog"], ["the dog ran", "a cat sat on the mat"]
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    labels = model.tokenizer(text_target=targets, padding=True, return_tensors="pt")
    shifted, real = _hf_shift(family, labels["input_ids"]), labels["attention_mask"].bool()
    d = td.decompose(model, texts, decoder_input=targets, layer="final")
    assert d.tokens is not None and d.attention_mask is not None
    assert torch.equal(d.attention_mask.bool().cpu(), real)
    assert torch.equal(d.tokens.cpu()[real], shifted[real])  # padding: pad, not a shifted EOS
    assert d.tokens[0, 0] == hf.config.decoder_start_token_id
    one = td.decompose(model, texts[1], decoder_input=targets[1])
    n = int(real[1].sum())
    assert one.tokens is not None and torch.equal(one.tokens.cpu(), shifted[1:, :n])
    with torch.inference_mode():
        out = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 decoder_input_ids=shifted, decoder_attention_mask=labels["attention_mask"],
                 output_hidden_states=True)  # fmt: skip
    ref = out.decoder_hidden_states[-1]
    err = (d.factors.sum(0) - ref)[real].abs().max() / ref[real].abs().max()
    assert err.item() <= 1e-6  # T5's decoder_ln_final rounds its scale to float32
    ids = td.decompose(
        model, texts, decoder_input=DEC[:, :4], decoder_attention_mask=DEC_MASK[:, :4]
    )
    assert ids.tokens is not None and torch.equal(ids.tokens.cpu(), DEC[:, :4])


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_streamed_decoder_logits_equal_the_materialised(family: str) -> None:
    """``reduce=("logit", ...)`` on the decoder applies the measured output scale (T5:
    ``d_model ** -0.5``) and bias (BART's ``final_logits_bias``) as ``logit_attrs`` does, at
    every layer the lens reaches (a post-LN decoder's block outputs are refused by both)."""
    model, real = _model(family), DEC_MASK.bool()
    kw: dict[str, Any] = dict(attention_mask=ENC_MASK, decoder_input=DEC,
                              decoder_attention_mask=DEC_MASK, granularity="head")  # fmt: skip
    ds = td.decompose_layers(model, ENC, **kw)
    post = ds[-1].layer != "final"  # BART: no final norm, no lens at block outputs
    layers = [ds[-1].layer] if post else [d.layer for d in ds]
    for statistic in (("logit", 5), ("logit", 5, 6)):
        rs = td.decompose_layers(model, ENC, layers=layers, reduce=statistic, **kw)
        assert [r.layer for r in rs] == layers
        for r in rs:
            la = next(d for d in ds if d.layer == r.layer).logit_attrs(*statistic[1:])
            assert r.labels == la.labels
            gap = (r.values - la.values)[:, real].abs().max() / la.values[:, real].abs().max()
            assert gap.item() <= 1e-12, (family, r.layer, gap.item())
    if post:
        with pytest.raises(NotImplementedError, match="logit attribution at this layer"):
            td.decompose_layers(model, ENC, layers=[1], reduce=("logit", 5), **kw)
        with pytest.raises(NotImplementedError, match="logit lens at a block output"):
            ds[1].logit_attrs(5)
    hf = zoo.hf_reference(family)
    with torch.inference_mode():
        logits = hf(input_ids=ENC, attention_mask=ENC_MASK, decoder_input_ids=DEC,
                    decoder_attention_mask=DEC_MASK).logits[..., 5]  # fmt: skip
    final = td.decompose_layers(model, ENC, layers=[layers[-1]], reduce=("logit", 5), **kw)[0]
    err = (final.values.sum(0) - logits)[real].abs().max() / logits[real].abs().max()
    assert err.item() <= 1e-6
