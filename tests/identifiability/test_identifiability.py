"""Token identifiability (docs/method.md §7): on constructed states where the answer is known,
on tiny models, and on bad input."""

from __future__ import annotations

import random

import pytest
import torch
from support.helpers import NoHooksLeft
from support.models import KINDS, cached_model

from tl_decomp import model_spec
from tl_decomp.identifiability import (
    LinearFit,
    StateBatch,
    Vocab,
    identifiability_from_states,
    token_identifiability,
)

_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", ".", ",", "is", "big"]


def _corpus(n: int = 30, seed: int = 0) -> list[str]:
    """Sentences in the tiny models' vocabulary (no [UNK]: every token is distinct data)."""
    rng = random.Random(seed)
    words = _WORDS + [f"w{i}" for i in range(30)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(n)]


def _batches(table, make_states, n_ids=None, n_seq=40, length=8, seed=0, batch=8):
    """Sequences of random ids; ``e0 = table[id]``; ``states = make_states(tokens)``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_seq, batch):
        tokens = torch.randint(n_ids or len(table), (batch, length), generator=gen)
        mask = torch.ones_like(tokens)
        mask[0, length // 2 :] = 0  # one padded sequence per batch
        e0 = table[tokens]
        out.append(
            StateBatch(
                tokens,
                mask,
                e0,
                make_states(tokens),
                torch.zeros_like(e0),
                torch.arange(start, start + batch),
            )
        )
    return out


def _table(n=50, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_linear_map_recovers_tokens_through_an_invertible_linear_layer():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(16, 16, generator=gen, dtype=torch.float64)  # invertible, far from identity
    b = 5 * torch.randn(16, generator=gen, dtype=torch.float64)
    table = _table()

    def states(tokens):
        return torch.stack([table[tokens], table[tokens] @ A + b])

    kw = dict(layers=[0, 1], distance="l2")
    lin = identifiability_from_states(
        _batches(table, states), _batches(table, states, seed=1), mapping="linear", **kw
    )
    naive = identifiability_from_states([], _batches(table, states, seed=1), mapping="naive", **kw)
    assert lin.rates.tolist() == [1.0, 1.0]
    assert naive.rate(0) == 1.0 and naive.rate(1) < 0.5
    W = lin.maps[1].weight.T  # the fitted map inverts the layer
    assert torch.allclose(W, torch.linalg.inv(A), atol=1e-8)


def test_linear_fit_is_least_squares_on_rank_deficient_badly_scaled_states():
    """Real hidden states are rank-deficient with outlier dimensions (MiniLM's last layer:
    condition ~1e22). The streamed fit must give pinv's predictions, batch split or not."""
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    B[:, 0] *= 1e3  # an outlier dimension
    C = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    Z, Z_new = torch.randn(700, 6, generator=gen, dtype=torch.float64).split([600, 100])
    X, Y, X_new = (Z @ B + 7).float(), (Z @ C - 2).float(), (Z_new @ B + 7).float()
    rows = torch.cat([X.double() - X[:100].double().mean(0), torch.ones(600, 1)], 1)
    rtol = max(rows.shape) * torch.finfo(torch.float32).eps
    W = torch.linalg.pinv(rows, rtol=rtol) @ Y.double()  # brute force: one SVD of all rows
    want = (X_new.double() - X[:100].double().mean(0)) @ W[:-1] + W[-1]
    for size in (100, 600):
        fit = LinearFit()
        for xb, yb in zip(X.split(size), Y.split(size), strict=True):
            fit.add(xb, yb)
        got = fit.fit()(X_new).double()
        assert (got - want).abs().max() / want.abs().max() < 1e-4
        assert (got - (Z_new @ C - 2)).abs().max() < 1e-3  # and recovers the true relation


