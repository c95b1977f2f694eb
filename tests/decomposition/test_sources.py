"""Granularity ``source`` (the attention term split by key position) and its streamed
reductions in `tl_decomp.decomposition`: exact against the per-head terms, the model's own states,
a brute-force norm-based attention, and the materialised stack."""

from __future__ import annotations

import einops
import pytest
import torch
from support.helpers import assert_close
from support.models import KINDS, cached_model

import tl_decomp as td
from tl_decomp.models import TINY_ARCHS

TOKENS = torch.tensor([[1, 5, 6, 7, 5, 8, 9, 10, 5, 11], [1, 5, 6, 7, 8, 9, 5, 0, 0, 0]])
MASK = (torch.arange(10) < torch.tensor([[10], [7]])).long()
CASES = [pytest.param((a, k), id=f"{k}-{a}") for k in KINDS for a in TINY_ARCHS]
SAMPLE = ["gpt2", "bert", "llama", "mistral", "gemma2", "olmo2", "gptj", "gpt_neox", "granite"]


def _cache(model, tokens=TOKENS, mask=MASK, also=()):
    source = td.source_names_filter(model)
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=lambda n: source(n) or n in also
        )
    return cache


def _rows(d, block: int, n_heads: int, values) -> torch.Tensor:
    """The rows ``L{block}H{h}K{k}`` of `values` [factor batch pos] as [batch head query key]."""
    n = values.shape[-1]
    index = [d.labels.index(f"L{block}H{h}K{k}") for h in range(n_heads) for k in range(n)]
    return einops.rearrange(values[index], "(h k) b q -> b h q k", k=n)


def _check_sums_to_heads(model, dtype=torch.float64, tokens=TOKENS, mask=MASK):
    """Every source row group sums to its head's row, and both sum to the model's state."""
    spec = td.model_spec(model)
    kw = dict(attention_mask=mask, layers=[1, -1, "final"])
    sources = td.decompose_layers(model, tokens, granularity="source", **kw)
    heads = td.decompose_layers(model, tokens, granularity="head", **kw)
    worst = 0.0
    for ds, dh in zip(sources, heads, strict=True):
        # The recipe measured the sum against the model's own state (a float32-computing
        # final norm rounds that state: tolerance 1e-6 there).
        assert ds.site == dh.site and ds.relative_error <= spec.tolerance(dtype, True)
        for i, label in enumerate(dh.labels):
            if dh.kinds[i] != "h":
                continue
            rows = [j for j, s in enumerate(ds.labels) if s.startswith(f"{label}K")]
            assert len(rows) == tokens.shape[1], label
            err = (ds.factors[rows].sum(0) - dh.factors[i]).abs().max().item()
            worst = max(worst, err / max(dh.factors[i].abs().max().item(), 1.0))
        rest = [j for j, k in enumerate(ds.kinds) if k != "h"]
        assert ds.labels[rest[0]] == dh.labels[0] and len(rest) == len(dh.labels) - sum(
            k == "h" for k in dh.kinds
        )
        assert_close(ds.factors.sum(0), dh.factors.sum(0), dtype, f"{ds.site}")
    return worst


@pytest.mark.parametrize("case", CASES)
def test_sources_sum_to_heads_and_to_the_state(case):
    arch, kind = case
    model = cached_model(arch, kind)
    assert _check_sums_to_heads(model) <= 1e-12


def test_float32_sums_to_the_state():
    model = cached_model("gpt2", dtype=torch.float32)
    assert _check_sums_to_heads(model, torch.float32) <= 1e-5


def test_padded_keys_give_zero_terms():
    model = cached_model("qwen2")
    d = td.decompose(model, TOKENS, attention_mask=MASK, granularity="source", layer=-1)
    spec = td.model_spec(model)
    for block in range(spec.n_layers):
        rows = _rows(d, block, spec.n_heads, d.factors.norm(dim=-1))
        assert (rows[1, :, :7, 7:] == 0).all()  # real queries of example 1, its padded keys
    nba = td.norm_based_attention(_cache(model), 0, attention_mask=MASK)
    assert (nba[1, :, 7:] == 0).all() and (nba[1, :, :, 7:] == 0).all()


def _brute_force(model, cache, block: int, mask) -> torch.Tensor:
    """``||A[q, k] (x_k W_V + b_V) W_O||`` one (example, head, query, key) at a time, from the
    value projection's input and the model's weights (not from ``hook_v``)."""
    spec = td.model_spec(model)
    x = cache[f"blocks.{block}.attn.v.hook_in"].double()
    a = cache[spec.blocks[block].pattern].double()
    W_V, W_O = model.W_V[block].detach().double(), spec.blocks[block].W_O.detach().double()
    kv = list(spec.kv_head) if W_V.shape[0] != spec.n_heads else list(range(spec.n_heads))
    b_V = spec.blocks[block].b_V
    out = torch.zeros_like(a)
    for b, h, q, k in torch.cartesian_prod(*(torch.arange(n) for n in a.shape)).tolist():
        v = x[b, k] @ W_V[kv[h]] + (0 if b_V is None else b_V[h].double())
        out[b, h, q, k] = (a[b, h, q, k] * v @ W_O[h]).norm()
    return out * (mask[:, None, :, None] * mask[:, None, None, :])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_norm_based_attention_matches_brute_force(arch):
    model = cached_model(arch)  # TransformerBridge: the value projection's input is hooked
    inputs = [f"blocks.{L}.attn.v.hook_in" for L in range(td.model_spec(model).n_layers)]
    cache = _cache(model, TOKENS[:, :7], MASK[:, :7], also=inputs)
    for block in (0, -1):
        got = td.norm_based_attention(cache, block, attention_mask=MASK[:, :7], chunk_size=3)
        want = _brute_force(model, cache, block % td.model_spec(model).n_layers, MASK[:, :7])
        assert_close(got, want, torch.float64, f"{arch} block {block}")


