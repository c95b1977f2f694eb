"""Token-wise decomposition on SmolLM2-135M (bundled, float32) at 128 tokens: time and peak
memory against a plain ``run_with_cache`` of the same tokens, in one run.

Cases, each in a fresh process after the model is loaded (peak: the resident-set high-water
mark above the resident set before, as in ``bench_reduce.py``; time: wall clock, 2 threads):

- ``run``: ``model.run_with_cache(tokens)`` (every hook cached: the baseline);
- ``logit``: token-level logit attribution of the next token at the final embedding,
  ``decompose_layers(granularity="token", layers=["final"], reduce=("logit", ids))``;
- ``fast``: the same at the last position only, `td.token_logit_attribution` (a cached run,
  one frozen forward pass with gradients for the embeddings only, stopped before the
  unembedding, its backward pass, and one frozen pass of ``F(0)`` without gradients);
- ``lens``: the same at every layer (the decomposed logit lens by token, streamed);
- ``stack``: the full token stack ``[pos + 1, 1, pos, d_model]`` at one layer (block 15's
  output), ``decompose(granularity="token", layer=15)``.

The token split re-runs the model once per input position (``chunk_size`` positions per
batch) with every nonlinearity frozen: its cost grows with the length as (pos + 1) forward
passes, which this benchmark states as a ratio.

Run: ``python benchmarks/bench_flow.py`` (a few minutes of CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, re, time, torch
import tl_decomp as td
torch.set_num_threads(2)
model = td.load_model("smollm2", dtype=torch.float32)
text = " ".join(td.load_corpus()[:40])
ids = model.tokenizer(text, return_tensors="pt")["input_ids"][:, :128]
nxt = ids[0, 1:].tolist() + [ids[0, -1].item()]  # each position's next token

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

case = {case!r}
model(ids[:, :8])  # warm-up
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
t0 = time.perf_counter()
if case == "run":
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
elif case == "logit":
    r = td.decompose_layers(model, ids, layers=["final"], granularity="token",
                            reduce=("logit", torch.tensor(nxt)[None]))
elif case == "fast":
    r = td.token_logit_attribution(model, ids, nxt[-1])
elif case == "lens":
    target = ("logit", torch.tensor(nxt)[None])
    r = td.decompose_layers(model, ids, granularity="token", reduce=target)
else:
    d = td.decompose(model, ids, granularity="token", layer=15)
seconds = time.perf_counter() - t0
print(json.dumps(dict(seconds=seconds, peak_mib=(kib("VmHWM") - before) / 1024)))
"""


def measure(case: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD.format(case=case)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(cases: tuple[str, ...] = ("run", "logit", "fast", "lens", "stack")) -> None:
    results = {case: measure(case) for case in cases}
    base = results["run"]
    print("SmolLM2-135M, float32, 128 tokens; ratios to a plain run_with_cache")
    print(f"{'case':8s} {'seconds':>8s} {'x time':>7s} {'peak MiB':>9s} {'x memory':>9s}")
    for case, r in results.items():
        print(
            f"{case:8s} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:7.1f} "
            f"{r['peak_mib']:9.1f} {r['peak_mib'] / max(base['peak_mib'], 1e-9):9.2f}"
        )


if __name__ == "__main__":  # `bench_flow.py run fast`: those cases only (the baseline first)
    main(tuple(sys.argv[1:]) or ("run", "logit", "fast", "lens", "stack"))
