"""The maps ``g_l: e^l -> e^0`` of `tl_decomp.identifiability`, fitted on streamed batches.

``linear`` is least squares with a bias from normal equations accumulated in float64, so the
training split never has to be held in memory; ``mlp`` keeps at most a fixed number of
training tokens. Every map is an ``nn.Module`` applied to ``[... d_model]`` vectors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_decomp._core import distributed

Mapping = Literal["naive", "linear", "mlp"]
Distance = Literal["cosine", "l2"]


class LinearFit:
    """Streamed least squares with bias, ``e0 ~ [x, 1] @ W``: the minimum-norm, rank-aware fit.

    Normal equations of ``[x - shift, 1]`` are accumulated in float64 (memory ``d_model^2``
    whatever the corpus size) and solved by eigendecomposition. Hidden states are often
    rank-deficient (MiniLM's post-LN last layer: condition ~1e22), and ``lstsq`` on the
    normal equations missed the least-squares optimum there by 80% in residual. Directions whose
    singular value is below ``cols * eps(x.dtype)`` of the largest carry only the states'
    rounding noise and are dropped, as ``pinv`` does; the weights stay small enough to apply in
    the model's own precision.
    """

    def __init__(self) -> None:
        self.gram: Tensor | None = None

    def add(self, x: Float[Tensor, "n d_model"], y: Float[Tensor, "n d_model"]) -> None:
        if self.gram is None:  # centring on the first batch keeps the bias column well scaled
            self.shift = x.mean(0, keepdim=True)
            self.gram = x.new_zeros((x.shape[1] + 1,) * 2, dtype=torch.float64)
            self.cross = x.new_zeros((x.shape[1] + 1, y.shape[1]), dtype=torch.float64)
        xt = torch.cat([x - self.shift, torch.ones_like(x[:, :1])], 1).double()
        self.gram += xt.T @ xt
        self.cross += xt.T @ y.double()

    def all_reduce(self) -> None:
        """Sum every rank's normal equations (identity in one process).

        Each rank centred on its own first batch; all are re-centred on the pooled mean of
        ``x`` first (rounded to ``x``'s dtype, the dtype `fit` applies the shift in), by the
        exact change of variables ``[x - s', 1] = [x - s, 1] @ A``, ``A = [[I, 0], [s - s', 1]]``.
        """
        if not distributed.active():
            return
        meta = [m for m in distributed.all_gather(self._meta()) if m is not None]
        if not meta:
            return  # no rank has training rows
        (d_in, d_out, dtype), device = meta[0], _device(self)
        if self.gram is None:
            self.shift = torch.zeros((1, d_in), dtype=dtype, device=device)
            self.gram = torch.zeros((d_in + 1,) * 2, dtype=torch.float64, device=device)
            self.cross = torch.zeros((d_in + 1, d_out), dtype=torch.float64, device=device)
        shift = self.shift.double()[0]
        sums = torch.cat([self.gram[-1, :-1] + self.gram[-1, -1] * shift, self.gram[-1, -1:]])
        sums = distributed.all_sum(sums)
        pooled = (sums[:-1] / sums[-1]).to(dtype)
        A = torch.eye(d_in + 1, dtype=torch.float64, device=device)
        A[-1, :-1] = shift - pooled.double()
        self.gram = distributed.all_sum(A.T @ self.gram @ A)
        self.cross = distributed.all_sum(A.T @ self.cross)
        self.shift = pooled[None]

    def _meta(self) -> tuple[int, int, torch.dtype] | None:
        if self.gram is None:
            return None
        return self.gram.shape[0] - 1, self.cross.shape[1], self.shift.dtype

    def fit(self) -> nn.Linear:
        assert self.gram is not None, "no training rows"
        lam, V = torch.linalg.eigh(self.gram)  # lam = singular values of [x, 1], squared
        tol = self.gram.shape[0] * torch.finfo(self.shift.dtype).eps
        keep = lam > lam.max() * tol**2
        W = (V[:, keep] @ ((V[:, keep].T @ self.cross) / lam[keep, None])).to(self.shift.dtype)
        d_in, d_out = W.shape[0] - 1, W.shape[1]
        lin = nn.Linear(d_in, d_out, dtype=W.dtype, device=W.device).requires_grad_(False)
        lin.weight.copy_(W[:-1].T)
        lin.bias.copy_(W[-1] - (self.shift @ W[:-1])[0])
        return lin


def _device(fit: LinearFit) -> torch.device:
    return torch.device("cpu") if fit.gram is None else fit.gram.device


class _Reservoir:
    """A uniform random sample of at most `cap` token pairs from a stream (Algorithm R)."""

    def __init__(self, cap: int, gen: torch.Generator) -> None:
        self.cap, self.seen, self.gen = cap, 0, gen
        self.x: Tensor | None = None  # [layer cap d_model]
        self.y: Tensor | None = None  # [cap d_model]

    def add(self, x: Tensor, y: Tensor) -> None:
        """`x` [layer n d_model], `y` [n d_model]: n more tokens."""
        if self.x is None:
            self.x = x.new_empty((x.shape[0], self.cap, x.shape[-1]))
            self.y = y.new_empty((self.cap, y.shape[-1]))
        assert self.y is not None
        for i in range(y.shape[0]):
            slot = (
                self.seen
                if self.seen < self.cap
                else int(torch.randint(self.seen + 1, (1,), generator=self.gen))
            )
            if slot < self.cap:
                self.x[:, slot], self.y[slot] = x[:, i], y[i]
            self.seen += 1

    def pairs(self) -> tuple[Tensor, Tensor]:
        n = min(self.seen, self.cap)
        assert self.x is not None and self.y is not None
        return self.x[:, :n], self.y[:n]


class StoredPairs:
    """Training pairs for the MLP map: a uniform sample of at most `cap` training tokens
    (the training split comes sorted by length: keeping the first tokens would train on the
    shortest sentences only), and of `cap // 10` from every 10th sequence, which validates."""

    def __init__(self, cap: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.train = _Reservoir(cap, gen)
        self.val = _Reservoir(max(cap // 10, 1), gen)
        self.sequences = 0

    def add(self, x: Tensor, y: Tensor, mask: Tensor) -> None:
        for b in range(mask.shape[0]):
            m = mask[b].bool()
            target = self.val if self.sequences % 10 == 9 else self.train
            target.add(x[:, b][:, m], y[b][m])
            self.sequences += 1


def train_mlp(
    x: Tensor,
    y: Tensor,
    xv: Tensor,
    yv: Tensor,
    distance: Distance,
    seed: int,
    max_epochs: int = 50,
    patience: int = 2,
) -> nn.Module:
    """One hidden layer (width d_model, GELU); Adam; early stopping on the validation loss.

    Inputs are standardised and outputs start at the targets' mean and scale (both folded
    into the weights); an "epoch" is at least 10 steps, so small training sets still fit.
    """
    d = x.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        first, last = nn.Linear(d, d).to(x), nn.Linear(d, y.shape[1]).to(x)
    with torch.no_grad():
        sd = x.std(0).clamp_min(1e-6)
        first.weight /= sd
        first.bias -= first.weight @ x.mean(0)
        last.weight *= y.std(0)[:, None]
        last.bias.copy_(y.mean(0))
    net = nn.Sequential(first, nn.GELU(), last)

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        if distance == "cosine":
            return 1 - nn.functional.cosine_similarity(pred, target, dim=-1).mean()
        return (pred - target).pow(2).mean()

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    steps = max(-(-len(x) // 256), 10)
    best, best_state, bad = float("inf"), net.state_dict(), 0
    for _ in range(max_epochs):
        for _ in range(steps):
            idx = torch.randint(len(x), (min(256, len(x)),), generator=gen)
            opt.zero_grad()
            loss(net(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            val = loss(net(xv), yv).item()
        if val < best * (1 - 1e-3):  # a 0.1% gain counts as progress
            best, bad, best_state = val, 0, {k: v.clone() for k, v in net.state_dict().items()}
        elif (bad := bad + 1) >= patience:
            break
    net.load_state_dict(best_state)
    return net.requires_grad_(False).eval()


def fit_maps(
    train: Iterable[Any],  # identifiability.StateBatch (imports this module)
    n_layers: int,
    mapping: Mapping,
    distance: Distance,
    seed: int,
    max_mlp_tokens: int,
) -> tuple[nn.Module, ...]:
    if mapping == "naive":
        return tuple(nn.Identity() for _ in range(n_layers))
    if mapping == "mlp" and distributed.active():
        raise NotImplementedError(
            "mapping='mlp' is not data-parallel (its training sample is one stream's): run "
            "it in one process, or use mapping='linear' or 'naive'"
        )
    linear = [LinearFit() for _ in range(n_layers)]
    stored = StoredPairs(max_mlp_tokens, seed)
    with distributed.guard():
        for batch in train:
            m = batch.mask.bool()
            if mapping == "linear":
                for k in range(n_layers):
                    linear[k].add(batch.states[k][m], batch.e0[m])
            else:
                stored.add(batch.states, batch.e0, batch.mask)
    if mapping == "linear":
        for lin in linear:
            lin.all_reduce()
        if linear[0].gram is None:
            raise ValueError("the training split holds no tokens")
        return tuple(lin.fit() for lin in linear)
    if not stored.train.seen or not stored.val.seen:
        raise ValueError("the mlp map needs at least 10 training sequences (every 10th validates)")
    x, y = stored.train.pairs()
    xv, yv = stored.val.pairs()
    return tuple(train_mlp(x[k], y, xv[k], yv, distance, seed + k) for k in range(n_layers))
