"""The probes of `tl_decomp.probing`, on plain tensors: splits, batched training, k-NN, F1.

Every function takes one tensor per split, ``[subset occurrence d]``: the 15 subsets' probes
are trained side by side as one batched model. Each subset has its own parameters and its own
loss term, and Adam updates every parameter on its own, so this is exactly 15 independent
probes in one pass (and the same seed gives the same parameters).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_decomp.decompose import KINDS

SUBSETS = tuple("+".join(c) for r in range(1, 5) for c in itertools.combinations(KINDS, r))


def subset_names(subsets: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical subset names (``"h+i"`` -> ``"i+h"``), in the paper's i, h, f, c order."""
    if subsets == "all":
        return SUBSETS
    out = []
    for s in [subsets] if isinstance(subsets, str) else subsets:
        parts = s.split("+")
        if any(p not in KINDS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"bad subset {s!r}: join distinct terms of i, h, f, c with '+'")
        out.append("+".join(sorted(parts, key=KINDS.index)))
    if not out:
        raise ValueError("no subsets given")
    return tuple(dict.fromkeys(out))


def selector(subsets: Sequence[str]) -> Float[Tensor, "subset factor"]:
    """0/1 rows: which of i, h, f, c each subset sums."""
    return torch.tensor([[float(k in s.split("+")) for k in KINDS] for s in subsets])


def split(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Occurrence indices for train / validation / test, 80/10/10, shuffled by `seed`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = round(0.8 * n), round(0.1 * n)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def _init(probe: str, shape: tuple[int, int, int], hidden: int, gen) -> list[Tensor]:
    S, d, C = shape
    if probe == "linear":  # convex: start from zero
        params = [torch.zeros(S, d, C), torch.zeros(S, 1, C)]
    else:  # PyTorch's nn.Linear initialisation, drawn from the seed's generator

        def u(*shape: int, fan: int) -> Tensor:
            return (torch.rand(*shape, generator=gen) * 2 - 1) / fan**0.5

        params = [u(S, d, hidden, fan=d), u(S, 1, hidden, fan=d)]
        params += [u(S, hidden, C, fan=hidden), u(S, 1, C, fan=hidden)]
    return [p.requires_grad_() for p in params]


def _forward(params: list[Tensor], x: Float[Tensor, "subset n d"]) -> Tensor:
    for k in range(0, len(params) - 2, 2):
        x = torch.relu(torch.baddbmm(params[k + 1], x, params[k]))
    return torch.baddbmm(params[-1], x, params[-2])


def fit_predict(probe, x_tr, y_tr, x_va, y_va, x_te, n_classes, seed, opts) -> Tensor:
    """Train the batched probe; keep each subset's epoch with the lowest validation loss."""
    if probe == "knn":
        return _knn(x_tr, y_tr, x_te, n_classes)
    mu, sd = x_tr.mean(1, keepdim=True), x_tr.std(1, keepdim=True).clamp_min(1e-6)
    x_tr, x_va, x_te = ((x - mu) / sd for x in (x_tr, x_va, x_te))
    S, gen = x_tr.shape[0], torch.Generator().manual_seed(seed)
    params = _init(probe, (S, x_tr.shape[2], n_classes), opts["hidden"], gen)
    opt = torch.optim.Adam(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    best, best_loss, stale = [p.detach().clone() for p in params], torch.full((S,), torch.inf), 0
    for _ in range(opts["max_epochs"]):
        for idx in torch.randperm(len(y_tr), generator=gen).split(opts["minibatch"]):
            opt.zero_grad()
            logits = einops.rearrange(_forward(params, x_tr[:, idx]), "s n c -> (s n) c")
            target = einops.repeat(y_tr[idx], "n -> (s n)", s=S)
            (F.cross_entropy(logits, target, reduction="sum") / len(idx)).backward()
            opt.step()
        with torch.no_grad():
            logits = einops.rearrange(_forward(params, x_va), "s n c -> s c n")
            target = einops.repeat(y_va, "n -> s n", s=S)
            loss = F.cross_entropy(logits, target, reduction="none").mean(1)
            better = loss < best_loss * (1 - 1e-3)  # stalls count as no improvement
            for b, p in zip(best, params, strict=True):
                b[better] = p[better]
        best_loss, stale = torch.where(better, loss, best_loss), 0 if better.any() else stale + 1
        if stale >= opts["patience"]:
            break
    with torch.no_grad():
        return _forward(best, x_te).argmax(-1)


def _knn(x_tr, y_tr, x_te, n_classes: int, k: int = 5) -> Tensor:
    """Majority vote of the k most cosine-similar training occurrences (ties: the nearer)."""
    a, q = F.normalize(x_tr, dim=-1), F.normalize(x_te, dim=-1)
    k = min(k, a.shape[1])
    rank_weight = 1 + 1e-3 * torch.arange(k, 0, -1)  # < 1 vote in total: breaks ties only
    chunk = max(1, 2**24 // (a.shape[0] * a.shape[1]))
    out = []
    for start in range(0, q.shape[1], chunk):
        sim = torch.einsum("sqd,snd->sqn", q[:, start : start + chunk], a)
        votes = F.one_hot(y_tr[sim.topk(k, dim=-1).indices], n_classes) * rank_weight[:, None]
        out.append(votes.sum(2).argmax(-1))
    return torch.cat(out, 1)


def macro_f1(pred: Int[Tensor, "subset n"], y: Int[Tensor, " n"], n_classes: int) -> Tensor:
    """Mean F1 over the classes that occur in the truth or the predictions (sklearn's)."""
    p, t = F.one_hot(pred, n_classes).bool(), F.one_hot(y, n_classes).bool()[None]
    tp, fp, fn = (p & t).sum(1), (p & ~t).sum(1), (~p & t).sum(1)
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), 0.0)
    return f1.sum(1) / (denom > 0).sum(1)
