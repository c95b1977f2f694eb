"""Token-wise decomposition (`granularity="token"`): exact at every layer, equal to an
independent propagation written here from Hugging Face's own weights, and the properties a
split by input token must have (causality, one token, logit attribution, reductions)."""

from __future__ import annotations

import pytest
import torch
from support import zoo
from support.helpers import NoHooksLeft, assert_close
from support.models import KINDS, cached_model, skip_broken

import tl_decomp as td

TEXTS = ["the cat sat on the mat", "a dog ran"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_factors_sum_to_every_state(model_case, dtype):
    arch, kind, processed = model_case
    skip_broken(arch, kind, processed, dtype)
    model = cached_model(arch, kind, dtype, processed)
    with NoHooksLeft(model):
        ds = td.decompose_layers(model, TEXTS, granularity="token")
    spec = td.model_spec(model)
    for d in ds:
        n = d.tokens.shape[1]
        assert d.labels == (*(f"pos{k}" for k in range(n)), "bias")
        assert d.factors.shape == (n + 1, 2, n, spec.d_model)
        real = d.mask()[..., None]
        if d.meta["recipe"].rounded(d.layer):  # HF's RMSNorm rounds to float32 in any dtype
            err = (d.factors.sum(0) - d.target).mul(real).abs().max()
            assert err <= spec.tolerance(dtype, True) * d.target.abs().max()
        else:
            assert_close(d.factors.sum(0) * real, d.target * real, dtype, f"layer {d.layer}")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox", "qwen2"])
def test_causal_models_get_nothing_from_later_tokens(arch):
    d = td.decompose(cached_model(arch), TEXTS, granularity="token", layer=-1)
    n = d.tokens.shape[1]
    for k in range(1, n):
        assert d.factors[k, :, :k].abs().max() == 0  # exactly, not to rounding


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_one_token_is_that_token_plus_bias(arch):
    model = cached_model(arch)
    ids = torch.tensor([[7]])
    for d in td.decompose_layers(model, ids, granularity="token"):
        assert d.labels == ("pos0", "bias")
        assert d.relative_error <= td.model_spec(model).tolerance(torch.float64, True)
        # with nothing else to attend to, a token's share is its state less F(0)
        assert d.factors[0].abs().max() > 0


def test_token_logit_attribution_and_lens_sum_to_the_logit():
    model = cached_model("gpt2")
    ds = td.decompose_layers(model, TEXTS, granularity="token")
    for d in ds:
        la = d.logit_attrs("mat", "dog")
        assert la.labels[-1] == "bias" and len(la.labels) == d.tokens.shape[1] + 1
        assert (la.values.sum(0) - la.logits).abs().max() < 1e-12
    d = ds[-1]
    logits = model(d.tokens, attention_mask=d.attention_mask)
    mat, dog = (
        model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("mat", "dog")
    )
    own = (logits[..., mat] - logits[..., dog]) * d.mask()
    assert torch.allclose(d.logit_attrs("mat", "dog").logits * d.mask(), own, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fast_token_logits_equal_the_stack_bias_included(arch):
    """One backward pass gives each token's logit; the bias row, what they leave of the
    logit, equals ``F(0)``'s logit from the materialised split (pos + 1 frozen runs)."""
    model = cached_model(arch)
    fast = td.token_logit_attribution(model, TEXTS, "mat", "dog")
    d = td.decompose(model, TEXTS, granularity="token")
    last = d.mask().long().cumsum(1).argmax(1)
    want = d.logit_attrs("mat", "dog").values[:, torch.arange(len(TEXTS)), last]
    assert torch.allclose(fast.values[:, :, 0], want, rtol=0, atol=1e-10)


def test_a_freeze_that_misses_a_nonlinearity_is_caught(monkeypatch):
    """The frozen network must be affine: norms left live (their scale recomputed from the
    injected input, not held at the full input's) break that, and the once-per-model probe
    refuses by name."""
    from tl_decomp.decomposition import _tokens

    model = td.tiny_model("gpt2", dtype=torch.float64)  # its own model: the check is cached
    live = lambda full, V, b, t, *, hook: t  # noqa: E731
    monkeypatch.setattr(_tokens, "_fixed", live)
    with pytest.raises(NotImplementedError, match="not affine"):
        td.token_logit_attribution(model, TEXTS, "mat")


@pytest.mark.parametrize("statistic", ["shares", "norm_ratios", "cosines", ("logit", "mat")])
def test_streamed_token_statistics_equal_the_stack(statistic):
    model = cached_model("gpt2")
    ds = td.decompose_layers(model, TEXTS, granularity="token")
    rs = td.decompose_layers(model, TEXTS, granularity="token", reduce=statistic)
    for d, r in zip(ds, rs, strict=True):
        want = d.logit_attrs("mat").values if r.statistic == "logit" else getattr(d, statistic)()
        assert r.labels == d.labels
        assert torch.allclose(r.values * d.mask(), want * d.mask(), atol=1e-12)


def test_distributed_bias_keeps_the_sum():
    model = cached_model("llama")
    sep = td.decompose(model, TEXTS, granularity="token", layer=2)
    dist = td.decompose(model, TEXTS, granularity="token", layer=2, bias="distribute")
    assert dist.factors[-1].abs().max() == 0
    assert torch.allclose(dist.factors.sum(0), sep.factors.sum(0), atol=1e-12)
    # each token gains bias in proportion to |<t_k, e>|: a token with no share gains none
    n = sep.tokens.shape[1]
    for k in range(1, n):
        assert dist.factors[k, :, :k].abs().max() == 0


def test_bad_token_options_fail_before_any_work():
    model = cached_model("gpt2")
    with NoHooksLeft(model), pytest.raises((ValueError, TypeError), match="bias"):
        td.decompose(model, "the cat", granularity="token", bias="spread")
    with pytest.raises(ValueError, match="granularity='token'"):
        td.decompose(model, "the cat", bias="distribute")
    with pytest.raises(ValueError, match="no i, h, f, c"):
        td.decompose(model, "the cat", granularity="token").coarse()


def test_a_cache_in_gives_the_same_token_factors():
    model = cached_model("llama")
    ids = td.decompose(model, "the cat sat", granularity="token").tokens
    _, cache = model.run_with_cache(
        ids, names_filter=td.decomposition_names_filter(model, granularity="token")
    )
    a = td.decompose(model, cache, granularity="token", layer=1)
    b = td.decompose(model, ids, granularity="token", layer=1)
    assert torch.allclose(a.factors, b.factors, atol=1e-12)


# -- an independent propagation, from Hugging Face's weights -----------------------------------
def _ln(x, X, w, b, eps, rms):
    """Norm of the full state `x` applied to each token row of `X` (last row: the biases)."""
    if rms:
        s = (x.square().mean(-1, keepdim=True) + eps).sqrt()
        out = X / s
    else:
        s = (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        out = (X - X.mean(-1, keepdim=True)) / s
    out = out * w
    if b is not None:
        out[-1] = out[-1] + b
    return out


def _gpt2_reference(hf, ids, A):
    """GPT-2 (LayerNorm, GELU, learned positions, every bias) propagated token by token."""
    t = hf.transformer
    n, d = ids.shape[1], hf.config.n_embd
    emb = t.wte(ids) + t.wpe(torch.arange(n))[None]
    X = torch.zeros(n + 1, 1, n, d, dtype=emb.dtype)
    X[torch.arange(n), 0, torch.arange(n)] = emb[0]
    H, eps = hf.config.n_head, hf.config.layer_norm_epsilon
    for L, blk in enumerate(t.h):
        x = X.sum(0)
        h = _ln(x, X, blk.ln_1.weight, blk.ln_1.bias, eps, False)
        W, bias = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # Conv1D: x @ W + b
        v = h @ W[:, 2 * d :]
        v[-1] = v[-1] + bias[2 * d :]
        v = v.reshape(n + 1, 1, n, H, d // H)
        z = torch.einsum("bhqk,tbkhe->tbqhe", A[L], v).reshape(n + 1, 1, n, d)
        out = z @ blk.attn.c_proj.weight
        out[-1] = out[-1] + blk.attn.c_proj.bias
        X = X + out
        x = X.sum(0)
        h = _ln(x, X, blk.ln_2.weight, blk.ln_2.bias, eps, False)
        zeta_full = h.sum(0) @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias
        theta = torch.where(zeta_full != 0, blk.mlp.act(zeta_full) / zeta_full, 0.0)
        zeta = h @ blk.mlp.c_fc.weight
        zeta[-1] = zeta[-1] + blk.mlp.c_fc.bias
        out = (theta * zeta) @ blk.mlp.c_proj.weight
        out[-1] = out[-1] + blk.mlp.c_proj.bias
        X = X + out
    return _ln(X.sum(0), X, t.ln_f.weight, t.ln_f.bias, eps, False)


def _llama_reference(hf, ids, A):
    """Llama (RMSNorm, SwiGLU, rotary, grouped-query attention, no biases)."""
    m, cfg = hf.model, hf.config
    n, d = ids.shape[1], cfg.hidden_size
    emb = m.embed_tokens(ids)
    X = torch.zeros(n + 1, 1, n, d, dtype=emb.dtype)
    X[torch.arange(n), 0, torch.arange(n)] = emb[0]
    H, KV, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    dh = d // H
    for L, blk in enumerate(m.layers):
        h = _ln(X.sum(0), X, blk.input_layernorm.weight, None, eps, True)
        v = blk.self_attn.v_proj(h).reshape(n + 1, 1, n, KV, dh).repeat_interleave(H // KV, 3)
        z = torch.einsum("bhqk,tbkhe->tbqhe", A[L], v).reshape(n + 1, 1, n, d)
        X = X + blk.self_attn.o_proj(z)
        h = _ln(X.sum(0), X, blk.post_attention_layernorm.weight, None, eps, True)
        gate = blk.mlp.act_fn(blk.mlp.gate_proj(h.sum(0)))  # from the full input
        X = X + blk.mlp.down_proj(gate * blk.mlp.up_proj(h))
    return _ln(X.sum(0), X, m.norm.weight, None, eps, True)


@pytest.mark.parametrize("arch,reference", [("gpt2", _gpt2_reference), ("llama", _llama_reference)])
def test_equal_to_an_independent_propagation(arch, reference):
    model = cached_model(arch)
    d = td.decompose(model, "the cat sat on the mat", granularity="token")
    # the pattern (one of the quantities the propagation holds at the full input's value),
    # as the model computed it; everything else from Hugging Face's modules and weights
    _, cache = model.run_with_cache(d.tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    A = [cache[f"blocks.{L}.attn.hook_pattern"] for L in range(model.cfg.n_layers)]
    with torch.no_grad():
        ref = reference(model.original_model.eval(), d.tokens, A)
    # float64 throughout; Llama's RMSNorm computes in float32 inside Hugging Face's model
    tol = 1e-9 if arch == "gpt2" else 1e-6
    scale = d.target.abs().max()
    assert (d.factors - ref).abs().max() <= tol * scale


# -- mixtures of experts: routing and each expert's gate held at the full input's values --------
MOE_SPLIT = {  # measured: the token split runs on these; every other MoE family refuses by name
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "granitemoe", "phimoe",
    "minimax_m2", "ernie4_5_moe", "glm4_moe",
}  # fmt: skip
MOE_FAMILIES = [f for f, fam in zoo.FAMILIES.items() if fam.moe]
PADDED = torch.tensor([[1, 5, 6, 7, 5, 8, 9, 10, 5, 11], [1, 5, 6, 7, 8, 9, 5, 0, 0, 0]])
PAD_MASK = (torch.arange(10) < torch.tensor([[10], [7]])).long()
bridge_only = pytest.mark.skipif(KINDS[-1] != "bridge", reason="the zoo boots TransformerBridge")


@bridge_only
@pytest.mark.parametrize("as_users_do", [False, True], ids=["eager", "grouped_mm"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_token_factors_sum_to_hugging_faces_states(family, as_users_do):
    # Hugging Face's grouped_mm refuses float64, so a user's boot runs float32
    dtype = torch.float32 if as_users_do else zoo.dtype_for(family)
    try:
        model = zoo.boot(family, dtype, as_users_do=as_users_do)
    except Exception as err:  # the bridge itself cannot boot it: nothing of ours to test
        pytest.skip(f"the bridge cannot boot {family}: {type(err).__name__}")
    if family not in MOE_SPLIT:
        with NoHooksLeft(model), pytest.raises(NotImplementedError):  # named
            td.decompose_layers(model, PADDED, attention_mask=PAD_MASK, granularity="token")
        return
    with NoHooksLeft(model):
        ds = td.decompose_layers(model, PADDED, attention_mask=PAD_MASK, granularity="token")
    hf = zoo.hf_reference(family, dtype)
    with torch.no_grad():
        states = hf(PADDED, attention_mask=PAD_MASK, output_hidden_states=True).hidden_states
    spec, real = td.model_spec(model), PAD_MASK.bool()[..., None]
    rounded = any(d.meta["recipe"].rounded(d.layer) for d in ds)
    # HF's RMSNorm computes in float32 whatever the dtype; LayerNorm models stay in float64
    tol = spec.tolerance(dtype, rounded) if dtype == torch.float32 or rounded else 1e-9
    for d in ds:
        i = spec.n_layers if d.layer == "final" else d.layer
        if d.layer == spec.n_layers and spec.final != d.site:
            continue
        total = d.factors.sum(0).masked_fill(~real, 0)
        ref = states[i].to(total).masked_fill(~real, 0)
        assert (total - ref).abs().max() <= tol * ref.abs().max(), f"layer {d.layer}"
    for k in range(1, PADDED.shape[1]):  # causal: exactly nothing from later tokens
        assert ds[-1].factors[k, :, :k].abs().max() == 0


def _affine(lin, X):
    """``lin`` applied to token rows with its bias only in the last (the biases') row."""
    out = X @ lin.weight.T
    if lin.bias is not None:
        out[-1] = out[-1] + lin.bias
    return out


def _norm(mod, x, X):
    rms = not isinstance(mod, torch.nn.LayerNorm)
    eps = mod.eps if hasattr(mod, "eps") else mod.variance_epsilon
    return _ln(x, X, mod.weight, getattr(mod, "bias", None), eps, rms)


def _moe(moe, h_full, H):
    """A mixture of experts token by token: Hugging Face's router on the full input; each
    chosen expert's own weights, its gate act(W_g x) from the full input times its
    up-projection of one token's share, weighted by the full input's router weight."""
    router = moe.gate if hasattr(moe, "gate") else moe.router
    _, w, idx = router(h_full)  # [pos top_k]
    ex = moe.experts
    d_mlp = ex.down_proj.shape[-1]
    W = ex.gate_up_proj[idx]  # [pos top_k 2I d_model]
    gate = ex.act_fn(torch.einsum("pkid,pd->pki", W[:, :, :d_mlp], h_full))
    up = torch.einsum("pkid,tpd->tpki", W[:, :, d_mlp:], H)
    out = torch.einsum("pkdi,tpki,pk->tpd", ex.down_proj[idx], gate * up, w.to(H))
    shared = getattr(moe, "shared_expert", None)
    if shared is not None:
        g = shared.act_fn(shared.gate_proj(h_full))
        s = shared.down_proj(g * shared.up_proj(H))
        out = out + torch.sigmoid(moe.shared_expert_gate(h_full)) * s
    return out


def _moe_reference(hf, ids, A):
    """A pre-norm mixture-of-experts decoder (Mixtral, Qwen2-MoE, PhiMoE) propagated token
    by token from Hugging Face's modules."""
    m, cfg = hf.model, hf.config
    n, d = ids.shape[1], cfg.hidden_size
    X = torch.zeros(n + 1, 1, n, d, dtype=torch.float64)
    X[torch.arange(n), 0, torch.arange(n)] = m.embed_tokens(ids)[0]
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or d // H
    for L, blk in enumerate(m.layers):
        h = _norm(blk.input_layernorm, X.sum(0), X)
        v = _affine(blk.self_attn.v_proj, h).reshape(n + 1, 1, n, KV, dh)
        z = torch.einsum("bhqk,tbkhe->tbqhe", A[L], v.repeat_interleave(H // KV, 3))
        X = X + _affine(blk.self_attn.o_proj, z.reshape(n + 1, 1, n, H * dh))
        h = _norm(blk.post_attention_layernorm, X.sum(0), X)
        X = X + _moe(blk.mlp, h.sum(0)[0], h[:, 0])[:, None]
    return _norm(m.norm, X.sum(0), X)


@bridge_only
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "phimoe"])
def test_moe_equal_to_an_independent_propagation(family):
    model = zoo.boot(family)  # float64 (eager experts: grouped_mm refuses float64)
    ids = torch.tensor([[1, 5, 6, 7, 5, 8, 9, 10]])
    d = td.decompose(model, ids, granularity="token")
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    A = [cache[f"blocks.{L}.attn.hook_pattern"] for L in range(model.cfg.n_layers)]
    with torch.no_grad():
        ref = _moe_reference(zoo.hf_reference(family), ids, A)
    # float64 throughout; RMSNorm computes in float32 inside Hugging Face's model
    tol = 1e-9 if family == "phimoe" else 1e-6
    assert (d.factors - ref).abs().max() <= tol * d.target.abs().max()


@bridge_only
def test_moe_token_logit_attribution_sums_to_the_logit():
    model = zoo.boot("qwen2_moe", torch.float32, as_users_do=True)  # grouped_mm, shared expert
    ids = torch.tensor([[1, 5, 6, 7, 5, 8, 9, 10]])
    with NoHooksLeft(model):
        la = td.token_logit_attribution(model, ids, 3)
    logit = model(ids)[0, -1, 3]
    assert abs(la.values.sum() - logit) <= 1e-5 * abs(logit)
