"""Statistics against brute-force references."""

from __future__ import annotations

import pytest
import torch
from support.helpers import assert_close
from support.models import cached_model

from tl_decomp import (
    adapters,
    anisotropy,
    compare_checkpoints,
    corpus_statistics,
    decompose,
    decompose_layers,
    ff_linearity,
    model_spec,
)

TEXTS = [
    "the cat sat on the mat .",
    "a dog ran",
    "the big cat is on a mat and the dog sat",
    "a cat",
    "the dog is big .",
]


@pytest.mark.parametrize("granularity", ["coarse", "layer"])
def test_streaming_moments_match_one_batch(granularity):
    model = cached_model("bert")
    streamed = corpus_statistics(
        model, TEXTS, batch_size=2, granularity=granularity, progress=False
    )
    ds = decompose_layers(model, TEXTS, granularity=granularity)
    assert streamed.layers == tuple(d.layer for d in ds)
    for r, d in enumerate(ds):
        values = d.shares()[:, d.mask()]
        cols = [streamed.labels.index(label) for label in d.labels]
        assert_close(streamed.mean[r, cols], values.mean(1), torch.float64, "mean")
        assert_close(streamed.std[r, cols], values.std(1), torch.float64, "std")
    assert streamed.n_tokens == int(ds[0].mask().sum())
    assert "±" in streamed.table()


def test_shares_of_a_decoder_include_the_final_embedding():
    s = corpus_statistics(cached_model("llama"), TEXTS, progress=False, statistic="cosines")
    assert s.layers == (0, 1, 2, 3, "final")
    assert s.max_relative_error < 1e-6


def test_anisotropy_matches_pairwise_cosines():
    d = decompose(cached_model("gpt2"), TEXTS)
    vecs = d.factors[:, d.mask()]
    for k in range(4):
        cos = torch.nn.functional.cosine_similarity(vecs[k][:, None], vecs[k][None], dim=-1)
        n = cos.shape[0]
        brute = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
        assert abs(anisotropy(d)[k].item() - brute.item()) < 1e-10


def test_ff_linearity_matches_least_squares_on_held_out_sentences():
    model = cached_model("gpt2")
    texts = [
        " ".join(["the", "cat", "dog", "sat", "mat", "a", "big"][i % 7 :] + ["ran"] * (i % 3))
        for i in range(30)
    ]
    result = ff_linearity(model, texts, batch_size=8, progress=False, ridge=0.0)
    spec = model_spec(model)
    held = set(result.held_out)
    assert 0 < len(held) < len(texts)
    tokens, mask = adapters.tokenize(model, texts, encoder=False)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    test = torch.tensor([i in held for i in range(len(texts))])[:, None] & mask.bool()
    train = ~torch.tensor([i in held for i in range(len(texts))])[:, None] & mask.bool()
    for L, blk in enumerate(spec.blocks):
        x, y = cache[blk.mlp_in].double(), cache[blk.mlp_out].double()
        xt = torch.cat([x[train], torch.ones(int(train.sum()), 1, dtype=x.dtype)], 1)
        w = torch.linalg.lstsq(xt, y[train]).solution
        xs = torch.cat([x[test], torch.ones(int(test.sum()), 1, dtype=x.dtype)], 1)
        resid = y[test] - xs @ w
        r2 = 1 - resid.pow(2).sum() / (y[test] - y[test].mean(0)).pow(2).sum()
        assert abs(result.r2[L].item() - r2.item()) < 1e-6, L


def test_compare_checkpoints_is_the_difference_and_checks_shapes():
    a, b = cached_model("bert"), cached_model("bert", processed=True)
    c = compare_checkpoints(a, b, TEXTS, progress=False)
    sa = corpus_statistics(a, TEXTS, progress=False)
    assert_close(c.a.mean, sa.mean, torch.float64)
    assert_close(c.delta, c.b.mean - c.a.mean, torch.float64)
    assert "Δi" in c.table()
    with pytest.raises(ValueError, match="differ"):
        compare_checkpoints(a, cached_model("gpt2"), TEXTS, progress=False)


