"""Effective attention against its stated baselines; prints ratios (issue 4).

1. Causal (SmolLM2, 9 query heads on 3 KV heads, d_head 64, d_model 576) at 128, 512 and 1024
   tokens of the shipped corpus: the library (every head of one layer) vs the reference, one
   float64 SVD of ``T[:t+1]`` (``(t+1) x d_model``) per head and query row. At 128 tokens the
   reference runs in full; past that it runs on stratified random rows (one per stratum, so
   the scaled sum is an unbiased estimate of the full cost) and the output says so. Both
   layer 0 (rotary: a repeated token repeats its value vector) and a middle layer.
   Targets at 1024 tokens: >= 50x faster, max |difference| <= 1e-6 (float64).
2. MiniLM, all layers and heads, batch 16 x 128 tokens: ``effective_attention_layers`` vs
   the ``run_with_cache`` that produced the cache. Target: <= 0.5x.

Run: ``python benchmarks/bench_attention.py [--quick] [--threads N]``. The machine's load
average is printed: on a shared machine every figure moves with it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch


def _clock(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _reference_rows(cache, spec, layer: int, rows: list[int]):
    """The reference on `rows` of every head: ``{(head, row): A_eff[row, :row+1]}`` and the
    seconds it took (T formed once per head, outside the clock)."""
    blk = spec.blocks[layer]
    a, v = cache[blk.pattern][0].double(), cache[blk.v][0].double()
    eps = torch.finfo(torch.float64).eps
    out, seconds = {}, 0.0
    for h in range(spec.n_heads):
        T = v[:, spec.kv_head[h]] @ blk.W_O[h].double()
        for t in rows:
            start = time.perf_counter()
            w, s, _ = torch.linalg.svd(T[: t + 1], full_matrices=False)
            w = w[:, s > eps * max(t + 1, T.shape[1]) * s[0]]
            out[h, t] = (a[h, t, : t + 1] @ w) @ w.T
            seconds += time.perf_counter() - start
    return out, seconds


def _stratified(n: int, samples: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    edges = [round(i * n / samples) for i in range(samples + 1)]
    return [rng.randrange(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def bench_causal(quick: bool) -> dict:
    from tl_decomp import _running, load_corpus, load_model, model_spec
    from tl_decomp.attention import effective_attention

    model = load_model("smollm2")
    spec = model_spec(model)
    layers = [0, spec.n_layers // 2]
    ids = model.tokenizer(" ".join(load_corpus(400)), add_special_tokens=False)["input_ids"]
    names = set(spec.hooks(layers, attention=True)).__contains__
    res = {}
    for n in (128, 256) if quick else (128, 512, 1024):
        tokens = torch.tensor([[model.tokenizer.bos_token_id, *ids[: n - 1]]])
        cache = _running.run_with_cache(model, tokens, None, names)
        full = n <= 128
        rows = list(range(n)) if full else _stratified(n, 16 if quick else 32, seed=n)
        for layer in layers:
            t_lib, eff = _clock(lambda c=cache, L=layer: effective_attention(c, L))
            ref, t_ref = _reference_rows(cache, spec, layer, rows)
            t_ref_full = t_ref * n / len(rows)
            diff = max((eff[0, h, t, : t + 1] - r).abs().max().item() for (h, t), r in ref.items())
            res[f"{n}_tokens_layer_{layer}"] = {
                "library_s": t_lib,
                "reference_s" if full else "reference_s_estimated": t_ref_full,
                "reference_rows_run": len(rows) * spec.n_heads,
                "speedup": t_ref_full / t_lib,
                "max_abs_diff": diff,
            }
    return res


def bench_minilm(quick: bool) -> dict:
    from tl_decomp import _running, load_corpus, load_model, model_spec
    from tl_decomp.attention import effective_attention_layers

    model = load_model("minilm")
    spec = model_spec(model)
    batch, n = (4, 64) if quick else (16, 128)
    ids = model.tokenizer(" ".join(load_corpus(600)))["input_ids"][1:-1]
    cls, sep = model.tokenizer.cls_token_id, model.tokenizer.sep_token_id
    tokens = torch.tensor([[cls, *ids[i * (n - 2) : (i + 1) * (n - 2)], sep] for i in range(batch)])
    mask = torch.ones_like(tokens)
    names = spec.names_filter(attention=True)
    fwd, eff = [], []
    for _ in range(3):
        t_fwd, cache = _clock(lambda: _running.run_with_cache(model, tokens, mask, names))
        t_eff, _ = _clock(lambda c=cache: effective_attention_layers(c, attention_mask=mask))
        fwd.append(t_fwd)
        eff.append(t_eff)
    ratios = [e / f for e, f in zip(eff, fwd, strict=True)]
    return {
        f"batch_{batch}x{n}_all_layers": {
            "run_with_cache_s": statistics.median(fwd),
            "effective_attention_s": statistics.median(eff),
            "ratio_effective_over_forward": statistics.median(ratios),
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter inputs, fewer rows")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for everything")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    print(json.dumps(info))
    results = {"causal_smollm2": bench_causal(args.quick), "minilm": bench_minilm(args.quick)}
    print(json.dumps(results, indent=2))
    for name, r in results["causal_smollm2"].items():
        print(f"causal {name}: {r['speedup']:.0f}x faster than one SVD per row, "
              f"max |diff| {r['max_abs_diff']:.1e}")  # fmt: skip
    for name, r in results["minilm"].items():
        ratio = r["ratio_effective_over_forward"]
        print(f"minilm {name}: effective attention {ratio:.2f}x the run_with_cache time")


if __name__ == "__main__":
    main()