def _scaled_noisy(seed: int, n: int = 3000, d: int = 12):
    """Targets with norms spread over two orders of magnitude, states = a linear layer of them
    plus isotropic noise: least squares fits the large targets, the cosine loss all alike."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = y * torch.exp(1.5 * torch.randn(n, 1, generator=gen, dtype=torch.float64))
    x = y @ A + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, y


def test_linear_map_trains_under_the_cosine_loss():
    from tl_decomp.identifiability._maps import map_loss, train_map

    x, y = _scaled_noisy(0)
    xv, yv = _scaled_noisy(1, n=500)
    xt, yt = _scaled_noisy(2, n=2000)
    lsq = LinearFit()
    lsq.add(x, y)
    g_lsq = lsq.fit()
    g_cos = train_map(x, y, xv, yv, "linear", "cosine", seed=0)
    assert isinstance(g_cos, torch.nn.Linear)
    # brute-force reference: full-batch L-BFGS on the cosine loss from the same start
    ref = torch.nn.Linear(12, 12, dtype=torch.float64)
    ref.load_state_dict(g_lsq.state_dict())
    ref.requires_grad_(True)
    opt = torch.optim.LBFGS(ref.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        out = map_loss(ref(x), y, "cosine")
        out.backward()
        return out

    opt.step(closure)
    with torch.no_grad():
        got, start, best = (map_loss(g(xt), yt, "cosine").item() for g in (g_cos, g_lsq, ref))
    assert best < start * 0.9  # the two losses disagree here: the cosine optimum is elsewhere
    assert got < start and (got - best) < 0.25 * (start - best), (got, start, best)
    # under "mse" the trained map stays at the least-squares optimum it starts from
    g_mse = train_map(x, y, xv, yv, "linear", "mse", seed=0)
    with torch.no_grad():
        assert map_loss(g_mse(xt), yt, "mse") <= map_loss(g_lsq(xt), yt, "mse") * (1 + 1e-6)


def test_the_maps_loss_is_named_in_the_result():
    table = _table(n=40, d=16)

    def states(tokens):
        return torch.stack([table[tokens], torch.tanh(table[tokens] @ table[:16].T)])

    kw = dict(layers=[0, 1], distance="cosine")
    train = _batches(table, states, n_seq=120)
    test = _batches(table, states, seed=1)
    default = identifiability_from_states(train, test, mapping="linear", **kw)
    cosine = identifiability_from_states(train, test, mapping="linear", loss="cosine", **kw)
    mlp = identifiability_from_states(train, test, mapping="mlp", **kw)
    naive = identifiability_from_states([], test, mapping="naive", **kw)
    assert (default.loss, cosine.loss, mlp.loss, naive.loss) == ("mse", "cosine", "cosine", None)
    assert [r["map"] for r in (default, cosine, mlp, naive) for r in r.rows()[:1]] == [
        "linear/mse", "linear/cosine", "mlp/cosine", "naive"
    ]  # fmt: skip
    assert "linear/cosine" in str(cosine) and "loss='cosine'" in repr(cosine)
    assert cosine.parameters == default.parameters == 17 * 16 and naive.parameters == 0
    assert default.train_tokens == sum(int(b.mask.sum()) for b in train)
    with pytest.raises(ValueError, match="naive.*loss does not apply"):
        identifiability_from_states([], test, mapping="naive", loss="mse", **kw)
    with pytest.raises((ValueError, TypeError), match="loss"):  # TypeError: beartype on
        identifiability_from_states(train, test, mapping="linear", loss="l1", **kw)


def test_small_training_sample_warns_and_is_flagged():
    table = _table(n=40, d=16)  # the linear map: 17 x 16 = 272 parameters, 85 tokens needed

    def states(tokens):
        return torch.stack([table[tokens], table[tokens] @ table[:16].T])

    test = _batches(table, states, seed=1)
    with pytest.warns(UserWarning, match=r"fitted on 60 training tokens.*at least 85"):
        small = identifiability_from_states(
            _batches(table, states, n_seq=8), test, [0, 1], mapping="linear"
        )
    assert small.small_sample and small.train_tokens == 60
    assert "small sample" in str(small)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough = identifiability_from_states(
            _batches(table, states, n_seq=24), test, [0, 1], mapping="linear"
        )  # 180 tokens
        naive = identifiability_from_states([], test, [0, 1], mapping="naive")
    assert not enough.small_sample and "small sample" not in str(enough)
    assert not naive.small_sample
    # the MLP has twice the parameters: 170 tokens
    with pytest.warns(UserWarning, match="the mlp map has 544 parameters"):
        identifiability_from_states(_batches(table, states, n_seq=16), test, [0, 1], mapping="mlp")


def test_cosine_ignores_scale_l2_does_not():
    table = _table()
    gen = torch.Generator().manual_seed(2)
    scales = torch.exp(2 * torch.randn(len(table), 1, generator=gen, dtype=torch.float64))

    def states(tokens):  # each token's vector rescaled by its own factor: direction kept
        return torch.stack([table[tokens], table[tokens] * scales[tokens]])

    test = _batches(table, states, seed=3)
    cos = identifiability_from_states([], test, [0, 1], mapping="naive", distance="cosine")
    l2 = identifiability_from_states([], test, [0, 1], mapping="naive", distance="l2")
    assert cos.rates.tolist() == [1.0, 1.0]
    assert l2.rate(0) == 1.0 and l2.rate(1) < 0.9


def test_sequence_lookup_vs_vocabulary_lookup():
    gen = torch.Generator().manual_seed(4)
    base = _table(25)
    decoys = base + 0.05 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
    table = torch.cat([base, decoys])  # ids 25..49: a near twin of each of the first 25

    def states(tokens):  # noise larger than the gap to the twin, smaller than to the rest
        noise = 0.2 * torch.randn(table[tokens].shape, generator=gen, dtype=torch.float64)
        return torch.stack([table[tokens], table[tokens] + noise])

    test = _batches(table, states, n_ids=25, seed=6)
    seq = identifiability_from_states([], test, [0, 1], mapping="naive", distance="l2")
    voc = identifiability_from_states(
        [], test, [0, 1], mapping="naive", distance="l2", vocab=Vocab(table)
    )
    assert seq.rates.tolist() == [1.0, 1.0]
    assert voc.rate(0) == 1.0 and voc.rate(1) < 0.9
    assert voc.lookup == "vocab"


@pytest.mark.parametrize("norm", ["LN", "RMS", "none"])
def test_vocab_scores_match_materialised_candidates(norm):
    gen = torch.Generator().manual_seed(7)
    W, q, r = (
        torch.randn(s, generator=gen, dtype=torch.float64) for s in ((30, 8), (5, 8), (5, 8))
    )
    w, b = (
        1 + 0.3 * torch.randn(8, generator=gen, dtype=torch.float64),
        torch.randn(8, dtype=torch.float64),
    )
    vocab = Vocab(W, norm, None if norm == "none" else w, None if norm != "LN" else b, 1e-5)
    z = W[None] + r[:, None]  # [token vocab d]
    if norm == "LN":
        z = z - z.mean(-1, keepdim=True)
    c = z / (z.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w if norm != "none" else z
    c = c + (b if norm == "LN" else 0)
    cos = torch.nn.functional.cosine_similarity(q[:, None], c, dim=-1)
    assert torch.allclose(vocab.scores(q, r, "cosine") / q.norm(dim=-1, keepdim=True), cos)
    l2 = -(q[:, None] - c).pow(2).sum(-1) + q.pow(2).sum(-1, keepdim=True)
    assert torch.allclose(vocab.scores(q, r, "l2"), l2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_naive_layer0_is_perfect(arch, kind):
    model = cached_model(arch, kind, torch.float64)
    corpus = _corpus(15)
    with NoHooksLeft(model):
        for distance in ("cosine", "l2"):
            for lookup in ("sequence", "vocab"):
                res = token_identifiability(
                    model,
                    corpus,
                    mapping="naive",
                    distance=distance,
                    lookup=lookup,
                    layers=[0, 3],
                    progress=False,
                )
                assert res.rate(0) == 1.0, (distance, lookup)


def test_result_bookkeeping_split_and_cross_layer():
    model = cached_model("gpt2", "bridge", torch.float64)
    corpus = _corpus(20)
    res = token_identifiability(model, corpus, cross_layer=True, progress=False, seed=3)
    assert sorted(res.train + res.test) == list(range(20)) and len(res.test) == 4
    assert res.layers == (0, 1, 2, 3) and len(res.maps) == 4
    n_tokens = sum(len(corpus[i].split()) + 1 for i in res.test)  # + BOS
    assert res.correct.shape == (4, n_tokens) == (4, len(res.token_ids))
    assert torch.allclose(res.rates, res.correct.double().mean(1))
    assert set(res.sequences.tolist()) == set(res.test)
    assert torch.allclose(res.cross_layer().diagonal(), res.rates)
    assert res.rate(0) == 1.0  # the linear map on layer 0 is the identity
    same = token_identifiability(model, corpus, progress=False, seed=3, batch_size=3)
    assert torch.equal(same.correct, res.correct)  # batching changes nothing
    with pytest.raises(ValueError, match="cross_layer=True"):
        same.cross_layer()


def test_linear_beats_naive_on_a_tiny_decoder():
    model = cached_model("gpt2", "bridge", torch.float64)
    lin = token_identifiability(model, _corpus(40), mapping="linear", progress=False)
    naive = token_identifiability(model, _corpus(40), mapping="naive", progress=False)
    assert (lin.rates >= naive.rates).all() and lin.rate(3) > naive.rate(3)


def test_mlp_map():
    model = cached_model("bert", "bridge", torch.float32)
    res = token_identifiability(model, _corpus(30), mapping="mlp", layers=[0, 1], progress=False)
    assert res.rate(0) >= 0.95 and res.rate(1) >= 0.9
    assert isinstance(res.maps[0], torch.nn.Sequential)


def test_bad_input_raises_clearly():
    model = cached_model("bert", "bridge", torch.float64)
    with pytest.raises(ValueError, match="empty"):
        token_identifiability(model, [], progress=False)
    with pytest.raises(ValueError, match="too short for the split"):
        token_identifiability(model, ["the cat sat"], progress=False)
    with pytest.raises(ValueError, match="too short for the split"):
        token_identifiability(model, _corpus(5), mapping="mlp", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        token_identifiability(model, _corpus(5), layers=[0, 4], progress=False)
    with pytest.raises((ValueError, TypeError), match="mapping"):  # TypeError: beartype on
        token_identifiability(model, _corpus(5), mapping="ridge", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="test_fraction"):
        token_identifiability(model, _corpus(5), test_fraction=1.0, progress=False)
    assert model_spec(model).n_layers == 3


@pytest.mark.bundled
def test_minilm_linear_identifiability():
    from tl_decomp import load_corpus, load_model

    model = load_model("minilm")
    res = token_identifiability(model, load_corpus(60), layers=[0, 6], progress=False)
    assert res.rate(0) == 1.0
    assert 0.5 < res.rate(6) <= 1.0


@pytest.mark.bundled
def test_minilm_linear_map_is_the_least_squares_fit():
    """MiniLM's post-LN states are rank-deficient (condition ~1e22); ``lstsq`` on the normal
    equations missed the least-squares optimum there by 80% in residual. The map must reach
    pinv's residual."""
    from tqdm import tqdm

    from tl_decomp import load_corpus, load_model
    from tl_decomp.identifiability import fit_maps, gather_states

    model = load_model("minilm")
    corpus = load_corpus(60)
    batches = list(
        gather_states(model, model_spec(model), corpus, range(60), [6], 16, False, tqdm())
    )
    (g,), n_train = fit_maps(batches, 1, "linear", "mse", 0, 0)
    assert n_train == sum(int(b.mask.sum()) for b in batches)
    X = torch.cat([b.states[0][b.mask.bool()] for b in batches]).double()
    Y = torch.cat([b.e0[b.mask.bool()] for b in batches]).double()
    rows = torch.cat([X, torch.ones_like(X[:, :1])], 1)
    W = torch.linalg.pinv(rows, rtol=rows.shape[1] * torch.finfo(torch.float32).eps) @ Y
    best = (rows @ W - Y).pow(2).mean()
    got = (g(X.float()).double() - Y).pow(2).mean()
    assert abs(got / best - 1) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_states_are_fitted_in_float32(dtype):
    """A least-squares fit in bf16 (tolerance eps(bf16) * d) kept no direction: rates ~0.1."""
    half, full = cached_model("gpt2", dtype=dtype), cached_model("gpt2", dtype=torch.float32)
    corpus = _corpus()
    for mapping in ("linear", "mlp"):
        with pytest.warns(UserWarning, match="float32"):
            res = token_identifiability(half, corpus, mapping=mapping, progress=False)
        ref = token_identifiability(full, corpus, mapping=mapping, progress=False)
        if mapping == "linear":
            assert res.maps[-1].weight.dtype == torch.float32
        assert (res.rates - ref.rates).abs().max() < 0.05


