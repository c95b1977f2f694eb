"""Sliding-window attention (docs/method.md §6): each row is projected onto exactly the keys
it sees.

Tiny random Mistral bridges (every layer windowed; window 6 <= d_head 8, so a window is a
wide problem, and window 12 > d_head, a tall one) and a GPT-Neo bridge (global, then local
with window 4 > d_head 3), all float64, against one SVD per example, head and row over that
row's keys, and by the invariants.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import transformers
from support.models import KINDS

from tl_decomp import (
    adapters,
    attention_correlation,
    attention_null_space,
    effective_attention,
    model_spec,
    special_token_attention,
)
from tl_decomp.models import tiny_tokenizer

AGREE = 1e-6  # against the reference (float64)
SIZES = dict(vocab_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def _mistral(window: int):
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            sliding_window=window,
            pad_token_id=0,
            **SIZES,
        )
    )


def _gpt_neo():
    return transformers.GPTNeoForCausalLM(
        transformers.GPTNeoConfig(
            hidden_size=24,
            num_layers=2,
            num_heads=8,  # d_head 3 < window: the local layer's windows are tall
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            intermediate_size=48,
            pad_token_id=0,
            **SIZES,
        )
    )


MODELS = {"mistral-6": lambda: _mistral(6), "mistral-12": lambda: _mistral(12), "neo": _gpt_neo}


@pytest.fixture(scope="session")
def boot(tmp_path_factory):
    """``boot(name)``: a float64 bridge of ``MODELS[name]``, booted once per session
    (read-only)."""
    from transformer_lens.model_bridge import TransformerBridge

    booted = {}

    def get(name):
        if name not in booted:
            path = str(tmp_path_factory.mktemp(name))
            torch.manual_seed(0)
            MODELS[name]().save_pretrained(path)
            tiny_tokenizer(False, path).save_pretrained(path)
            model = TransformerBridge.boot_transformers(path, device="cpu", dtype=torch.float64)
            booted[name] = model.eval()
        return booted[name]

    return get


def run(model, lengths, n, *, vocab=(3, 64), seed=0):
    """A right-padded batch of random ids from `vocab` (a narrow one repeats tokens, so
    layer 0 repeats value vectors)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(*vocab, (len(lengths), n), generator=gen)
    mask = (torch.arange(n) < torch.tensor(lengths)[:, None]).long()
    names = model_spec(model).names_filter(attention=True)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    return cache, mask


def visible(window, mask):
    """``[batch query key]``: key j visible to query i (both valid, ``i - window < j <= i``)."""
    n = mask.shape[-1]
    back = torch.arange(n)[:, None] - torch.arange(n)
    valid = mask.bool()
    return valid[:, :, None] & valid[:, None, :] & (back >= 0) & (back < (window or n))


def head_values(model, cache, layer):
    """T = V W_O per example and head: ``[batch head pos d_model]``."""
    spec = model_spec(model)
    blk = spec.blocks[layer]
    v = cache[blk.v].double()[:, :, list(spec.kv_head)]
    return torch.einsum("bphd,hdm->bhpm", v, blk.W_O.double())


def reference(model, cache, layer, mask, *, rtol=None):
    """One SVD of T per example, head and query row, over exactly the keys that row sees."""
    a = cache[model_spec(model).blocks[layer].pattern].double()
    T = head_values(model, cache, layer)
    see = visible(model_spec(model).blocks[layer].window, mask)
    out = torch.zeros_like(a)
    B, H, n, _ = a.shape
    for b, h, i in itertools.product(range(B), range(H), range(n)):
        keys = see[b, i].nonzero()[:, 0]
        if len(keys):
            w, s, _ = torch.linalg.svd(T[b, h, keys], full_matrices=False)
            tol = torch.finfo(s.dtype).eps * max(T.shape[-1], len(keys)) if rtol is None else rtol
            w = w[:, s > tol * s[0]]
            out[b, h, i, keys] = a[b, h, i, keys] @ w @ w.T
    return out


def row_ranks(model, cache, layer, mask):
    """``[batch head query]``: rank of T over the keys each row sees, and their count."""
    T = head_values(model, cache, layer)
    see = visible(model_spec(model).blocks[layer].window, mask)
    rank = torch.zeros(T.shape[:3], dtype=torch.long)
    for b, h, i in itertools.product(*map(range, rank.shape)):
        if see[b, i].any():
            rank[b, h, i] = torch.linalg.matrix_rank(T[b, h, see[b, i]])
    return rank, see.sum(-1)[:, None].expand_as(rank)


# name, lengths, width: longer than twice the window, right padding shorter than the window
# (padding a whole window makes Hugging Face's attention NaN: `test_padding_past_the_window`)
CASES = [("mistral-6", (20, 17, 15), 20), ("mistral-12", (40, 31, 29), 40), ("neo", (20, 17), 20)]


def test_windows_derived(boot):
    assert [b.window for b in model_spec(boot("mistral-6")).blocks] == [6, 6]
    assert [b.window for b in model_spec(boot("neo")).blocks] == [None, 4]


