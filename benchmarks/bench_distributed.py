"""Data-parallel throughput of `corpus_statistics` (issue 14, item 5).

Tokens per second for ``corpus_statistics(granularity="head")`` on SmolLM2 over the shipped
corpus, with 1 and with N processes (``torchrun``; gloo on the CPU, NCCL on GPUs), and the
ratio. On the CPU each process gets ``cores // N`` threads, so the runs share the machine
rather than oversubscribe it; on GPUs each rank takes GPU ``LOCAL_RANK`` (N defaults to
the GPU count there, 2 on the CPU; one GPU runs one process only). The clock runs from a
barrier after a warm-up batch to a barrier after the merge: model loading is not timed.
The load average is printed with the figures: on a shared machine they move with it.

Run: ``python benchmarks/bench_distributed.py [--sentences 96] [--batch-size 8]
[--procs 1,2] [--threads N]``; it launches itself under ``torchrun`` once per process count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from tl_decomp._core import distributed
    from tl_decomp.datasets import load_corpus
    from tl_decomp.decomposition import corpus_statistics
    from tl_decomp.models import load_model

    torch.set_num_threads(args.threads or distributed.threads_per_rank())
    texts = load_corpus(args.sentences)
    with distributed.from_environment():
        cuda = torch.cuda.is_available()
        device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
        model = load_model(args.model, device=device)

        def run(corpus: list[str]) -> Any:
            return corpus_statistics(
                model, corpus, granularity="head", batch_size=args.batch_size, progress=False
            )

        run(texts[: args.batch_size])  # warm-up, untimed
        _barrier(dist, cuda)
        start = time.perf_counter()
        stats = run(texts)
        _barrier(dist, cuda)
        seconds = time.perf_counter() - start
        if distributed.is_main():
            procs, threads = distributed.world_size(), torch.get_num_threads()
            print(json.dumps(dict(procs=procs, threads=threads, device=device,
                                  tokens=stats.n_tokens, seconds=seconds)))  # fmt: skip


def _barrier(dist, cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def _launch(args: argparse.Namespace, procs: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", __file__, "--worker", "--model", args.model,
           "--sentences", str(args.sentences), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # torchrun would force 1; the worker sets its own
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        sys.exit(f"{procs} process(es) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sentences", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--procs", default=None, help="process counts, e.g. 1,2 (1,GPUs or 1,2)")
    p.add_argument("--threads", type=int, default=0, help="threads a process (cores // N)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args)
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 2  # NCCL: a GPU a rank
    counts = [int(c) for c in (args.procs or ("1" if n == 1 else f"1,{n}")).split(",")]
    print(f"{args.model}, head granularity, {args.sentences} sentences, batch {args.batch_size};"
          f" {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
    runs = [_launch(args, c) for c in counts]
    for r in runs:
        rate = r["tokens"] / r["seconds"]
        print(f"{r['procs']} process(es) x {r['threads']} thread(s) on {r['device']}: "
              f"{r['tokens']} tokens in {r['seconds']:.1f} s = {rate:.1f} tokens/s")  # fmt: skip
    base = runs[0]["tokens"] / runs[0]["seconds"]
    for r in runs[1:]:
        ratio = r["tokens"] / r["seconds"] / base
        print(f"scaling {runs[0]['procs']} -> {r['procs']} processes: {ratio:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
