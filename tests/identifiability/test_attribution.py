"""Hidden Token Attribution (docs/method.md §8): exact against brute-force autograd, estimate by its
statistics, rows summing to 1, causality, padding, hooks."""

from __future__ import annotations

import functools

import pytest
import torch
from support.helpers import NoHooksLeft
from support.models import KINDS, cached_model

import tl_decomp as td
from tl_decomp import adapters, model_spec
from tl_decomp.identifiability import AttributionResult, hidden_token_attribution

TEXTS = ["the cat sat on the mat .", "a dog ran", "the big cat is on a mat and the dog sat"]
CASES = [(arch, kind) for kind in KINDS for arch in ("gpt2", "bert", "llama")]


def _brute_force(model, text: str, layers: list[int], norm: str = "frobenius") -> torch.Tensor:
    """||d e_i^l / d x_j|| from torch.autograd.functional.jacobian (reverse mode): the
    Frobenius norm, or the spectral norm (largest singular value, by a full SVD)."""
    spec = model_spec(model)
    tokens, _ = adapters.tokenize(model, [text], encoder=not spec.causal)
    sites = [spec.layer0 if L == 0 else spec.blocks[L - 1].out for L in layers]
    got: dict = {}

    def keep(name, tensor, *, hook):
        got[name] = tensor

    mask = torch.ones_like(tokens)
    adapters.run_with_hooks(model, tokens, mask, [(spec.layer0, functools.partial(keep, "x"))])
    x0 = got["x"].detach().clone()

    def f(x):
        hooks = [(spec.layer0, lambda tensor, *, hook: x)]
        hooks += [(s, functools.partial(keep, s)) for s in sites]
        adapters.run_with_hooks(model, tokens, mask, hooks)
        return torch.stack([got[s] for s in sites])

    J = torch.autograd.functional.jacobian(f, x0, vectorize=True)  # [layer 1 i d 1 j d]
    blocks = J[:, 0, :, :, 0].permute(0, 1, 3, 2, 4)  # [layer i j d_out d_in]
    if norm == "spectral":
        return torch.linalg.svdvals(blocks)[..., 0]
    return blocks.pow(2).sum((-2, -1)).sqrt()


@pytest.mark.parametrize(("arch", "kind"), CASES, ids=[f"{k}-{a}" for a, k in CASES])
def test_exact_matches_autograd_jacobian(arch, kind):
    model = cached_model(arch, kind, torch.float64)
    layers = [0, 1, 2, 3]
    expected = _brute_force(model, "the cat sat on the mat", layers)
    with NoHooksLeft(model):
        res = hidden_token_attribution(model, "the cat sat on the mat", layers=layers)
    scale = expected.max()
    assert (res.norms[:, 0] - expected).abs().max() <= 1e-6 * scale
    want = expected / expected.sum(-1, keepdim=True)
    assert (res.contributions[:, 0] - want).abs().max() <= 1e-6
    # layer 0 is the input itself: each token is all its own
    assert torch.equal(res.contributions[0, 0], torch.eye(expected.shape[-1], dtype=torch.float64))


@pytest.mark.parametrize(("arch", "kind"), CASES, ids=[f"{k}-{a}" for a, k in CASES])
def test_spectral_matches_autograd_jacobian(arch, kind):
    model = cached_model(arch, kind, torch.float64)
    layers = [0, 1, 3]
    expected = _brute_force(model, "the cat sat on the mat", layers, norm="spectral")
    threads = torch.get_num_threads()
    with NoHooksLeft(model):
        res = hidden_token_attribution(
            model, "the cat sat on the mat", layers=layers, norm="spectral", chunk_size=20
        )  # chunks of 20 columns straddle key positions (d_model 32)
    assert torch.get_num_threads() == threads  # the eigenvalue batches' one thread, restored
    assert res.norm == "spectral" and res.rows()[0]["norm"] == "spectral"
    assert "norm='spectral'" in repr(res) and "spectral" in str(res)
    # the same tolerance as the Frobenius test: forward and reverse mode round differently
    assert (res.norms[:, 0] - expected).abs().max() <= 1e-6 * expected.max()
    want = expected / expected.sum(-1, keepdim=True)
    assert (res.contributions[:, 0] - want).abs().max() <= 1e-6
    frob = hidden_token_attribution(model, "the cat sat on the mat", layers=layers)
    assert frob.norm == "frobenius" and (res.norms <= frob.norms * (1 + 1e-12)).all()
    assert not torch.allclose(res.contributions[1:], frob.contributions[1:], atol=1e-3)


