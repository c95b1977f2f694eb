"""The invariant (docs/method.md §1.4) and the behaviour of `decompose` on every tiny
architecture."""

from __future__ import annotations

import pytest
import torch
from support.helpers import RTOL, NoHooksLeft, assert_close
from support.models import TL3, cached_model, skip_broken

import tl_decomp as td
from tl_decomp import DecompositionRecipe, decompose, decompose_layers, model_spec

TEXTS = ["the cat sat on the mat .", "a dog ran", "the big cat is on a mat and the dog sat"]


def _tolerance(spec, d, dtype):
    # HF's LlamaRMSNorm casts its input to float32 even in a float64 model, so the model's
    # own ln_final output carries float32 rounding there; the sum matches exact RMSNorm.
    if (
        dtype == torch.float64
        and d.layer == "final"
        and spec.ln_final is not None
        and spec.ln_final.rms
        and spec.model_class == "TransformerBridge"
    ):
        return torch.float32
    return dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_invariant_every_layer_granularity_centering(model_case, dtype):
    arch, kind, processed = model_case
    skip_broken(arch, kind, processed, dtype)
    model = cached_model(arch, kind, dtype, processed)
    spec = model_spec(model)
    with NoHooksLeft(model):
        _check_all(model, spec, dtype)


def _check_all(model, spec, dtype):
    for granularity in ("coarse", "layer", "head"):
        for centering in ("correction", "terms"):
            ds = decompose_layers(
                model,
                TEXTS,
                granularity=granularity,
                centering=centering,
                split_input=granularity != "coarse",
                split_correction=granularity == "layer",
            )
            assert [d.layer for d in ds][: spec.n_layers + 1] == list(range(spec.n_layers + 1))
            for d in ds:
                what = f"{granularity}/{centering} layer {d.layer}"
                assert_close(d.factors.sum(0), d.target, _tolerance(spec, d, dtype), what)
                assert d.factors.shape[0] == len(d.labels) == len(d.kinds)
                assert d.max_abs_error <= RTOL[_tolerance(spec, d, dtype)] * d.target.abs().max()
                assert d.attention_mask is not None and d.attention_mask[1, -1] == 0  # padded


def test_labels_follow_transformer_lens():
    model = cached_model("gpt2")
    d = decompose(model, "the cat", granularity="head", split_input=True)
    assert d.labels[:2] == ("embed", "pos_embed")
    assert "L2H3" in d.labels and "2_mlp_out" in d.labels and d.labels[-1] == "bias"
    d = decompose(model, "the cat", granularity="layer", split_correction=True)
    assert d.labels == (
        "input",
        "0_attn_out",
        "0_mlp_out",
        "1_attn_out",
        "1_mlp_out",
        "2_attn_out",
        "2_mlp_out",
        "ln_center",
        "ln_bias",
        "attn_bias",
        "mlp_bias",
    )
    coarse = d.coarse()
    assert coarse.labels == ("i", "h", "f", "c")
    assert_close(coarse.factors.sum(0), d.factors.sum(0), torch.float64)


def test_terms_centering_keeps_only_biases_in_c():
    """After the last LayerNorm, g * P(x_k) / sigma: each term over g has zero mean."""
    model = cached_model("bert")
    ln = model_spec(model).blocks[-1].ln2
    a = decompose(model, TEXTS, granularity="layer", split_correction=True)
    b = decompose(model, TEXTS, granularity="layer", split_correction=True, centering="terms")
    assert "ln_center" in a.labels and "ln_center" not in b.labels
    non_c = torch.stack([f for f, k in zip(b.factors, b.kinds, strict=False) if k != "c"])
    assert (non_c / ln.w).mean(-1).abs().max() < 1e-12
    assert_close(b.factors.sum(0), a.factors.sum(0), torch.float64, "same sum")


def test_coarse_equals_head_grouped():
    model = cached_model("llama")
    head = decompose(model, TEXTS, granularity="head")
    coarse = decompose(model, TEXTS)
    assert_close(head.coarse().factors, coarse.factors, torch.float64)


