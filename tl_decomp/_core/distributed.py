"""Data-parallel corpus loops on `torch.distributed`: the one place that knows about ranks.

Launch a script with ``torchrun --nproc_per_node=N`` (or ``accelerate launch``) and
initialise a process group; every corpus function then reads only its rank's share of the
batches and merges its accumulators with the other ranks' before it returns. Without an
initialised group (the usual case) every helper here is the identity, so one process runs
exactly as before.

Contract of a data-parallel function:

- Batches are cut once, from the whole corpus (texts sorted by length, so a batch pads
  little), and dealt to ranks; the batches are the same whatever the world size, only who
  computes them changes.
- Accumulators merge exactly: sums and counts by all-reduce in float64 / int64, means and
  variances by Chan et al.'s parallel formula applied in rank order, per-text results
  gathered back into corpus order. Results equal the single-process ones up to the order
  of floating-point additions (about 1e-15 relative).
- Every rank returns the same, complete result; printing is rank 0's job (`is_main`).
- A rank that raises does not leave the others waiting in a collective: `guard` agrees on
  failure first, and every rank raises. A rank that dies or hangs outside Python's control
  (killed, stuck in a kernel) is torchrun's to tear down.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def active() -> bool:
    """Whether a `torch.distributed` process group is initialised (with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes share the corpus; 1 without a process group."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints and writes files: rank 0, or the only process."""
    return rank() == 0


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (stable: ties keep corpus order), cut into batches.

    Example:
        >>> length_batches([5, 1, 3, 1], 2)
        [[1, 3], [2, 0]]
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def deal(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's share of `items` (batches), with each one's index in `items`.

    Dealt like cards, back and forth (ranks 0, 1, 1, 0, 0, 1, ...): on length-sorted batches
    every rank gets long and short ones, so the ranks finish together.

    Example:
        >>> deal(["a", "b", "c"])  # one process: everything
        [(0, 'a'), (1, 'b'), (2, 'c')]
    """
    n, r = world_size(), rank()
    return [(i, x) for i, x in enumerate(items) if _owner(i, n) == r]


def undeal(mine: Sequence[T]) -> list[T]:
    """Every rank's per-batch results (one per batch `deal` gave it, in order), put back in
    the order of the batches `deal` was given: the inverse of `deal`, on every rank.

    Example:
        >>> undeal(["a", "b"])
        ['a', 'b']
    """
    if not active():
        return list(mine)
    gathered = all_gather(list(mine))
    n, per_rank = world_size(), [iter(x) for x in gathered]
    total = sum(len(x) for x in gathered)
    return [next(per_rank[_owner(i, n)]) for i in range(total)]


def _owner(i: int, n: int) -> int:
    turn, k = divmod(i, n)
    return k if turn % 2 == 0 else n - 1 - k


@contextmanager
def guard() -> Iterator[None]:
    """Run this rank's share of the work; if any rank raised, every rank raises.

    Enter it around everything between the start of a data-parallel call and its first
    collective merge: the ranks agree on failure (one small all-gather) before they merge,
    so an error on one rank (a text too long, a NaN) cannot leave the others waiting. The
    rank that failed re-raises its own error; the others raise `RuntimeError` naming it.
    """
    if not active():
        yield
        return
    try:
        yield
    except BaseException as err:
        _agree(f"{type(err).__name__}: {err}")
        raise
    failed = [(r, e) for r, e in enumerate(_agree(None)) if e is not None]
    if failed:
        r, e = failed[0]
        raise RuntimeError(f"rank {r} failed: {e}")


def _agree(error: str | None) -> list[str | None]:
    return all_gather(error)


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable; tensors on the CPU), in rank order.

    Example:
        >>> all_gather({"n": 3})
        [{'n': 3}]
    """
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(t: Tensor) -> Tensor:
    """The elementwise sum of `t` over ranks, on `t`'s device and in its dtype.

    Sum floats in float64 (and counts in int64) for a merge that is exact to rounding.
    """
    if not active():
        return t
    on = _backend_device()
    buf = t.detach().to(on, copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_max(x: float) -> float:
    """The largest of every rank's `x`."""
    return max(all_gather(float(x)))


def _backend_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors everywhere."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def from_environment() -> Iterator[None]:
    """Inside `torchrun` (``RANK`` and ``WORLD_SIZE`` set) with no process group yet: start
    one (NCCL with CUDA, gloo without, each rank on GPU ``LOCAL_RANK``), destroy it on exit.
    Elsewhere, do nothing."""
    env = os.environ
    if not dist.is_available() or dist.is_initialized() or not {"RANK", "WORLD_SIZE"} <= set(env):
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def threads_per_rank(cores: int | None = None) -> int:
    """CPU threads each rank should use so the ranks on one machine share its cores."""
    cores = cores or os.cpu_count() or 1
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    return max(1, cores // max(per_machine, 1))


__all__ = [
    "active",
    "all_gather",
    "all_max",
    "all_sum",
    "deal",
    "from_environment",
    "guard",
    "is_main",
    "length_batches",
    "rank",
    "undeal",
    "world_size",
]
