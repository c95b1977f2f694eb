"""Data-parallel corpus functions: two gloo ranks on the CPU give the one-process results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tl_decomp import (
    attention_correlation,
    corpus_statistics,
    special_token_attention,
    token_identifiability,
    word_factors,
)
from tl_decomp._core import distributed
from tl_decomp.models import tiny_model

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "is", "big"]
# 13 texts of 1 to 13 words in a scrambled order: batches of 2 leave one rank a batch more
TEXTS = [
    " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range((5 * i) % 13 + 1)) for i in range(13)
]


def _models() -> tuple:
    """Built before the process group: Hugging Face's `save_pretrained`, which `tiny_model`
    calls, writes nothing on ranks other than 0 once a group is initialised."""
    return tiny_model("bert", dtype=torch.float64), tiny_model("llama", dtype=torch.float64)


def _compute(rank: int, bert, llama) -> dict:
    """Every data-parallel function on tiny models; what the ranks must agree on."""
    out = {}
    for name, model in (("bert", bert), ("llama", llama)):
        s = corpus_statistics(model, TEXTS, granularity="head", batch_size=2, progress=False)
        out[f"stats {name}"] = (s.layers, s.labels, s.mean, s.std, s.n_tokens)
    corr = attention_correlation(bert, TEXTS, batch_size=2)
    out["correlation"] = (corr.lengths, corr.r)
    st = special_token_attention(llama, TEXTS, batch_size=2)
    out["special"] = (st.raw, st.effective, st.tokens)
    for mapping in ("linear", "naive"):
        res = token_identifiability(
            bert, TEXTS, mapping=mapping, batch_size=2, test_fraction=0.4, cross_layer=True,
            progress=False,
        )  # fmt: skip
        out[f"identifiability {mapping}"] = (
            res.rates, res.correct, res.token_ids, res.positions, res.sequences
        )  # fmt: skip
        if mapping == "naive":  # the linear map's cross-layer rates hang on rounding: below
            out["cross naive"] = res.cross
    words = [t.split() for t in TEXTS]
    wf = word_factors(bert, (words, [[w[0] for w in s] for s in words]), batch_size=2,
                      progress=False)  # fmt: skip
    out["word factors"] = (wf.factors, wf.labels, wf.classes)
    out["guard"] = _failing_rank(rank)
    return out


def _failing_rank(rank: int) -> str:
    """Rank 1 raises inside `guard`; both ranks must come out with an error, none waiting."""
    try:
        with distributed.guard():
            if rank == 1:
                raise ValueError("rank one's text is too long")
    except (ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    models = _models()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(_compute(rank, *models), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_same(a, b, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, msg=what)
        else:
            assert torch.equal(a, b), what
    elif isinstance(a, tuple):
        assert len(a) == len(b), what
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y, what)
    else:
        assert a == b, what


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_return_the_one_process_results(two_ranks):
    single = _compute(0, *_models())
    single.pop("guard")
    for rank in two_ranks:
        for key, value in single.items():
            _assert_same(value, rank[key], key)


# Not compared: the linear map's cross-layer rates. Applied to another layer's states, the
# map's weights along directions at its rank cut-off (rounding noise of rank-deficient states)
# dominate, so summing the normal equations in another order changes them (here by up to 0.46);
# its own-layer rates and per-token hits are compared above and are equal.


def test_a_failing_rank_makes_every_rank_raise(two_ranks):
    assert (
        two_ranks[0]["guard"]
        == "RuntimeError: rank 1 failed: ValueError: rank one's text is too long"
    )
    assert two_ranks[1]["guard"] == "ValueError: rank one's text is too long"


def test_mlp_map_is_refused_under_distributed(monkeypatch):
    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(NotImplementedError, match="not data-parallel"):
        token_identifiability(tiny_model("bert"), TEXTS, mapping="mlp", progress=False)


@pytest.mark.parametrize("n_batches", [1, 4, 5, 9])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_deal_gives_every_batch_to_one_rank_and_balances(monkeypatch, n_batches, world):
    got = []
    for r in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        got.append([i for i, _ in distributed.deal(list(range(n_batches)))])
    assert sorted(i for mine in got for i in mine) == list(range(n_batches))
    assert max(map(len, got)) - min(map(len, got)) <= 1


def test_length_batches_sort_by_length_and_keep_ties_in_order():
    assert distributed.length_batches([3, 1, 2, 1, 3], 2) == [[1, 3], [2, 0], [4]]


def test_one_process_helpers_are_the_identity():
    t = torch.arange(3.0)
    assert not distributed.active() and distributed.is_main()
    assert distributed.all_sum(t) is t and distributed.all_max(2.0) == 2.0
    assert distributed.undeal([1, 2]) == [1, 2]


@pytest.mark.bundled
def test_torchrun_cli_stats_prints_the_one_process_table(capsys):
    """The issue's check, on 40 sentences to stay under a minute."""
    from tl_decomp.cli import main

    args = ["stats", "--model", "minilm", "--sentences", "40", "--batch-size", "8", "--json"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tl_decomp.cli", *args],
        capture_output=True, text=True, env=env, cwd=root, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert main(args) == 0
    one, two = json.loads(capsys.readouterr().out), json.loads(run.stdout)  # rank 0 alone prints
    assert [(r["layer"], r["factor"]) for r in one] == [(r["layer"], r["factor"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["mean"] - b["mean"]) < 1e-6 and abs(a["std"] - b["std"]) < 1e-6