def test_shares_sum_to_one_and_statistics_are_consistent():
    d = decompose(cached_model("bert"), TEXTS, layer=1)
    m = d.mask()
    shares = d.shares()
    assert torch.allclose(shares.sum(0)[m], torch.ones(int(m.sum()), dtype=shares.dtype))
    e = d.target
    t = d.factors[1]
    ref = (t * e).sum(-1) / (e * e).sum(-1)
    assert_close(shares[1], ref, torch.float64)
    cos = d.cosines()
    assert_close(cos[1], ref * e.norm(dim=-1) / t.norm(dim=-1), torch.float64)
    assert_close(d.norm_ratios()[1], t.norm(dim=-1) / e.norm(dim=-1), torch.float64)


def test_matches_full_resid_decomposition_on_pre_ln():
    """Head factors equal TransformerLens's per-head vectors once our bias split is undone."""
    model = cached_model("gpt2", "hooked" if TL3 else "bridge")
    spec = model_spec(model)
    recipe = DecompositionRecipe.for_model(model, granularity="head")
    tokens = model.to_tokens(["the cat sat on the mat"])
    _, cache = model.run_with_cache(tokens)
    ours = recipe.decompose(cache, layer=spec.n_layers)  # the same index as TransformerLens
    try:
        theirs, labels = cache.get_full_resid_decomposition(
            layer=spec.n_layers, expand_neurons=False, return_labels=True
        )
    except Exception as err:  # the bridge's cache may not implement it
        pytest.skip(f"get_full_resid_decomposition unavailable here: {err}")
    pattern_rows = {L: cache[spec.blocks[L].pattern].sum(-1) for L in range(spec.n_layers)}
    for k, label in enumerate(labels):
        if not label.startswith("L"):
            continue
        L, h = (int(x) for x in label[1:].split("H"))
        b_v = spec.blocks[L].b_V[h] @ spec.blocks[L].W_O[h]
        with_bias = ours.factors[ours.labels.index(label)] + pattern_rows[L][:, h, :, None] * b_v
        assert_close(with_bias, theirs[k], torch.float64, label)


def test_recipe_names_filter_caches_exactly_what_it_reads():
    model = cached_model("bert")
    recipe = DecompositionRecipe.for_model(model)
    _, cache = model.run_with_cache(model.to_tokens("the cat"), names_filter=recipe.names_filter)
    assert set(cache.keys()) >= set(recipe.hooks)
    d = recipe.decompose(cache)
    assert_close(d.factors.sum(0), d.target, torch.float64)


def test_missing_hooks_are_named_with_the_filter():
    model = cached_model("bert")
    recipe = DecompositionRecipe.for_model(model)
    _, cache = model.run_with_cache(
        model.to_tokens("the cat"), names_filter=lambda n: n.endswith("hook_pattern")
    )
    with pytest.raises(ValueError, match=r"td.decomposition_names_filter\(model\)") as err:
        recipe.decompose(cache)
    assert "hook_scale" in str(err.value) or "hook_out" in str(err.value)


def test_cache_from_another_model_is_rejected():
    a, b = cached_model("bert"), cached_model("bert", processed=True)
    _, cache = b.run_with_cache(b.to_tokens("the cat"))
    with pytest.raises(ValueError, match="another model"):
        DecompositionRecipe.for_model(a).decompose(cache)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("", "empty"),
        ([], "empty"),
        (["the cat", "  "], "empty"),
        (torch.zeros((1, 0), dtype=torch.long), "empty"),
        (torch.ones((1, 65), dtype=torch.long), "context"),
    ],
)
def test_bad_input_is_rejected_and_leaves_no_hook(bad, match):
    model = cached_model("gpt2")
    with NoHooksLeft(model), pytest.raises(ValueError, match=match):
        decompose(model, bad)


def test_bad_options_and_layers():
    model = cached_model("gpt2")
    with NoHooksLeft(model):
        # TypeError where runtime type checking (jaxtyping + beartype) is on, else ValueError.
        with pytest.raises((ValueError, TypeError), match="granularity"):
            decompose(model, "the cat", granularity="neuron")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="out of range"):
            decompose_layers(model, "the cat", layers=[7])


