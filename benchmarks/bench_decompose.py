"""Decomposition cost against stated baselines; prints ratios (issue 3's targets).

1. MiniLM, batch 16 x 128 tokens, CPU: `decompose_layers` (every layer, one forward pass)
   vs a plain `model.run_with_cache` on the same tokens. Targets: coarse <= 1.3x, head <= 2x.
2. Peak memory of head granularity (one layer at a time via `iter_layers`) for several
   `chunk_size`s, measured in a fresh process as the RSS high-water mark above the loaded
   model and cache, next to the size of the largest decomposition it returns.
3. Pre-LN (SmolLM2, batch 4 x 128): head-granularity decomposition of the last layer vs
   TransformerLens's `get_full_resid_decomposition`, both from the same cache. Target <= 1.0x.

Run: ``python benchmarks/bench_decompose.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _tokens(model, batch: int, pos: int) -> torch.Tensor:
    from tl_decomp.datasets import load_corpus

    text = " ".join(load_corpus(400))
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [ids[i * pos : (i + 1) * pos] for i in range(batch)]
    return torch.tensor(rows)


def bench_minilm(repeats: int) -> dict:
    from tl_decomp import DecompositionRecipe, adapters, load_model

    model = load_model("minilm")
    tokens = _tokens(model, 16, 128)
    mask = torch.ones_like(tokens)

    def plain():
        with torch.inference_mode():
            model.run_with_cache(tokens, attention_mask=mask)

    base = _time(plain, repeats)
    out = {"baseline_run_with_cache_s": base}
    for granularity in ("coarse", "head"):
        recipe = DecompositionRecipe.for_model(model, granularity=granularity)

        def ours(recipe=recipe):
            cache = adapters.run_with_cache(model, tokens, mask, recipe.names_filter)
            for d in recipe.iter_layers(cache):
                del d

        t = _time(ours, repeats)
        out[f"{granularity}_s"] = t
        out[f"{granularity}_ratio"] = t / base
    return out


def _peak_child(chunk: int, cache_file: str) -> dict:
    # A fresh process loads the model and a saved cache first, so the RSS high-water mark
    # it then reports is the decomposition's own, not the forward pass's.
    code = f"""
import json, torch
from tl_decomp import DecompositionRecipe, load_model
model = load_model("minilm")
cache = torch.load({cache_file!r})
recipe = DecompositionRecipe.for_model(model, granularity="head", chunk_size={chunk})
def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark (Linux)
before = rss("VmRSS:")
largest = 0
for d in recipe.iter_layers(cache):
    largest = max(largest, d.factors.numel() * d.factors.element_size())
    del d
peak = rss("VmHWM:")
print(json.dumps({{"rss_before_kb": before, "rss_peak_kb": peak, "largest_output_b": largest}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_memory() -> dict:
    import tempfile

    from tl_decomp import DecompositionRecipe, adapters, load_model

    model = load_model("minilm")
    tokens = _tokens(model, 16, 128)
    recipe = DecompositionRecipe.for_model(model, granularity="head")
    cache = adapters.run_with_cache(model, tokens, torch.ones_like(tokens), recipe.names_filter)
    out = {}
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        torch.save({k: v.clone() for k, v in cache.items()}, f.name)
        for chunk in (1, 4, 12):
            r = _peak_child(chunk, f.name)
            out[f"chunk_{chunk}"] = {
                "rss_growth_mb": round((r["rss_peak_kb"] - r["rss_before_kb"]) / 1024, 1),
                "largest_layer_output_mb": round(r["largest_output_b"] / 2**20, 1),
            }
    return out


def bench_pre_ln(repeats: int) -> dict:
    from tl_decomp import DecompositionRecipe, load_model

    model = load_model("smollm2")
    tokens = _tokens(model, 4, 128)
    with torch.no_grad():  # TransformerLens's stacking needs non-inference tensors
        _, cache = model.run_with_cache(tokens)
    recipe = DecompositionRecipe.for_model(model, granularity="head")
    last = model.cfg.n_layers

    def ours():
        recipe.decompose(cache, layer=last - 1)

    def theirs():
        cache.get_full_resid_decomposition(layer=last, expand_neurons=False)

    t_ours, t_theirs = _time(ours, repeats), _time(theirs, repeats)
    return {"ours_s": t_ours, "tl_full_resid_s": t_theirs, "ratio": t_ours / t_theirs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repeat instead of 3")
    args = p.parse_args()
    repeats = 1 if args.quick else 3
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    r = bench_minilm(repeats)
    print(f"[1] MiniLM 16x128, baseline run_with_cache: {r['baseline_run_with_cache_s']:.3f} s")
    print(
        f"    decompose_layers coarse: {r['coarse_s']:.3f} s = {r['coarse_ratio']:.2f}x "
        f"(target <= 1.3x)"
    )
    print(
        f"    decompose_layers head:   {r['head_s']:.3f} s = {r['head_ratio']:.2f}x "
        f"(target <= 2.0x)"
    )
    m = bench_memory()
    print("[2] head granularity, one layer at a time: RSS growth vs chunk_size")
    for k, v in m.items():
        print(
            f"    {k}: +{v['rss_growth_mb']} MB (largest layer output "
            f"{v['largest_layer_output_mb']} MB)"
        )
    pr = bench_pre_ln(repeats)
    print(
        f"[3] SmolLM2 4x128, last layer by head: ours {pr['ours_s']:.3f} s vs "
        f"get_full_resid_decomposition {pr['tl_full_resid_s']:.3f} s = {pr['ratio']:.2f}x "
        f"(target <= 1.0x)"
    )


if __name__ == "__main__":
    main()
