"""Peak memory of per-head shares: streamed (`reduce=`) vs materialised vs a plain run.

Part 1, SmolLM2-135M (bundled, offline, float32), 8 sentences of `td.load_corpus`, every
layer. In a fresh process per case, after the model is loaded, the resident-set high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set before:

- ``run``: ``run_with_cache`` with the recipe's ``names_filter`` (the cache alone);
- ``materialised``: the same run, then ``decompose_layers(granularity="head")`` and
  ``shares()`` of each layer (the stacks alive at once, as a list of them is);
- ``streamed``: the same run, then ``recipe.iter_reduced(cache, "shares")``.

Part 2, independence of the number of heads: a one-block GPT-2 (d_model 128, 4 / 16 / 64
heads, batch 2 x 64 tokens, float64), streamed and materialised per-head shares at every
layer, peak above the run's.

glibc's mmap threshold is fixed, as in ``bench_sources.py``: its default rises after the
first large free, after which freed temporaries stay resident and the high-water mark shows
the heap's history.

Run: ``python benchmarks/bench_reduce.py`` (about a minute of CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, re, tempfile, torch
import tl_decomp as td
from tl_decomp import DecompositionRecipe, decompose_layers
torch.set_num_threads(1)
case, method = {case!r}, {method!r}
if case == "smollm2":
    model = td.load_model("smollm2", dtype=torch.float32)
    texts = td.load_corpus()[:8]
    inp = texts
else:
    import transformers as tf
    from transformer_lens.model_bridge import TransformerBridge
    from tl_decomp.models import tiny_tokenizer
    heads = int(case)
    cfg = tf.GPT2Config(vocab_size=64, n_embd=128, n_layer=1, n_head=heads, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tempfile.mkdtemp()
    tf.GPT2LMHeadModel(cfg).save_pretrained(path)
    tiny_tokenizer(False, path).save_pretrained(path)
    model = TransformerBridge.boot_transformers(path, device="cpu", dtype=torch.float64).eval()
    inp = torch.randint(3, 64, (2, 64), generator=torch.Generator().manual_seed(0))
recipe = DecompositionRecipe.for_model(model, granularity="head")
tokens, mask = td.adapters.as_tokens(model, recipe.spec, inp, None)

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

with torch.inference_mode():
    before = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    cache = td.adapters.run_with_cache(model, tokens, mask, recipe.names_filter)
    if method == "materialised":
        ds = list(recipe.iter_layers(cache, attention_mask=mask))
        out = [d.shares() for d in ds]
    elif method == "streamed":
        out = [r.values for r in recipe.iter_reduced(cache, "shares", attention_mask=mask)]
    peak = kib("VmHWM") - before
print(json.dumps(dict(peak_mib=peak / 1024, tokens=list(tokens.shape))))
"""


def measure(case: str, method: str) -> dict:
    code = CHILD.format(case=case, method=method)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    a, b, c = (measure("smollm2", m) for m in ("run", "materialised", "streamed"))
    print(f"SmolLM2-135M, float32, batch x pos {a['tokens']}, per-head shares at every layer")
    base = a["peak_mib"]
    print(f"  run_with_cache      {base:8.1f} MiB")
    print(f"  materialised (b)    {b['peak_mib']:8.1f} MiB   b/a = {b['peak_mib'] / base:.2f}")
    print(f"  streamed (c)        {c['peak_mib']:8.1f} MiB   c/a = {c['peak_mib'] / base:.2f}")
    print("one-block GPT-2, d_model 128, 2 x 64 tokens, float64: peak above the run")
    rows = []
    for heads in ("4", "16", "64"):
        run, full, streamed = (measure(heads, m) for m in ("run", "materialised", "streamed"))
        m, s = full["peak_mib"] - run["peak_mib"], streamed["peak_mib"] - run["peak_mib"]
        rows.append(dict(heads=int(heads), run=run, materialised=full, streamed=streamed))
        print(f"  {heads:>3} heads: materialised +{m:7.1f} MiB, streamed +{s:5.1f} MiB")
    print(json.dumps(dict(smollm2=[a, b, c], heads=rows)))


if __name__ == "__main__":
    main()
