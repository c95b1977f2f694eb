"""Token-wise decomposition on SmolLM2-135M (bundled, float32) at 128 tokens: time and peak
memory against a plain ``run_with_cache`` of the same tokens, in one run.

Cases, each in a fresh process after the model is loaded, called twice: ``first s`` is the
first call, which also derives once per model what later calls reuse (the model's layout, the
sites the token split freezes, a short check that the frozen network is affine); ``seconds``,
the ratios and the peak are the second call's (peak: the resident-set high-water mark above
the resident set before it, as in ``bench_reduce.py``; time: wall clock, 2 threads):

- ``run``: ``model.run_with_cache(tokens)`` (every hook cached: the baseline);
- ``logit``: token-level logit attribution of the next token at the final embedding,
  ``decompose_layers(granularity="token", layers=["final"], reduce=("logit", ids))``;
- ``fast``: the same at the last position only, `td.token_logit_attribution` (a cached run,
  one frozen forward pass with gradients for the embeddings only, stopped before the
  unembedding, and its backward pass; ``F(0)``'s logit is what the tokens' terms leave);
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


def go():
    if case == "run":
        with torch.no_grad():
            return model.run_with_cache(ids)
    if case == "logit":
        return td.decompose_layers(model, ids, layers=["final"], granularity="token",
                                   reduce=("logit", torch.tensor(nxt)[None]))
    if case == "fast":
        return td.token_logit_attribution(model, ids, nxt[-1])
    if case == "lens":
        return td.decompose_layers(model, ids, granularity="token",
                                   reduce=("logit", torch.tensor(nxt)[None]))
    return td.decompose(model, ids, granularity="token", layer=15)


t0 = time.perf_counter()
go()  # the first call also derives, once per model, what the later ones reuse
first = time.perf_counter() - t0
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
t0 = time.perf_counter()
r = go()
seconds = time.perf_counter() - t0
print(json.dumps(dict(first=first, seconds=seconds, peak_mib=(kib("VmHWM") - before) / 1024)))
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
    head = ("case", "first s", "seconds", "x time", "peak MiB", "x memory")
    print(f"{head[0]:8s}" + "".join(f" {h:>8s}" for h in head[1:]))
    for case, r in results.items():
        cells = (r["first"], r["seconds"], r["seconds"] / base["seconds"], r["peak_mib"])
        cells += (r["peak_mib"] / max(base["peak_mib"], 1e-9),)
        print(f"{case:8s}" + "".join(f" {c:8.2f}" for c in cells))


if __name__ == "__main__":  # `bench_flow.py run fast`: those cases only (the baseline first)
    main(tuple(sys.argv[1:]) or ("run", "logit", "fast", "lens", "stack"))