def test_bad_corpus_inputs():
    model = cached_model("gpt2")
    with pytest.raises(ValueError, match="texts is an empty list"):
        corpus_statistics(model, [], progress=False)
    with pytest.raises(TypeError, match="a list of texts, not one str|typechecking"):
        corpus_statistics(model, "the cat", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two texts"):
        ff_linearity(model, ["the cat"], progress=False)


def test_ff_linearity_paper_protocol_is_the_mean_per_dimension_r2_in_sample():
    # bert-splat's learn_ff_lmap.py: both sides standardised, least squares on every token,
    # each output dimension's R², averaged. Brute force: one regression per dimension.
    from sklearn.linear_model import LinearRegression
    from sklearn.preprocessing import StandardScaler

    model = cached_model("gpt2", "bridge", torch.float64)
    gen = torch.Generator().manual_seed(0)
    words = ["the", "cat", "dog", "sat", "mat", "a", "big", "ran", "on", "is"]
    texts = [
        " ".join(words[int(i)] for i in torch.randint(10, (int(n),), generator=gen))
        for n in torch.randint(4, 12, (40,), generator=gen)
    ]
    result = ff_linearity(model, texts, protocol="paper", batch_size=8, progress=False)
    assert result.protocol == "paper" and result.held_out == () and result.n_test == result.n_train
    tokens, mask = adapters.tokenize(model, texts, encoder=False)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    for L, blk in enumerate(model_spec(model).blocks):
        x = StandardScaler().fit_transform(cache[blk.mlp_in][mask.bool()].double().numpy())
        y = StandardScaler().fit_transform(cache[blk.mlp_out][mask.bool()].double().numpy())
        per_dim = [LinearRegression().fit(x, y[:, j]).score(x, y[:, j]) for j in range(y.shape[1])]
        assert abs(result.r2[L].item() - sum(per_dim) / len(per_dim)) < 1e-8
    pooled = ff_linearity(model, texts, batch_size=8, progress=False)
    assert pooled.protocol == "heldout" and pooled.held_out
    with pytest.raises((ValueError, TypeError), match="protocol"):  # ours or the type checker
        ff_linearity(model, texts, protocol="authors", progress=False)  # type: ignore[arg-type]


def test_ff_linearity_curve_is_the_statistic_on_each_prefix():
    # One pass gives the R² on the first k texts: the same number a separate call on them gives.
    model = cached_model("gpt2", "bridge", torch.float64)
    gen = torch.Generator().manual_seed(1)
    words = ["the", "cat", "dog", "sat", "mat", "a", "big", "ran", "on", "is", "red", "old"]
    texts = [
        " ".join(words[int(i)] for i in torch.randint(12, (int(n),), generator=gen))
        for n in torch.randint(4, 12, (120,), generator=gen)
    ]
    for protocol in ("paper", "heldout"):
        r = ff_linearity(model, texts, protocol=protocol, sizes=(50, 90, 120), batch_size=8,
                         progress=False)  # fmt: skip
        assert r.sizes == (50, 90, 120) and r.curve is not None and r.curve.shape == (3, 3)
        assert torch.equal(r.curve[-1], r.r2) and r.curve_tokens[-1] == r.n_train
        assert r.rows()[0][f"r2 @ {r.curve_tokens[0]}"] == r.curve[0, 0].item()
    curve = ff_linearity(model, texts, protocol="paper", sizes=(50, 90), progress=False).curve
    assert curve is not None
    for k, row in zip((50, 90), curve, strict=True):
        alone = ff_linearity(model, texts[:k], protocol="paper", batch_size=7, progress=False)
        assert torch.allclose(row, alone.r2, atol=1e-9, rtol=0), (k, row - alone.r2)
    with pytest.raises(ValueError, match="increase"):
        ff_linearity(model, texts, protocol="paper", sizes=(90, 50), progress=False)
    with pytest.raises(ValueError, match="sizes\\[0\\] must be"):
        ff_linearity(model, texts, protocol="paper", sizes=(121,), progress=False)
    with pytest.raises(ValueError, match="held-out"):  # seed 0 holds none of the first text out
        held = ff_linearity(model, texts, progress=False).held_out
        ff_linearity(model, texts, sizes=(min(held),), progress=False)


def test_the_quoted_ff_linearity_numbers_are_demo_01s_with_their_token_counts():
    # One source for the R² the docs quote: demo 01's printed curve (each with its tokens).
    import json
    import re
    from pathlib import Path

    import tl_decomp.decomposition._linearity as linearity

    root = Path(__file__).parents[2]
    cells = json.loads((root / "demos/01_decompose.ipynb").read_text())["cells"]
    out = next(
        "".join(o.get("text", ""))
        for c in cells
        for o in c.get("outputs", [])
        if "FF linearity, paper protocol" in "".join(o.get("text", ""))
    )
    curve = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s+\d\.\d{3}\s", line)]
    tokens, r2 = [int(r[0]) for r in curve], [r[1:] for r in curve]
    limit = re.search(r"∞ \(fit of a \+ b/n\)\s+(.*)", out)[1].split()  # type: ignore[index]
    pooled = re.search(r"pooled R² on (\d+) held-out tokens \(fit on \d+\): \[(.*)\]", out)
    assert len(tokens) == 4 and len(limit) == 6 and pooled
    held_tokens, pooled_r2 = pooled[1], [f"{float(v):.2f}" for v in pooled[2].split(",")]
    reproducing = (root / "docs/reproducing.md").read_text()
    method = (root / "docs/method.md").read_text()
    docs = (linearity.FFLinearity, linearity.ff_linearity)
    quotes = {
        "reproducing": (reproducing, [
            f"at {tokens[-1]} tokens (500 sentences): {'/'.join(r2[-1])}",
            f"(`a + b/n`): {'/'.join(limit)}",
            f"block 0 at {'/'.join(map(str, tokens))} tokens: {'/'.join(r[0] for r in r2)}",
            f"{'/'.join(pooled_r2)} ({held_tokens} tokens)",
        ]),
        "method": (" ".join(method.split()), [
            f"{pooled_r2[0]} pooled, held out, on {held_tokens} tokens, against {r2[-1][0]} "
            f"per dimension, in-sample, on {tokens[-1]} tokens",
            f"{' / '.join(r[0] for r in r2)} at {' / '.join(map(str, tokens))} tokens",
            f"to {limit[0]} at large samples",
        ]),
        "docstrings": (" ".join(" ".join((f.__doc__ or "").split()) for f in docs), [
            f"{' / '.join(r[0] for r in r2[1:])} at {' / '.join(map(str, tokens[1:]))} tokens",
            f"{pooled_r2[0]} pooled, held out, on {held_tokens} tokens; {r2[-1][0]} per "
            f"dimension, in-sample, on {tokens[-1]}",
        ]),
    }  # fmt: skip
    for where, (text, wanted) in quotes.items():
        for quote in wanted:
            assert quote in text, (where, quote)