@pytest.mark.parametrize("vocab", [(3, 64), (3, 8)], ids=["distinct", "repeated"])
@pytest.mark.parametrize("name,lengths,n", CASES, ids=[c[0] for c in CASES])
def test_matches_one_svd_per_row(boot, name, lengths, n, vocab):
    model = boot(name)
    cache, mask = run(model, lengths, n, vocab=vocab)
    moved = 0.0
    for layer in range(2):
        got = effective_attention(cache, layer, attention_mask=mask)
        want = reference(model, cache, layer, mask)
        assert (got - want).abs().max() <= AGREE, f"layer {layer}"
        see = visible(model_spec(model).blocks[layer].window, mask)[:, None].expand_as(got)
        moved = max(moved, (got - cache["pattern", layer].double().where(see, 0.0)).abs().max())
    # Windows of 6 <= d_head keys are identifiable unless a token repeats in one (layer 0).
    assert moved > 1e-3 or (name, vocab) == ("mistral-6", (3, 64))


def test_float32(boot):
    model = boot("mistral-12")
    cache, mask = run(model, (40, 31, 29), 40, vocab=(3, 10))
    for layer in range(2):
        want = effective_attention(cache, layer, attention_mask=mask)
        low = effective_attention(cache, layer, attention_mask=mask, dtype=torch.float32)
        assert low.dtype == torch.float32 and (low - want).abs().max() <= 1e-3


def test_repeated_token_inside_the_window(boot):
    """Query 8 (window 6: keys 3..8) where key 4 repeats key 0's token, so at layer 0 both
    have one value vector: key 0 must get nothing, key 4 its share of the projection."""
    model = boot("mistral-6")
    tokens = torch.arange(3, 23)[None]
    tokens[0, 4] = tokens[0, 0]
    tokens[0, 7] = tokens[0, 5]  # one repeat inside the window, so the projection moves weight
    names = model_spec(model).names_filter(attention=True)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    got = effective_attention(cache, 0)
    assert got[0, :, 8, :3].eq(0).all() and got[0, :, 8, 9:].eq(0).all()
    mask = torch.ones_like(tokens)
    assert (got - reference(model, cache, 0, mask)).abs().max() <= AGREE
    assert (got[0, :, 8] - cache["pattern", 0][0, :, 8]).abs().max() > 1e-3


@pytest.mark.parametrize("name,lengths,n", CASES, ids=[c[0] for c in CASES])
def test_invariants(boot, name, lengths, n):
    model = boot(name)
    spec = model_spec(model)
    cache, mask = run(model, lengths, n, vocab=(3, 10))
    projected = 0
    for layer in range(2):
        a = cache["pattern", layer].double()
        eff = effective_attention(cache, layer, attention_mask=mask)
        see = visible(spec.blocks[layer].window, mask)[:, None].expand_as(eff)
        T = head_values(model, cache, layer)
        assert eff[~see].abs().max() == 0  # outside the window, padding, the future
        assert ((eff - a.where(see, 0.0)) @ T).abs().max() <= 1e-9  # each row's output kept
        blk = spec.blocks[layer]
        again = {blk.pattern: eff, blk.v: cache[blk.v]}
        twice = effective_attention(again, layer, model=model, attention_mask=mask)
        assert (twice - eff).abs().max() <= 1e-10
        rank, keys = row_ranks(model, cache, layer, mask)
        exact = (rank == keys)[..., None].expand_as(eff)
        assert torch.equal(eff[exact], a.where(see, 0.0)[exact])
        projected += int((rank < keys).sum())
    assert projected  # some row had a null space to remove (layer 0: repeated tokens)


@pytest.mark.parametrize(
    "kind", ["rank-3", "noise-1e-17", "noise-1e-7", "spread", "repeated", "user-rtol", "holes"]
)
def test_hard_values(boot, kind):
    """Synthetic values through the 12-key windows (tall: 12 > d_head): exactly and nearly
    rank deficient, a spectrum over six decades (the per-row SVD), duplicated keys, and a
    mask with left padding and holes (windows with few valid keys)."""
    model = boot("mistral-12")
    spec = model_spec(model)
    gen = torch.Generator().manual_seed(5)
    B, n, d = 2, 40, spec.d_head
    basis = 3 if kind.startswith(("rank", "noise")) else d
    v = torch.randn(B, n, spec.n_kv_heads, basis, generator=gen, dtype=torch.float64)
    v = v @ torch.randn(basis, d, generator=gen, dtype=torch.float64)
    if kind.startswith("noise"):
        v = v + float(kind[6:]) * torch.randn(v.shape, generator=gen, dtype=torch.float64)
    if kind in ("spread", "user-rtol"):
        v = v * torch.logspace(0, -6, d, dtype=torch.float64)
    if kind == "repeated":
        v = v[:, torch.randint(0, 9, (n,), generator=gen)]
    mask = torch.ones(B, n, dtype=torch.long)
    if kind == "holes":
        mask = (torch.rand(B, n, generator=gen) > 0.4).long()
        mask[1, :15] = 0
    scores = 3 * torch.randn(B, spec.n_heads, n, n, generator=gen, dtype=torch.float64)
    pattern = scores.masked_fill(~visible(12, mask)[:, None], -torch.inf).softmax(-1)
    cache = {spec.blocks[0].pattern: pattern.nan_to_num(), spec.blocks[0].v: v}
    rtol = 1e-4 if kind == "user-rtol" else None
    got = effective_attention(cache, 0, model=model, rtol=rtol, attention_mask=mask)
    assert (got - reference(model, cache, 0, mask, rtol=rtol)).abs().max() <= AGREE