def _queries(t: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    return einops.rearrange(t, "b h q k -> b q h k")[pick]


def _keys(t: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    return einops.rearrange(t, "b h q k -> b k h q")[pick]


def _check_streamed(model, dtype=torch.float64, tokens=TOKENS, mask=MASK) -> None:
    """Every streamed reduction equals the one computed from the materialised stack."""
    spec = td.model_spec(model)
    cache = _cache(model, tokens, mask)
    real = mask.bool()
    for block in (0, spec.n_layers - 1):
        for layer in (block + 1, "final"):
            d = td.decompose(model, tokens, attention_mask=mask, granularity="source", layer=layer)
            kw = dict(layer=layer, attention_mask=mask, chunk_size=3)
            for got, values in [
                (td.source_shares(cache, block, **kw), d.shares()),
                (td.source_norms(cache, block, **kw), d.factors.norm(dim=-1)),
            ]:
                want = _rows(d, block, spec.n_heads, values)
                assert_close(_queries(got, real), _queries(want, real), dtype, f"{layer}")
                assert (_queries(got, ~real) == 0).all() and (_keys(got, ~real) == 0).all()
        if spec.unembed_reads_final:
            got = td.source_logit_attribution(cache, block, 5, incorrect=7, attention_mask=mask)
            want = d.logit_attrs(5, incorrect=7).values  # d: the final embedding
            want = _rows(d, block, spec.n_heads, want[: len(d.labels)])
            assert_close(_queries(got, real), _queries(want, real), dtype, "logits")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_streamed_reductions_equal_the_materialised_stack(arch):
    _check_streamed(cached_model(arch))


def test_norm_based_attention_without_value_bias_is_the_pre_ln_term_norm():
    model = cached_model("gpt2")  # pre-LN, nothing after the heads: the term at the output
    cache = _cache(model)
    want = td.source_norms(cache, 1, layer=2, attention_mask=MASK)
    got = td.norm_based_attention(cache, 1, attention_mask=MASK, value_bias=False)
    assert_close(got, want, torch.float64)
    with_bias = td.norm_based_attention(cache, 1, attention_mask=MASK)
    assert (with_bias - got).abs().max() > 1e-3  # gpt2's b_V is not zero


def test_refuses_when_hook_z_is_not_pattern_times_values():
    model = cached_model("gpt2")
    cache = dict(_cache(model).items())
    v = td.model_spec(model).blocks[0].v
    cache[v] = cache[v] + 0.1  # as if the heads computed their output from something else
    recipe = td.DecompositionRecipe.for_model(model, granularity="source")
    with pytest.raises(NotImplementedError, match="key position"):
        recipe.decompose(cache, 1)
    with pytest.raises(NotImplementedError, match="key position"):
        td.norm_based_attention(cache, 0, model=model)


def test_input_checks():
    model = cached_model("gpt2")
    names = td.model_spec(model).names_filter(attention=True)  # no hook_z
    _, cache = model.run_with_cache(TOKENS, attention_mask=MASK, names_filter=names)
    with pytest.raises(ValueError, match="source_names_filter"):
        td.norm_based_attention(cache, 0)
    cache = _cache(model)
    with pytest.raises(ValueError, match="before block"):
        td.source_shares(cache, 1, layer=1)
    with pytest.raises(ValueError, match="out of range"):
        td.norm_based_attention(cache, 3)
    with pytest.raises(ValueError, match="attention_mask"):
        td.norm_based_attention(cache, 0, attention_mask=MASK[:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        td.norm_based_attention(cache, 0, chunk_size=0)
    with pytest.raises(NotImplementedError, match="a head lies"):
        td.source_logit_attribution(_cache(cached_model("bert")), 0, 5)


@pytest.mark.skipif(KINDS[-1] != "bridge", reason="the zoo is TransformerLens 4.x's")
@pytest.mark.parametrize("family", SAMPLE)
def test_zoo_sample(family):
    """GQA (llama, mistral), sliding windows (mistral, gemma2), post-sublayer norms (gemma2,
    olmo2), parallel blocks (gptj, gpt_neox), b_V (gpt2, bert), a residual multiplier
    (granite): exact, and streamed == materialised."""
    from support import zoo

    model = zoo.boot(family, zoo.dtype_for(family))
    assert _check_sums_to_heads(model, zoo.dtype_for(family)) <= 1e-12
    _check_streamed(model, zoo.dtype_for(family))


@pytest.mark.skipif(KINDS[-1] != "bridge", reason="the zoo is TransformerLens 4.x's")
@pytest.mark.parametrize("family", ["bitnet", "laguna"])
def test_heads_that_are_not_pattern_times_values_are_refused(family):
    """BitNet normalises the heads' outputs before W_O, Laguna gates them: hook_z is not
    pattern @ hook_v, so no split by key position can be exact. Per head is still exact."""
    from support import zoo

    model = zoo.boot(family, zoo.dtype_for(family))
    with pytest.raises(NotImplementedError, match="by key position"):
        td.decompose(model, TOKENS, attention_mask=MASK, granularity="source")
    with pytest.raises(NotImplementedError, match="by key position"):
        td.norm_based_attention(_cache(model), 0, attention_mask=MASK)
    td.decompose(model, TOKENS, attention_mask=MASK, granularity="head")