def test_mlp_map_trains_on_a_uniform_sample_of_tokens():
    # The training split arrives sorted by length; keeping the first tokens trained the MLP
    # map on the shortest sentences only. The sample must be uniform over the stream.
    from tl_decomp.identifiability import StoredPairs

    stored = StoredPairs(cap=200, seed=0)
    for start in range(0, 5000, 50):  # 100 "sequences" of 50 tokens, values = token index
        ids = torch.arange(start, start + 50, dtype=torch.float64)
        x = ids[None, :, None].expand(2, 50, 3)  # [layer pos d]
        stored.add(x[:, None], ids[None, :, None].expand(1, 50, 3), torch.ones(1, 50))
    x, y = stored.train.pairs()
    assert x.shape == (2, 200, 3) and torch.equal(x[0], y)
    kept = y[:, 0]
    assert len(set(kept.tolist())) == 200  # no token twice
    # Uniform over 0..4999 (the validation tokens excluded): mean ~2500, both halves used.
    assert 2000 < kept.mean().item() < 3000 and (kept > 2500).sum() > 60
    assert stored.val.pairs()[1].shape[0] == 20


def test_match_by_token_id_or_by_position():
    # A repeated token with identical layer-0 vectors: its nearest neighbour ties, and the
    # first occurrence wins. By id that is a hit; by position, a miss for the second one.
    from tl_decomp.identifiability import StateBatch

    e0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]], dtype=torch.float64)
    batch = StateBatch(
        tokens=torch.tensor([[5, 6, 5, 7]]), mask=torch.ones(1, 4, dtype=torch.long),
        e0=e0, states=e0[None],
    )  # fmt: skip
    by_id = identifiability_from_states([], [batch], [0], mapping="naive")
    by_pos = identifiability_from_states([], [batch], [0], mapping="naive", match="position")
    assert by_id.rate(0) == 1.0 and by_id.match == "token"
    assert by_pos.rate(0) == 0.75 and by_pos.match == "position"
    assert by_pos.correct[0].tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="lookup='sequence'"):
        token_identifiability(cached_model("bert"), ["a b", "c d"], lookup="vocab",
                              match="position", progress=False)  # fmt: skip
