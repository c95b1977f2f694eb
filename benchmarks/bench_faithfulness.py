"""Is it faithful? Deletion curves and AOPC for next-token prediction on SmolLM2-135M.

For each of N sentences of the shipped corpus (8 to 24 tokens; default N = 200), the model's
own prediction ``y`` at the last position is explained by each method as a score per context
token (every position before the last). The top ``f`` of the context tokens by score are
deleted (the sequence is shortened, as in DecompX's and ALTI's deletion protocol), for
``f`` in 10 .. 50 %, and the drop in ``log p(y)`` at the last position is measured. AOPC is
the mean drop over fractions and sentences; higher means the method found the tokens the
prediction rests on.

Methods:

- ``token logit``: ours, `td.token_logit_attribution` (each token's exact direct logit of
  ``y``, granularity ``token``), signed: most supportive first;
- ``HTA``: Hidden Token Attribution at the last layer, row of the last position (estimate,
  8 probes; on the first ``--hta`` sentences only: ~4 s a sentence on this CPU);
- ``attention``: raw attention of the last block, mean over heads, row of the last position;
- ``rollout``: attention rollout (Abnar & Zuidema 2020): ``0.5 A + 0.5 I`` per block, heads
  averaged, rows renormalised, multiplied through the blocks;
- ``grad x input``: ``<d log p(y) / d x_k, x_k>`` on Hugging Face's own model;
- ``random``: a seeded random order.

Run: ``python benchmarks/bench_faithfulness.py [N] [--hta M]`` (float32; the 6 x 5 deletion
runs per sentence and HTA's probes are the cost: 421 s for N = 200, M = 40 on two quiet
cores, far longer on a shared machine). ``demos/07_faithfulness.ipynb`` runs the same at
N = 16, M = 4.
"""

from __future__ import annotations

import argparse
import time

import torch

import tl_decomp as td

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


def scores(model, ids: torch.Tensor, y: int, with_hta: bool, gen: torch.Generator) -> dict:
    """Each method's score per context token (positions 0 .. n-2)."""
    n = ids.shape[1]
    out = {"token logit": td.token_logit_attribution(model, ids, y).values[: n - 1, 0, 0]}
    if with_hta:
        a = td.hidden_token_attribution(model, ids, layers=[-1], method="estimate", n_probes=8)
        out["HTA"] = a.contributions[0, 0, n - 1, : n - 1]
    _, cache = model.run_with_cache(ids, names_filter=lambda h: h.endswith("hook_pattern"))
    pats = [cache[f"blocks.{L}.attn.hook_pattern"][0].mean(0) for L in range(model.cfg.n_layers)]
    out["attention"] = pats[-1][n - 1, : n - 1]
    roll = torch.eye(n, dtype=pats[0].dtype)
    for a in pats:
        a = 0.5 * a + 0.5 * torch.eye(n, dtype=a.dtype)
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    out["rollout"] = roll[n - 1, : n - 1]
    hf = model.original_model
    emb = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
    logp = hf(inputs_embeds=emb).logits[0, -1].log_softmax(-1)[y]
    (grad,) = torch.autograd.grad(logp, emb)
    out["grad x input"] = (grad * emb).sum(-1)[0, : n - 1].detach()
    out["random"] = torch.rand(n - 1, generator=gen)
    return out


def drops(model, ids: torch.Tensor, y: int, lp0: float, score: torch.Tensor) -> list[float]:
    """``log p(y)`` lost when the top fraction of context tokens by `score` is deleted."""
    n = ids.shape[1]
    order = score.argsort(descending=True).tolist()
    seqs = []
    for f in FRACTIONS:
        gone = set(order[: max(1, round(f * (n - 1)))])
        seqs.append([t for k, t in enumerate(ids[0].tolist()) if k not in gone])
    width = max(map(len, seqs))
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for r, s in enumerate(seqs):
        batch[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        logits = model(batch, attention_mask=mask)
    last = mask.sum(1) - 1
    lp = logits[torch.arange(len(seqs)), last].log_softmax(-1)[:, y]
    return (lp0 - lp).tolist()


def sentences(model, n: int) -> list[torch.Tensor]:
    """The first `n` corpus sentences of 8 to 24 tokens, as ids ``[1, pos]``."""
    out = []
    for s in td.load_corpus():
        ids = model.tokenizer(s, return_tensors="pt")["input_ids"]
        if 8 <= ids.shape[1] <= 24:
            out.append(ids)
        if len(out) == n:
            break
    return out


def evaluate(model, texts: list[torch.Tensor], hta: int) -> dict[str, torch.Tensor]:
    """Each method's drops ``[sentence, fraction]`` (HTA on the first `hta` sentences only)."""
    gen = torch.Generator().manual_seed(0)
    curves: dict[str, list[list[float]]] = {}
    for i, ids in enumerate(texts):
        with torch.no_grad():
            lsm = model(ids)[0, -1].log_softmax(-1)
        y = int(lsm.argmax())
        for name, score in scores(model, ids, y, i < hta, gen).items():
            curves.setdefault(name, []).append(drops(model, ids, y, lsm[y].item(), score))
    return {name: torch.tensor(rows) for name, rows in curves.items()}


def table(curves: dict[str, torch.Tensor], first: int | None = None) -> str:
    """Mean drop per fraction and AOPC per method (over the first `first` sentences), best first."""
    rows = {name: t[:first].mean(0) for name, t in curves.items()}
    lines = [f"{'method':14s}" + "".join(f"{f:>8.0%}" for f in FRACTIONS) + f"{'AOPC':>8s}"]
    for name, m in sorted(rows.items(), key=lambda kv: -kv[1].mean()):
        lines.append(f"{name:14s}" + "".join(f"{v:8.3f}" for v in m) + f"{m.mean():8.3f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("n", nargs="?", type=int, default=200)
    p.add_argument("--hta", type=int, default=40, help="sentences HTA also runs on")
    args = p.parse_args()
    torch.manual_seed(0)
    model = td.load_model("smollm2", dtype=torch.float32)  # the deletion runs are the cost
    texts = sentences(model, args.n)
    t0 = time.perf_counter()
    curves = evaluate(model, texts, args.hta)
    seconds = time.perf_counter() - t0
    print(f"SmolLM2-135M, next-token prediction, {len(texts)} corpus sentences (8-24 "
          f"tokens), {seconds:.0f} s")  # fmt: skip
    print("\nmean drop in log p(y) after deleting the top f of the context")
    print(f"\nall {len(texts)} sentences (HTA: its {args.hta}):")
    print(table(curves))
    print(f"\nthe first {args.hta} (HTA's subset):")
    print(table(curves, args.hta))


if __name__ == "__main__":
    main()
