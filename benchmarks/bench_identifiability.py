"""Identifiability and attribution cost against stated baselines; prints ratios (issue 5).

1. HTA ``exact`` (forward mode, vmapped JVPs, every layer from one pass) vs the naive loop of
   reverse-mode passes, one ``torch.autograd.grad`` per output coordinate per layer. Measured
   in full on the tiny BERT; on MiniLM (16 tokens) the naive loop is timed on a random sample
   of coordinates and extrapolated (it would run for hours), which the output says.
2. HTA ``estimate`` (16 probes) vs ``exact`` on MiniLM, 64 tokens, all 6 layers. Targets:
   >= 10x faster, <= 5% median relative error of the contributions.
3. Linear identifiability, all layers, over >= 20,000 MiniLM tokens of the shipped corpus vs
   the forward passes that gather the hidden states (same batches, nothing fitted).
   Target: <= 2x.

Run: ``python benchmarks/bench_identifiability.py [--quick]`` (``--quick``: 32 tokens for 2,
5,000 tokens for 3, fewer samples for 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time

import torch


def _clock(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _naive_reverse(model, tokens, layers: list[int], sample: int | None, seed: int = 0):
    """One backward pass per output coordinate ``(layer, query, d)``; returns seconds per pass
    and the number of passes a full Jacobian needs."""
    from tl_decomp import model_spec
    from tl_decomp.identifiability import layer_sites, runner, source_activation

    spec = model_spec(model)
    x0 = source_activation(model, tokens, spec.layer0).requires_grad_(True)
    out = runner(model, spec, tokens, spec.layer0, layer_sites(spec, layers))(x0)
    coords = [(L, i, k) for L in range(out.shape[0]) for i in range(out.shape[2])
              for k in range(out.shape[3])]  # fmt: skip
    todo = coords if sample is None else random.Random(seed).sample(coords, sample)
    start = time.perf_counter()
    for L, i, k in todo:
        torch.autograd.grad(out[L, 0, i, k], x0, retain_graph=True)
    return (time.perf_counter() - start) / len(todo), len(coords)


def bench_exact_vs_reverse(quick: bool) -> dict:
    from tl_decomp import adapters, load_model, tiny_model
    from tl_decomp.identifiability import hidden_token_attribution

    res = {}
    tiny = tiny_model("bert", dtype=torch.float32)
    tokens, _ = adapters.tokenize(tiny, "the cat sat on the mat and the dog ran", encoder=True)
    t_ours, _ = _clock(lambda: hidden_token_attribution(tiny, tokens, layers=[1, 2, 3]))
    per, n = _naive_reverse(tiny, tokens, [1, 2, 3], None)
    res["tiny_bert"] = {"exact_s": t_ours, "naive_s": per * n, "passes": n,
                        "ratio_naive_over_exact": per * n / t_ours}  # fmt: skip
    model = load_model("minilm")
    text = "It is a truth universally acknowledged, that a single man in possession"
    tokens = torch.tensor([model.tokenizer(text)["input_ids"][:15] + [102]])  # [CLS] .. [SEP]
    layers = list(range(1, 7))
    t_ours, _ = _clock(lambda: hidden_token_attribution(model, tokens, layers=layers))
    per, n = _naive_reverse(model, tokens, layers, 200 if quick else 600)
    res["minilm_16_tokens"] = {"exact_s": t_ours, "naive_s_extrapolated": per * n, "passes": n,
                               "ratio_naive_over_exact": per * n / t_ours}  # fmt: skip
    return res


def bench_estimate_vs_exact(quick: bool) -> dict:
    from tl_decomp import load_corpus, load_model
    from tl_decomp.identifiability import hidden_token_attribution

    model = load_model("minilm")
    n = 32 if quick else 64
    ids = model.tokenizer(" ".join(load_corpus(10)))["input_ids"][: n - 1] + [102]
    tokens = torch.tensor([ids])
    t_exact, exact = _clock(lambda: hidden_token_attribution(model, tokens))
    t_est, est = _clock(lambda: hidden_token_attribution(model, tokens, method="estimate"))
    rel = (est.contributions / exact.contributions - 1).abs()
    z = ((est.contributions - exact.contributions) / est.stderr)[est.stderr > 0]
    return {
        "tokens": n,
        "exact_s": t_exact,
        "estimate_s": t_est,
        "speedup": t_exact / t_est,
        "median_rel_error": rel.median().item(),
        "p90_rel_error": rel.quantile(0.9).item(),
        "stderr_z_rms": z.pow(2).mean().sqrt().item(),
        "stderr_coverage_2se": (z.abs() < 2).double().mean().item(),
        "own_token_exact": exact.own_token().tolist(),
        "own_token_estimate": est.own_token().tolist(),
    }


def bench_identifiability(quick: bool) -> dict:
    from tqdm import tqdm

    from tl_decomp import adapters, load_corpus, load_model
    from tl_decomp.identifiability import gather_states, split_corpus, token_identifiability

    model = load_model("minilm")
    spec = adapters.model_spec(model)
    target = 5_000 if quick else 20_000
    corpus, total = [], 0
    for text in load_corpus():
        corpus.append(text)
        total += len(model.tokenizer(text)["input_ids"])
        if total >= target:
            break
    layers = list(range(spec.n_layers + 1))
    train, test = split_corpus(corpus, 0.2, 0, "linear")
    gather = functools.partial(gather_states, model, spec, corpus, layers=layers, batch_size=32,
                               vocab=False, bar=tqdm(disable=True))  # fmt: skip

    def forward_only():
        for order in (train, test):
            for _ in gather(order):
                pass

    forward_only()  # warm-up
    t_fwd, _ = _clock(forward_only)
    t_ours, res = _clock(lambda: token_identifiability(model, corpus, progress=False))
    return {
        "sequences": len(corpus),
        "tokens": total,
        "forward_s": t_fwd,
        "identifiability_s": t_ours,
        "ratio": t_ours / t_fwd,
        "rates": [round(r, 4) for r in res.rates.tolist()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["reverse", "estimate", "identifiability"])
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    benches = {"reverse": bench_exact_vs_reverse, "estimate": bench_estimate_vs_exact,
               "identifiability": bench_identifiability}  # fmt: skip
    for name, fn in benches.items():
        if args.only in (None, name):
            out = fn(args.quick)
            print(f"== {name}\n{json.dumps(out, indent=2)}", flush=True)


if __name__ == "__main__":
    main()
