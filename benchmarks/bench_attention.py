"""Effective attention against its stated baselines; prints ratios (issue 4).

1. Causal (SmolLM2, 9 query heads on 3 KV heads, d_head 64, d_model 576) at 128, 512 and 1024
   tokens of the shipped corpus: the library (every head of one layer) vs the reference, one
   float64 SVD of ``V[:t+1]`` (``(t+1) x d_head``) per head and query row: ``col(V W_O) =
   col(V)`` as ``W_O`` has full row rank, so this is the cheapest honest SVD reference
   (``V W_O`` is ``(t+1) x d_model``, nine times wider, and would flatter the library). At
   128 tokens the reference runs in full; past that it runs on stratified random rows (one
   per stratum, so the scaled sum is an unbiased estimate of the full cost) and the output
   says so. Both layer 0 (rotary: a repeated token repeats its value vector) and a middle
   layer. Targets at 1024 tokens: >= 50x faster, max |difference| <= 1e-6 (float64).
2. Sliding window: SmolLM2's weights booted as Mistral (the same architecture plus a
   sliding window) with a 256-key window, at 512 and 1024 tokens: the library vs one SVD
   per head and row of ``V`` over that row's window (``<= 256 x d_head``), as in 1.
3. MiniLM, all layers and heads, batch 16 x 128 tokens: ``effective_attention_layers`` vs
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
import tempfile
import time

import torch

WINDOW = 256


def _clock(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _reference_rows(cache, spec, layer: int, rows: list[int], window: int | None = None):
    """The reference on `rows` of every head: ``{(head, row): (first key, A_eff[row, first
    key : row+1])}`` and the seconds it took. One SVD of ``V`` over the keys the row sees
    (from ``row - window + 1`` in a window), rank cut at ``eps * max(keys, d_model) *
    sigma_max`` as the library does on ``T``."""
    blk = spec.blocks[layer]
    a, v = cache[blk.pattern][0].double(), cache[blk.v][0].double()
    eps = torch.finfo(torch.float64).eps
    out, seconds = {}, 0.0
    for h in range(spec.n_heads):
        vh = v[:, spec.kv_head[h]]
        for t in rows:
            lo = 0 if window is None else max(0, t - window + 1)
            start = time.perf_counter()
            w, s, _ = torch.linalg.svd(vh[lo : t + 1], full_matrices=False)
            w = w[:, s > eps * max(t + 1 - lo, spec.d_model) * s[0]]
            out[h, t] = lo, (a[h, t, lo : t + 1] @ w) @ w.T
            seconds += time.perf_counter() - start
    return out, seconds


def _row_diff(row, lo: int, t: int, ref) -> float:
    """max |library - reference| over the keys row t sees; keys it cannot see must be 0."""
    unseen = row[:lo].abs().sum() + row[t + 1 :].abs().sum()
    return max((row[lo : t + 1] - ref).abs().max().item(), unseen.item())


def _stratified(n: int, samples: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    edges = [round(i * n / samples) for i in range(samples + 1)]
    return [rng.randrange(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def bench_causal(quick: bool) -> dict:
    from tl_decomp import load_model

    return _bench_rows(load_model("smollm2"), (128, 256) if quick else (128, 512, 1024), quick)


def bench_windowed(quick: bool) -> dict:
    return _bench_rows(_smollm2_as_mistral(WINDOW), (384,) if quick else (512, 1024), quick)


def _smollm2_as_mistral(window: int):
    """SmolLM2 (Llama) booted as Mistral, which is Llama plus a sliding window."""
    import transformers as tf
    from transformer_lens.model_bridge import TransformerBridge

    from tl_decomp.models import _bundled

    path = _bundled.smollm2_dir()
    config = tf.AutoConfig.from_pretrained(path).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        config.pop(key, None)
    config = tf.MistralConfig(**config, sliding_window=window)
    out = tempfile.mkdtemp(prefix="bench_mistral_")
    tf.MistralForCausalLM.from_pretrained(path, config=config).save_pretrained(out)
    tf.AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return TransformerBridge.boot_transformers(out, device="cpu", dtype=torch.float32).eval()


def _bench_rows(model, lengths: tuple[int, ...], quick: bool) -> dict:
    """Layer 0 and a middle layer at each length: the library vs the per-row reference."""
    from tl_decomp import adapters, load_corpus, model_spec
    from tl_decomp.attention import effective_attention

    spec = model_spec(model)
    layers = [0, spec.n_layers // 2]
    window = spec.blocks[0].window
    ids = model.tokenizer(" ".join(load_corpus(400)), add_special_tokens=False)["input_ids"]
    names = set(spec.hooks(layers, attention=True)).__contains__
    res = {}
    for n in lengths:
        tokens = torch.tensor([[model.tokenizer.bos_token_id, *ids[: n - 1]]])
        cache = adapters.run_with_cache(model, tokens, None, names)
        full = n <= 128
        rows = list(range(n)) if full else _stratified(n, 16 if quick else 32, seed=n)
        for layer in layers:
            t_lib, eff = _clock(lambda c=cache, L=layer: effective_attention(c, L))
            ref, t_ref = _reference_rows(cache, spec, layer, rows, window)
            t_ref_full = t_ref * n / len(rows)
            diff = max(_row_diff(eff[0, h, t], lo, t, r) for (h, t), (lo, r) in ref.items())
            res[f"{n}_tokens_layer_{layer}"] = {
                "library_s": t_lib,
                "reference_s" if full else "reference_s_estimated": t_ref_full,
                "reference_rows_run": len(rows) * spec.n_heads,
                "speedup": t_ref_full / t_lib,
                "max_abs_diff": diff,
            }
    return res


def bench_minilm(quick: bool) -> dict:
    from tl_decomp import adapters, load_corpus, load_model, model_spec
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
        t_fwd, cache = _clock(lambda: adapters.run_with_cache(model, tokens, mask, names))
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
    results = {
        "causal_smollm2": bench_causal(args.quick),
        f"window_{WINDOW}_smollm2_as_mistral": bench_windowed(args.quick),
        "minilm": bench_minilm(args.quick),
    }
    print(json.dumps(results, indent=2))
    for name, r in results["causal_smollm2"].items():
        print(f"causal {name}: {r['speedup']:.0f}x faster than one SVD per row of V[:t+1], "
              f"max |diff| {r['max_abs_diff']:.1e}")  # fmt: skip
    for name, r in results[f"window_{WINDOW}_smollm2_as_mistral"].items():
        print(f"window {WINDOW} {name}: {r['speedup']:.1f}x faster than one SVD per row of V "
              f"over its window, max |diff| {r['max_abs_diff']:.1e}")  # fmt: skip
    for name, r in results["minilm"].items():
        ratio = r["ratio_effective_over_forward"]
        print(f"minilm {name}: effective attention {ratio:.2f}x the run_with_cache time")


if __name__ == "__main__":
    main()
