"""Peak memory of the attention split by source token: streamed vs materialised.

A one-block GPT-2 with d_model 128 and 4, 16 or 64 heads (d_head = 128 / heads), batch 2 x 64
tokens, float64, CPU. For each head count, in a fresh process that has already loaded the
model and cached the forward pass, the resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` just before) above the resident set before the call, for:

- ``streamed``: `norm_based_attention` and `source_shares` of the block, one chunk of 4
  heads at a time (`tl_decomp.decomposition`);
- ``materialised``: ``decompose(granularity="source")`` and the same two statistics from its
  ``[factor batch pos d_model]`` stack (what one would do without `tl_decomp.decomposition`).

The streamed reduction's memory beyond its ``[batch head query key]`` results does not grow
with the number of heads; the materialised stack grows as heads x pos^2 x d_model. Measured
(2-core CPU, 4 / 16 / 64 heads): materialised 67 / 262 / 1039 MiB; streamed 2.4 / 3.9 / 9.7
MiB, of which all but 1.9 / 1.9 / 1.7 MiB is the results themselves.

Run: ``python benchmarks/bench_sources.py`` (about 30 s of CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEADS = (4, 16, 64)
D_MODEL, BATCH, POS = 128, 2, 64

CHILD = """
import json, re, tempfile, torch
import transformers as tf
from transformer_lens.model_bridge import TransformerBridge
import tl_decomp as td
from tl_decomp.models import tiny_tokenizer

torch.set_num_threads(1)
heads, method, d_model, batch, pos = {heads}, {method!r}, {d_model}, {batch}, {pos}
cfg = tf.GPT2Config(vocab_size=64, n_embd=d_model, n_layer=1, n_head=heads, n_positions=pos,
                    bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
path = tempfile.mkdtemp()
tf.GPT2LMHeadModel(cfg).save_pretrained(path)
tiny_tokenizer(False, path).save_pretrained(path)
model = TransformerBridge.boot_transformers(path, device="cpu", dtype=torch.float64).eval()
tokens = torch.randint(3, 64, (batch, pos), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    _, cache = model.run_with_cache(tokens, names_filter=td.source_names_filter(model))

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

with torch.inference_mode():
    before = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    if method == "streamed":
        out = [td.norm_based_attention(cache, 0), td.source_shares(cache, 0, layer=1)]
    else:
        d = td.decompose(model, tokens, granularity="source", layer=1)
        rows = [i for i, label in enumerate(d.labels) if label.startswith("L0H")]
        out = [d.factors[rows].norm(dim=-1), d.shares()[rows]]
    peak = kib("VmHWM") - before
result = sum(t.numel() * t.element_size() for t in out) / 2**20
print(json.dumps(dict(peak_mib=peak / 1024, results_mib=result)))
"""


def measure(heads: int, method: str) -> dict:
    code = CHILD.format(heads=heads, method=method, d_model=D_MODEL, batch=BATCH, pos=POS)
    # A fixed mmap threshold: glibc's default raises it after the first large free, after
    # which freed temporaries stay resident and the high-water mark shows the heap's history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    stack = {h: h * POS * POS * D_MODEL * BATCH * 8 / 2**20 for h in HEADS}
    print(f"batch {BATCH} x {POS} tokens, d_model {D_MODEL}, float64, one block")
    print(
        f"{'heads':>5} {'stack MiB':>10} {'materialised':>13} {'streamed':>9} "
        f"{'results':>8} {'streamed - results':>19} {'ratio':>6}"
    )
    rows = []
    for h in HEADS:
        full, streamed = measure(h, "materialised"), measure(h, "streamed")
        extra = streamed["peak_mib"] - streamed["results_mib"]
        ratio = full["peak_mib"] / max(streamed["peak_mib"], 1e-9)
        rows.append(dict(heads=h, materialised=full, streamed=streamed))
        print(
            f"{h:>5} {stack[h]:>10.1f} {full['peak_mib']:>13.1f} {streamed['peak_mib']:>9.1f} "
            f"{streamed['results_mib']:>8.1f} {extra:>19.1f} {ratio:>5.0f}x"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