def test_null_space(boot):
    """Rank and null space of the keys the last query sees: its window, not the example."""
    model = boot("mistral-12")
    cache, mask = run(model, (40, 31, 29), 40)
    ns = attention_null_space(cache, attention_mask=mask)
    assert ns.n_keys.tolist() == [40, 31, 29]
    assert ns.rank.eq(8).all() and ns.null_dim.eq(12 - 8).all()
    for layer in range(2):
        see = visible(12, mask)[:, None].expand_as(cache["pattern", layer])
        a = cache["pattern", layer].double().where(see, 0.0)
        diff = (a - reference(model, cache, layer, mask)).flatten(2).norm(dim=-1)
        rel = diff / a.flatten(2).norm(dim=-1)
        assert (ns.relative_norm[layer] - rel).abs().max() <= AGREE
    short = attention_null_space(cache, attention_mask=mask * (torch.arange(40) < 5))
    assert short.rank.eq(5).all() and short.null_dim.eq(0).all()  # the last query sees 5 keys


def test_corpus_analyses(boot):
    """Pearson r runs over the entries inside each row's window."""
    model = boot("mistral-6")
    texts = ["the cat sat", "the big cat is on a mat and the dog sat on the mat , a dog ran ."]
    corr = attention_correlation(model, texts)
    assert torch.allclose(corr.r[0], torch.ones_like(corr.r[0]))  # 4 keys <= d_head
    tokens, mask = adapters.tokenize(model, texts[1:], encoder=False)
    names = model_spec(model).names_filter(attention=True)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    see = visible(6, mask)[0]
    for layer, h in itertools.product(range(2), range(4)):
        a = cache["pattern", layer].double()[0, h][see]
        eff = effective_attention(cache, layer)[0, h][see]
        assert torch.isclose(corr.r[1, layer, h], torch.corrcoef(torch.stack([a, eff]))[0, 1])
    st = special_token_attention(model, texts)
    assert torch.allclose(st.raw.sum(-1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize(
    "window,says",
    [(4, "sees keys the spec did not derive"), (None, "fewer keys"), (8, "fewer keys")],
)
def test_wrong_window_raises(boot, monkeypatch, window, says):
    """A spec whose window disagrees with the model's is an error, not a wrong number."""
    model = boot("mistral-6")
    cache, mask = run(model, (20, 15), 20)
    spec = model_spec(model)
    blocks = tuple(dataclasses.replace(b, window=window) for b in spec.blocks)
    monkeypatch.setattr(adapters, "model_spec", lambda m: dataclasses.replace(spec, blocks=blocks))
    with pytest.raises(ValueError, match=rf"block 0: .*query \d+ of example 0.*{says}"):
        effective_attention(cache, 0, attention_mask=mask)


def test_padding_past_the_window(boot):
    """Right padding of a whole window: the model's own attention is NaN (a padded query
    sees no valid key), which the check names; the corpus loop never batches so."""
    model = boot("mistral-6")
    cache, mask = run(model, (20, 9), 20)
    effective_attention(cache, 0, attention_mask=mask)  # only padded queries are NaN here
    with pytest.raises(
        ValueError, match=r"blocks\.1\.attn\.hook_pattern contains NaN \(query 0 of example 1"
    ):
        effective_attention(cache, 1, attention_mask=mask)
    texts = ["a", "the big cat is on a mat and the dog sat on the mat , a dog ran ."]
    assert not attention_correlation(model, texts).r[1].isnan().any()


@pytest.mark.skipif("hooked" not in KINDS, reason="HookedTransformer: TransformerLens 3.x only")
def test_hooked_transformer_local_attention():
    """`HookedTransformerConfig` local layers (``attn_types`` + ``window_size``)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=24,
        n_heads=8,
        d_head=3,
        d_mlp=48,
        n_ctx=64,
        d_vocab=64,
        act_fn="gelu_new",
        normalization_type="LN",
        attn_types=["global", "local"],
        window_size=4,
        use_local_attn=True,
        dtype=torch.float64,
        seed=0,
    )
    model = HookedTransformer(cfg)
    assert [b.window for b in model_spec(model).blocks] == [None, 4]
    tokens = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(6))
    names = model_spec(model).names_filter(attention=True)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    mask = torch.ones_like(tokens)
    for layer in range(2):
        got = effective_attention(cache, layer)
        assert (got - reference(model, cache, layer, mask)).abs().max() <= AGREE