def test_nan_activations_are_reported():
    model = cached_model("gpt2")
    recipe = DecompositionRecipe.for_model(model)
    _, cache = model.run_with_cache(model.to_tokens("the cat"), names_filter=recipe.names_filter)
    cache.cache_dict[recipe.spec.blocks[1].z] = cache[recipe.spec.blocks[1].z] * float("nan")
    with pytest.raises(ValueError, match="NaN"):
        recipe.decompose(cache)


def test_half_precision_is_computed_in_float32():
    model = cached_model("gpt2", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="float32"):
        d = decompose(model, TEXTS)
    assert d.factors.dtype == torch.float32
    assert d.relative_error < 5e-2  # the bf16 model's own rounding


def test_token_ids_with_explicit_mask_match_text():
    model = cached_model("bert")
    from_text = decompose(model, TEXTS)
    ids = from_text.tokens
    from_ids = decompose(model, ids, attention_mask=from_text.attention_mask)
    assert_close(from_ids.factors, from_text.factors, torch.float64)
    with pytest.raises(ValueError, match="shape"):
        decompose(model, ids, attention_mask=from_text.attention_mask[:, :2])


def test_unsupported_feature_raises_naming_it():
    if not TL3:
        pytest.skip("HookedTransformer configs with these features need TransformerLens 3.x")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    small = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=8, d_vocab=10, act_fn="gelu")
    cfg = HookedTransformerConfig(**small, positional_embedding_type="alibi")
    with pytest.raises(NotImplementedError, match="alibi.*HookedTransformer"):
        model_spec(HookedTransformer(cfg))
    cfg = HookedTransformerConfig(
        **small, normalization_type="RMS", use_normalization_before_and_after=True
    )
    with pytest.raises(NotImplementedError, match="post-sublayer"):
        decompose(HookedTransformer(cfg), torch.tensor([[1, 2, 3]]))


def test_shapes_are_checked_at_runtime(request):
    """pyproject's --jaxtyping-packages makes every annotated shape a runtime check."""
    if not request.config.getoption("--jaxtyping-packages", default=None):
        pytest.skip("run without jaxtyping's import hook")
    from tl_decomp import Decomposition

    good = torch.zeros(2, 1, 3, 4)
    with pytest.raises(TypeError):  # target's d_model disagrees with factors'
        Decomposition(
            good, ("a", "b"), ("i", "c"), torch.zeros(1, 3, 5), "site", 0, None, None, 0.0
        )


def test_results_print_short():
    # A notebook's repr shows shapes, labels and the error, never a tensor's values.
    from tl_decomp import hidden_token_attribution, load_pos

    model = cached_model("bert", "bridge", torch.float64)
    d = decompose(model, TEXTS, granularity="head")
    text = repr(d)
    assert text.startswith("Decomposition(factors=[") and "float64" in text
    assert "tensor(" not in text and len(text) < 500 and "max_abs_error=" in text
    att = repr(hidden_token_attribution(model, TEXTS[1]))
    assert "tensor(" not in att and len(att) < 400
    words = repr(load_pos(150))
    assert "150 in all" in words and len(words) < 400


def test_a_cache_run_without_the_mask_it_is_given_is_refused():
    """BERT sees its padding when run without the mask: decomposing that cache under the
    mask would mix two runs (the shares of the short text were off by 0.11 on MiniLM)."""
    model = cached_model("bert")
    ids, mask = td.adapters.as_tokens(model, td.model_spec(model), ["the cat sat on", "a"], None)
    names = td.decomposition_names_filter(model)
    _, unmasked = model.run_with_cache(ids, names_filter=names)
    with NoHooksLeft(model), pytest.raises(ValueError, match="not run with this attention_mask"):
        td.decompose(model, unmasked, attention_mask=mask)
    _, masked = model.run_with_cache(ids, attention_mask=mask, names_filter=names)
    assert td.decompose(model, masked, attention_mask=mask).relative_error < 1e-9


def test_a_stack_that_cannot_fit_is_refused_before_any_forward_pass(monkeypatch):
    model = cached_model("gpt2")
    calls = []
    monkeypatch.setattr(td.adapters, "run_with_cache", lambda *a, **k: calls.append(a))
    for granularity in ("head", "source", "token"):
        with NoHooksLeft(model), pytest.raises(MemoryError, match=r"stack.*reduce="):
            decompose_layers(model, ["the cat sat"] * 4, granularity=granularity, max_memory=10**4)
    with pytest.raises(MemoryError, match="max_memory"):
        decompose(model, "the cat sat", max_memory=100)
    assert not calls  # refused before the model ran


