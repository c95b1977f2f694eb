"""Effective attention (docs/method.md §6): against one SVD per row, and by its invariants."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch
from support.helpers import NoHooksLeft
from support.models import KINDS, cached_model

from tl_decomp import (
    attention_correlation,
    attention_null_space,
    effective_attention,
    effective_attention_layers,
    model_spec,
    special_token_attention,
)

TL3 = version("transformer-lens").startswith("3.")
AGREE = 1e-6  # the bar against the reference; measured ~1e-10 on these models
CASES = [(arch, kind) for kind in KINDS for arch in ("gpt2", "llama", "bert", "qwen2")]
D_HEAD = 8  # tiny models


def reference(model, cache, layer, mask, *, value_bias=True, preserve_row_sums=False, rtol=None):
    """One float64 SVD of T per example, head and query row, over the keys that row sees."""
    spec = model_spec(model)
    blk = spec.blocks[layer]
    a, v = cache[blk.pattern].double(), cache[blk.v].double()
    B, H, n, _ = a.shape
    out = torch.zeros_like(a)
    for b in range(B):
        for h in range(H):
            vh = v[b, :, spec.kv_head[h]] if v.shape[2] != H else v[b, :, h]
            if not value_bias and blk.b_V is not None:
                vh = vh - blk.b_V[h].double()
            T = vh @ blk.W_O[h].double()
            if preserve_row_sums:
                T = torch.cat([T, torch.ones(n, 1, dtype=T.dtype)], 1)
            for i in range(n):  # bidirectional: every row sees the same keys, one SVD
                keys = [j for j in range(n) if mask[b, j] and (j <= i or not spec.causal)]
                if not mask[b, i] or not keys:
                    continue
                if spec.causal or i == min(j for j in range(n) if mask[b, j]):
                    W = column_basis(T[keys], rtol)
                out[b, h, i, keys] = a[b, h, i, keys] @ W @ W.T
    return out


def column_basis(T, rtol):
    w, s, _ = torch.linalg.svd(T, full_matrices=False)
    rtol = rtol if rtol is not None else torch.finfo(T.dtype).eps * max(T.shape)
    return w[:, s > rtol * s[0]]


def run(arch, kind="bridge", *, n=40, lengths=(40, 27, 5), seed=0, processed=False):
    """A right-padded batch of random token ids: one example past d_head, one shorter."""
    model = cached_model(arch, kind, processed=processed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(7, 60, (len(lengths), n), generator=gen)
    mask = (torch.arange(n) < torch.tensor(lengths)[:, None]).long()
    names = model_spec(model).names_filter(attention=True)
    kwargs = (
        {"one_zero_attention_mask": mask}
        if type(model).__name__ == "HookedEncoder"
        else {"attention_mask": mask}
    )
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=names, **kwargs)
    return model, cache, mask


def head_outputs(model, cache, layer, pattern, *, value_bias=True, ones=False):
    """``A T`` per head, T = V W_O (with a column of ones when `ones`)."""
    spec = model_spec(model)
    blk = spec.blocks[layer]
    v = cache[blk.v].double()
    v = v[:, :, list(spec.kv_head)] if v.shape[2] != spec.n_heads else v
    if not value_bias and blk.b_V is not None:
        v = v - blk.b_V.double()
    T = torch.einsum("bphd,hdm->bhpm", v, blk.W_O.double())
    if ones:
        T = torch.cat([T, torch.ones_like(T[..., :1])], -1)
    return pattern @ T


def fake_cache(model, v, *, seed=0, scale=3.0, mask=None):
    """Layer 0 of `model` with values `v` and a random softmax pattern (a plain dict)."""
    spec = model_spec(model)
    B, n = v.shape[:2]
    gen = torch.Generator().manual_seed(seed)
    scores = scale * torch.randn(B, spec.n_heads, n, n, generator=gen, dtype=torch.float64)
    hide = torch.zeros(B, 1, n, n, dtype=torch.bool)
    if spec.causal:
        hide |= torch.ones(n, n, dtype=torch.bool).triu(1)
    if mask is not None:
        hide |= ~mask.bool()[:, None, None, :]
    pattern = scores.masked_fill(hide, -torch.inf).softmax(-1).nan_to_num()
    return {spec.blocks[0].pattern: pattern, spec.blocks[0].v: v}


def values(model, n, gen, basis=None, B=2):
    spec = model_spec(model)
    basis = spec.d_head if basis is None else basis
    x = torch.randn(B, n, spec.n_kv_heads, basis, generator=gen, dtype=torch.float64)
    return x @ torch.randn(basis, spec.d_head, generator=gen, dtype=torch.float64)


# -- against the reference --------------------------------------------------------------------
OPTIONS = [(arch, kind, {}) for arch, kind in CASES] + [
    ("gpt2", "bridge", {"value_bias": False}),  # the models with b_V
    ("qwen2", "bridge", {"value_bias": False}),
    ("llama", "bridge", {"preserve_row_sums": True}),
    ("bert", "bridge", {"preserve_row_sums": True}),
]


@pytest.mark.parametrize(
    "arch,kind,options", OPTIONS, ids=[f"{k}-{a}-{'-'.join(o) or 'default'}" for a, k, o in OPTIONS]
)
def test_matches_one_svd_per_row(arch, kind, options):
    model, cache, mask = run(arch, kind)
    got = effective_attention(cache, 1, attention_mask=mask, **options)
    want = reference(model, cache, 1, mask, **options)
    assert (got - want).abs().max() <= AGREE


def test_processed_weights_and_float32():
    model, cache, mask = run("gpt2", processed=True)
    got = effective_attention(cache, 2, attention_mask=mask)
    assert (got - reference(model, cache, 2, mask)).abs().max() <= AGREE
    low = effective_attention(cache, 2, attention_mask=mask, dtype=torch.float32)
    assert low.dtype == torch.float32 and (low - got).abs().max() <= 1e-3


# -- invariants -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{k}-{a}" for a, k in CASES])
def test_invariants(arch, kind):
    model, cache, mask = run(arch, kind)
    spec = model_spec(model)
    valid = mask.bool()
    for L in range(spec.n_layers):
        a = cache[spec.blocks[L].pattern].double()
        eff = effective_attention(cache, L, attention_mask=mask)
        rows = valid[:, None, :, None]
        # The head's output is unchanged (on real queries; padded ones are zeroed).
        out = head_outputs(model, cache, L, a * valid[:, None, None, :])
        assert (head_outputs(model, cache, L, eff) - out * rows).abs().max() <= 1e-9
        # Masked keys, padded queries and future keys stay zero.
        allowed = rows & valid[:, None, None, :]
        if spec.causal:
            allowed = allowed & torch.ones(a.shape[-1], a.shape[-1], dtype=torch.bool).tril()
        assert eff[~allowed.expand_as(eff)].abs().max() == 0
        # Rows that see no more keys than d_head are A itself, where those keys' values are
        # independent (not in layer 0 of a rotary model: a repeated token repeats its value).
        seen = valid.cumsum(-1) if spec.causal else valid.sum(-1, keepdim=True).expand_as(mask)
        exact = (seen <= D_HEAD) & valid
        if L > 0 or spec.positional == "learned":
            assert torch.equal(eff.transpose(1, 2)[exact], a.transpose(1, 2)[exact])
        assert (eff - a * allowed).abs().amax((1, 2, 3))[mask.sum(-1) > D_HEAD].min() > 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_idempotent_and_row_sums(arch):
    model, cache, mask = run(arch)
    spec = model_spec(model)
    eff = effective_attention(cache, 0, attention_mask=mask)
    again = {spec.blocks[0].pattern: eff, spec.blocks[0].v: cache[spec.blocks[0].v]}
    twice = effective_attention(again, 0, model=model, attention_mask=mask)
    assert (twice - eff).abs().max() <= 1e-10
    sums = effective_attention(cache, 0, attention_mask=mask, preserve_row_sums=True).sum(-1)
    a = cache[spec.blocks[0].pattern].double() * mask[:, None, None, :]
    assert (sums - a.sum(-1) * mask[:, None, :]).abs().max() <= 1e-10  # 1 up to the model's
    out = head_outputs(model, cache, 0, cache[spec.blocks[0].pattern].double(), ones=True)
    kept = effective_attention(cache, 0, attention_mask=mask, preserve_row_sums=True)
    assert (
        (head_outputs(model, cache, 0, kept, ones=True) - out) * mask[:, None, :, None]
    ).abs().max() <= 1e-9


# -- rank decisions ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("noise,rank", [(0.0, 3), (1e-17, 3), (1e-7, D_HEAD)])
def test_near_rank_deficient(arch, noise, rank):
    """Rank 3 values plus noise below (1e-17) and above (1e-7) the default tolerance."""
    model = cached_model(arch)
    gen = torch.Generator().manual_seed(1)
    v = values(model, 50, gen, basis=3)
    v = v + noise * torch.randn(v.shape, generator=gen, dtype=torch.float64)
    cache, mask = fake_cache(model, v), torch.ones(2, 50, dtype=torch.long)
    got = effective_attention(cache, 0, model=model)
    assert (got - reference(model, cache, 0, mask)).abs().max() <= AGREE
    assert (attention_null_space(cache, [0], model=model).rank == rank).all()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_repeated_keys_and_ill_conditioned(arch):
    """Exact duplicates (one token twice, layer 0 of a rotary model), and a spectrum over
    six orders of magnitude, which sends rows to the per-row SVD."""
    model = cached_model(arch)
    gen = torch.Generator().manual_seed(2)
    few = values(model, 12, gen)
    repeated = few[:, torch.randint(0, 12, (50,), generator=gen)]
    spread = values(model, 50, gen) * torch.logspace(0, -6, D_HEAD, dtype=torch.float64)
    mask = torch.ones(2, 50, dtype=torch.long)
    for v in (repeated, spread):
        cache = fake_cache(model, v)
        got = effective_attention(cache, 0, model=model)
        assert (got - reference(model, cache, 0, mask)).abs().max() <= AGREE


def test_user_tolerance():
    model = cached_model("gpt2")
    gen = torch.Generator().manual_seed(3)
    v = values(model, 40, gen) * torch.logspace(0, -5, D_HEAD, dtype=torch.float64)
    cache, mask = fake_cache(model, v), torch.ones(2, 40, dtype=torch.long)
    for rtol in (1e-2, 1e-4):
        got = effective_attention(cache, 0, model=model, rtol=rtol)
        assert (got - reference(model, cache, 0, mask, rtol=rtol)).abs().max() <= AGREE


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_any_mask(arch):
    """Left padding and holes: each row projects onto its own valid keys."""
    model = cached_model(arch)
    gen = torch.Generator().manual_seed(4)
    mask = (torch.rand(2, 40, generator=gen) > 0.3).long()
    mask[1, :15] = 0
    cache = fake_cache(model, values(model, 40, gen), mask=mask)
    got = effective_attention(cache, 0, model=model, attention_mask=mask)
    assert (got - reference(model, cache, 0, mask)).abs().max() <= AGREE


# -- diagnostics, analyses, errors ------------------------------------------------------------
def test_null_space():
    model, cache, mask = run("bert")
    ns = attention_null_space(cache, attention_mask=mask)
    assert ns.blocks == (0, 1, 2) and ns.n_keys.tolist() == [40, 27, 5]
    assert ns.rank.tolist() == [[[8] * 4, [8] * 4, [5] * 4]] * 3
    assert ns.null_dim[:, 2].eq(0).all() and ns.null_dim[:, 0].eq(32).all()
    assert ns.relative_norm[:, 2].eq(0).all() and (ns.relative_norm[:, :2] > 0).all()
    assert len(ns.rows()) == 12 and set(ns.rows()[0]) == {
        "block",
        "head",
        "rank",
        "null_dim",
        "relative_norm",
    }


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_corpus_analyses(arch):
    model = cached_model(arch)
    texts = ["the cat sat", "the big cat is on a mat and the dog sat on the mat , a dog ran ."]
    with NoHooksLeft(model):
        corr = attention_correlation(model, texts, blocks=[0, -1])
        st = special_token_attention(model, texts, batch_size=1)
    assert corr.blocks == (0, 2) and corr.r.shape == (2, 2, 4)
    assert torch.allclose(corr.r[0], torch.ones(2, 4, dtype=torch.float64))
    assert (corr.r[1] < 1 - 1e-6).all() and corr.by_length((8,))[0]["median"] == pytest.approx(1)
    assert st.categories == (("BOS",) if arch == "gpt2" else ("[CLS]", "[SEP]")) + (
        "punctuation",
        "other",
    )
    assert torch.allclose(st.raw.sum(-1), torch.ones(3, dtype=torch.float64))
    assert st.tokens[-2] == 2 and len(st.rows()) == 3


def test_errors_name_the_fix():
    model, cache, mask = run("gpt2")
    spec = model_spec(model)
    with pytest.raises(ValueError, match=r"names_filter=tl_decomp.attention_names_filter\(model\)"):
        effective_attention({spec.blocks[0].pattern: cache[spec.blocks[0].pattern]}, 0, model=model)
    with pytest.raises(ValueError, match="pass model="):
        effective_attention(dict(cache.items()), 0)
    with pytest.raises(ValueError, match="looks padded"):
        effective_attention(cache, 0)
    with pytest.raises(ValueError, match="out of range"):
        effective_attention(cache, 3, attention_mask=mask)
    with pytest.raises(ValueError, match="shape"):
        effective_attention(cache, 0, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="another model"):
        effective_attention(cache, 0, model=cached_model("llama"), attention_mask=mask)


def test_layers_and_threads():
    model, cache, mask = run("llama")
    threads = torch.get_num_threads()
    stack = effective_attention_layers(cache, attention_mask=mask)
    assert torch.get_num_threads() == threads
    assert stack.shape == (3, 3, 4, 40, 40)
    assert torch.equal(stack[1], effective_attention(cache, 1, attention_mask=mask))


# -- bundled models ---------------------------------------------------------------------------
@pytest.mark.bundled
def test_minilm_identifiable_up_to_d_head():
    """MiniLM has d_head 32: at most 32 tokens, A_eff == A; past that, a null component."""
    from tl_decomp import load_model

    model = load_model("minilm")
    names = model_spec(model).names_filter(attention=True)
    sentence = "It is a truth universally acknowledged, that a single man in possession of a good "
    tokens = model.tokenizer(sentence * 4)["input_ids"]  # [CLS] ... [SEP], > 60 tokens
    for n in (32, 60):
        ids = torch.tensor([tokens[: n - 1] + tokens[-1:]])
        with torch.inference_mode():
            _, cache = model.run_with_cache(ids, names_filter=names)
        ns = attention_null_space(cache)
        if n == 32:
            assert ns.null_dim.eq(0).all() and ns.relative_norm.eq(0).all()
            assert torch.equal(effective_attention(cache, 3), cache["pattern", 3].double())
        else:
            assert ns.null_dim.eq(n - 32).all() and (ns.relative_norm > 1e-3).all()