def test_spectral_refused_where_it_cannot_be_computed():
    model = cached_model("gpt2", "bridge", torch.float64)
    with pytest.raises(ValueError, match="norm='spectral' needs method='exact'"):
        hidden_token_attribution(model, "the cat", method="estimate", norm="spectral")
    with pytest.raises((ValueError, TypeError), match="norm"):
        hidden_token_attribution(model, "the cat", norm="nuclear")  # type: ignore[arg-type]


def test_spectral_memory_is_checked_before_any_work(monkeypatch):
    model = cached_model("gpt2", "bridge", torch.float64)
    monkeypatch.setattr("tl_decomp._core.memory.available", lambda device: 1000)

    def no_work(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr("tl_decomp.identifiability._attribution.per_example", no_work)
    with pytest.raises(MemoryError, match="norm='spectral'.*norm='frobenius'"):
        hidden_token_attribution(model, "the cat sat", norm="spectral")


def test_n_probes_is_bounded_before_any_work():
    model = cached_model("gpt2", "bridge", torch.float64)  # d_model 32
    with pytest.raises(ValueError, match="more than d_model=32: method='exact'"):
        hidden_token_attribution(model, "the cat", method="estimate", n_probes=10**9)
    res = hidden_token_attribution(model, "the cat", method="estimate", n_probes=32)
    assert res.n_probes == 32


def _coverage(arch: str, n_probes: int, seeds: int) -> float:
    """Share of (norm, contribution) entries whose exact value lies within 2 stderr."""
    model = cached_model(arch, "bridge", torch.float64)
    exact = hidden_token_attribution(model, TEXTS)
    inside = []
    for seed in range(seeds):
        est = hidden_token_attribution(
            model, TEXTS, method="estimate", n_probes=n_probes, seed=seed
        )
        ok = est.stderr > 0
        inside.append(((est.norms - exact.norms).abs() <= 2 * est.norms_stderr)[ok])
        inside.append(((est.contributions - exact.contributions).abs() <= 2 * est.stderr)[ok])
    return torch.cat(inside).double().mean().item()


def test_estimate_coverage():
    """The figures AttributionResult.stderr quotes: the stderr is estimated from the probes
    themselves, so few probes give a short interval (Student's t, not normal). Measured with
    8 seeds: 2 probes 0.75-0.85, 8 probes 0.91-0.93, 16 probes 0.93-0.96."""
    got = {n: sum(_coverage(a, n, 3) for a in ("gpt2", "bert")) / 2 for n in (2, 8, 16)}
    assert 0.7 < got[2] < 0.87, got
    assert got[2] < got[8] and 0.87 < got[8] < 0.97, got
    assert 0.9 < got[16] < 0.98, got


def test_exact_on_processed_weights():
    model = cached_model("gpt2", "bridge", torch.float64, processed=True)
    expected = _brute_force(model, TEXTS[1], [1, 3])
    res = hidden_token_attribution(model, TEXTS[1], layers=[1, 3])
    assert (res.norms[:, 0] - expected).abs().max() <= 1e-6 * expected.max()


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("method", ["exact", "estimate"])
def test_rows_sum_to_one_padding_and_causality(arch, method):
    model = cached_model(arch, "bridge", torch.float64)
    res = hidden_token_attribution(model, TEXTS, method=method, n_probes=4)
    real = res.attention_mask.bool()
    sums = res.contributions.sum(-1)
    assert (sums[:, real] - 1).abs().max() <= 1e-12
    assert (sums[:, ~real] == 0).all()  # padded queries
    assert (res.contributions.permute(0, 1, 3, 2)[:, ~real] == 0).all()  # padded keys
    # a padded example equals the example run alone
    alone = hidden_token_attribution(model, TEXTS[1], method=method, n_probes=4, seed=1)
    n = alone.tokens.shape[1]
    assert torch.allclose(res.contributions[:, 1, :n, :n], alone.contributions[:, 0], atol=1e-12)
    future = torch.triu(torch.ones(res.tokens.shape[1], res.tokens.shape[1]), 1).bool()
    if model_spec(model).causal:
        assert (res.contributions[..., future] == 0).all()  # exactly, not approximately
    else:
        assert (res.contributions[..., future] > 0).any()


def test_estimate_converges_as_one_over_sqrt_n():
    model = cached_model("bert", "bridge", torch.float64)
    exact = hidden_token_attribution(model, TEXTS[2])

    def rms_error(n_probes: int) -> float:
        errs = [
            (
                hidden_token_attribution(
                    model, TEXTS[2], method="estimate", n_probes=n_probes, seed=s
                ).norms
                / exact.norms
                - 1
            )
            for s in range(2)
        ]
        return torch.cat(errs).pow(2).mean().sqrt().item()

    e2, e32 = rms_error(2), rms_error(32)  # 32 = d_model, the most n_probes accepts
    assert 2.5 < e2 / e32 < 6.5, (e2, e32)  # 16x the probes: about 4x smaller
    assert e32 < 0.08


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_estimate_stderr_is_honest(arch):
    model = cached_model(arch, "bridge", torch.float64)
    exact = hidden_token_attribution(model, TEXTS)
    zn, zc = [], []
    for seed in range(3):
        est = hidden_token_attribution(model, TEXTS, method="estimate", n_probes=32, seed=seed)
        ok = est.stderr > 0
        zn.append(((est.norms - exact.norms) / est.norms_stderr)[ok])
        zc.append(((est.contributions - exact.contributions) / est.stderr)[ok])
    for z in (torch.cat(zn), torch.cat(zc)):
        assert 0.5 < z.pow(2).mean() < 2.0
        assert (z.abs() < 2).double().mean() > 0.85
    assert exact.stderr is None and exact.norms_stderr is None


def test_statistics_against_hand_computation():
    c = torch.tensor(
        [
            [
                [[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.2, 0.5, 0.3]],
                [[0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [0.0, 0.0, 0.0]],
            ]
        ]
    )  # l b q k
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    res = AttributionResult(
        contributions=c,
        norms=c,
        norms_stderr=None,
        layers=(1,),
        tokens=torch.zeros(2, 3, dtype=torch.long),
        attention_mask=mask,
        method="exact",
        wrt="layer0",
        n_probes=None,
    )
    assert res.norm == "frobenius" and res.rows()[0]["norm"] == "frobenius"
    own = torch.tensor([1.0, 0.3, 0.3, 0.6, 0.9])
    assert torch.allclose(res.own_token(), own.quantile(0.5)[None])
    assert torch.allclose(res.p_tilde(), torch.tensor([2 / 5]))  # (0,1) and (0,2)
    offsets, mean = res.by_offset()
    assert offsets.tolist() == [-2, -1, 0, 1, 2]
    expected = [0.2, (0.7 + 0.5 + 0.1) / 3, own.mean(), (0.0 + 0.0 + 0.4) / 3, 0.0]
    assert torch.allclose(mean[0], torch.tensor(expected))
    assert res.by_offset(1)[0].tolist() == [-1, 0, 1]


def test_wrt_embed():
    model = cached_model("bert", "bridge", torch.float64)
    res = hidden_token_attribution(model, TEXTS[0], layers=[0, 3], wrt="embed")
    n = res.tokens.shape[1]
    # the embedding LayerNorm acts per token: at layer 0 each token is all its own
    assert torch.allclose(res.contributions[0, 0], torch.eye(n, dtype=torch.float64))
    assert torch.allclose(res.contributions[1].sum(-1), torch.ones(1, n, dtype=torch.float64))
    assert res.wrt == "embed"


def test_bad_input_raises_clearly_and_leaves_no_hook():
    model = cached_model("gpt2", "bridge", torch.float64)
    with pytest.raises(ValueError, match="out of range"):
        hidden_token_attribution(model, "the cat", layers=[4])
    # TypeError where runtime type checking (jaxtyping + beartype) is on, else ValueError.
    with pytest.raises((ValueError, TypeError), match="method"):
        hidden_token_attribution(model, "the cat", method="approx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_probes"):
        hidden_token_attribution(model, "the cat", method="estimate", n_probes=1)
    tokens = torch.tensor([[0, 5, 6]])
    with pytest.raises(ValueError, match="right padding"):
        hidden_token_attribution(model, tokens, attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="empty"):
        hidden_token_attribution(model, torch.zeros(1, 0, dtype=torch.long))
    with NoHooksLeft(model), pytest.raises(ValueError, match="outside the vocabulary"):
        hidden_token_attribution(model, torch.tensor([[1, 500]]))


def test_a_failure_inside_the_hooked_run_leaves_no_hook(monkeypatch):
    model = cached_model("gpt2", "bridge", torch.float64)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("tl_decomp.identifiability._jacobian.capture", broken)
    with NoHooksLeft(model), pytest.raises(RuntimeError, match="boom"):
        hidden_token_attribution(model, "the cat")


@pytest.mark.bundled
def test_minilm_estimate_tracks_exact():
    from tl_decomp import load_model

    model = load_model("minilm")
    text = "It is a truth universally acknowledged."
    exact = hidden_token_attribution(model, text, layers=[1])
    est = hidden_token_attribution(model, text, layers=[1], method="estimate", n_probes=64)
    real = exact.attention_mask.bool()
    assert (exact.contributions.sum(-1)[:, real] - 1).abs().max() < 1e-5
    rel = (est.contributions / exact.contributions - 1).abs()
    assert rel.median() < 0.1
    assert 0 < exact.own_token().item() < 1


def test_half_precision_model_warns_and_stays_close_to_float32():
    half, full = cached_model("gpt2", dtype=torch.bfloat16), cached_model("gpt2")
    with pytest.warns(UserWarning, match="bfloat16"):
        got = hidden_token_attribution(half, "the cat sat on the mat")
    want = hidden_token_attribution(full, "the cat sat on the mat")
    assert got.contributions.dtype == torch.float32
    assert torch.allclose(got.contributions.sum(-1), torch.ones(3, 1, 7))
    assert (got.contributions - want.contributions).abs().max() < 0.05


@pytest.mark.skipif(KINDS[-1] != "bridge", reason="the zoo is TransformerLens 4.x's")
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_hta_on_experts_booted_the_way_users_do(family):
    """Hugging Face's default expert kernel (grouped_mm) has no forward-mode AD: HTA runs the
    experts' eager loop inside the call (same numbers) and restores the model's choice."""
    from support import zoo

    user = zoo.boot(family, torch.float32, as_users_do=True)  # grouped_mm: no float64
    config = user.original_model.config
    before = config._experts_implementation_internal
    assert before != "eager"
    ids = torch.arange(3, 11)[None]
    got = hidden_token_attribution(user, ids, layers=[-1], method="exact")
    eager = zoo.boot(family, torch.float32)
    want = hidden_token_attribution(eager, ids, layers=[-1], method="exact")
    assert torch.allclose(got.contributions, want.contributions, atol=1e-5)
    d = td.decompose(user, ids, granularity="expert")  # the decomposition, default kernels too
    assert d.relative_error < 1e-4
    assert config._experts_implementation_internal == before