def test_a_cache_without_its_batch_dim_reads_as_a_batch_of_one():
    model = cached_model("gpt2")
    ids = decompose(model, "the cat sat").tokens
    names = td.decomposition_names_filter(model)
    _, cache = model.run_with_cache(ids, names_filter=names, remove_batch_dim=True)
    d = decompose(model, cache, layer=2)
    assert d.factors.shape[1] == 1 and d.relative_error < 1e-9


@pytest.mark.parametrize("granularity", ["coarse", "head", "source"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_stop_at_layer_cache_serves_the_layers_it_holds(arch, granularity):
    model = cached_model(arch)
    tokens = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    _, cache = model.run_with_cache(tokens, attention_mask=mask, stop_at_layer=2)
    for layer in (0, 1, 2):
        got = decompose(model, cache, layer=layer, granularity=granularity, attention_mask=mask)
        ref = decompose(model, tokens, layer=layer, granularity=granularity, attention_mask=mask)
        assert got.labels == ref.labels
        assert_close(got.factors, ref.factors, torch.float64, f"layer {layer}")
    reduced = decompose_layers(
        model, cache, layers=[0, 2], attention_mask=mask, granularity=granularity, reduce="shares"
    )
    assert_close(reduced[-1].values, ref.shares(), torch.float64, "streamed")
    for bad in (3, "final"):
        with pytest.raises(ValueError, match=r"lacks .* serves layers 0\.\.2 .*stop_at_layer"):
            decompose(model, cache, layer=bad, granularity=granularity, attention_mask=mask)
    with pytest.raises(ValueError, match="serves layers 0..2"):
        decompose_layers(model, cache, attention_mask=mask)


def test_a_stop_at_layer_cache_is_refused_by_the_token_split_naming_hooks():
    model = cached_model("gpt2")
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 6]]), stop_at_layer=2)
    with pytest.raises(ValueError, match=r"lacks \d+ hook\(s\).*blocks\.2\."):
        decompose(model, cache, layer=1, granularity="token")


def test_a_zero_state_has_no_shares():
    """A state that is exactly zero: shares and norm ratios NaN (not a row of zeros that
    claims to sum to 1), streamed as materialised."""
    model = td.models.tiny_model("gpt2", dtype=torch.float64)
    with torch.no_grad():  # no embeddings: the layer-0 state is zero
        for name, p in model.named_parameters():
            if "wte" in name or "wpe" in name:
                p.zero_()
    d = decompose(model, "the cat", layer=0)
    assert float(d.target.abs().max()) == 0.0
    assert d.shares().isnan().all() and d.norm_ratios().isnan().all()
    r = decompose_layers(model, "the cat", layers=[0], reduce="shares")[0]
    assert r.values.isnan().all()
    real = decompose(cached_model("gpt2"), "the cat", layer=1)  # a non-zero state: unchanged
    assert_close(real.shares().sum(0), torch.ones(1, 3, dtype=torch.float64), torch.float64)


@pytest.mark.skipif(TL3, reason="the zoo is TransformerLens 4.x's")
def test_a_run_that_drops_the_causal_mask_is_refused_by_name():
    """openai-gpt on the bridge: under an attention mask the bridge drops the causal mask (a
    TransformerLens bug), so block 0's pattern weighs later keys; that run is not the model's
    and is refused by name, from text and from the user's own cache, leaving no hook."""
    from support import zoo

    model = zoo.boot("openai_gpt", zoo.dtype_for("openai_gpt"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with NoHooksLeft(model), pytest.raises(NotImplementedError, match="drops the causal mask"):
        decompose(model, ids, layer=1)
    _, cache = model.run_with_cache(ids, attention_mask=torch.ones_like(ids))
    assert cache["blocks.0.attn.hook_pattern"].triu(1).abs().max() > 0.01  # the leak is real
    with NoHooksLeft(model), pytest.raises(NotImplementedError, match="drops the causal mask"):
        decompose(model, cache, layer=1)
