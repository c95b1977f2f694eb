"""The maps ``g_l: e^l -> e^0`` of `tl_decomp.identifiability`, fitted on streamed batches.

``linear`` with ``loss="mse"`` is least squares with a bias from normal equations accumulated
in float64, so the training split never has to be held in memory; ``linear`` with
``loss="cosine"`` (the paper's protocol for a cosine lookup) and ``mlp`` keep at most a fixed
number of training tokens and train by Adam. Every map is an ``nn.Module`` applied to
``[... d_model]`` vectors.

A map fitted on few tokens for its size overfits (MiniLM, linear map, layer 6: 0.43 on 20
sentences, below the naive map's 0.83): `fit_maps` warns below `MIN_TOKENS_PER_PARAMETER`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_decomp._core import distributed

Mapping = Literal["naive", "linear", "mlp"]
Distance = Literal["cosine", "l2"]
Loss = Literal["mse", "cosine"]

# Training values (tokens x d_model targets) per parameter below which a map is flagged.
# MiniLM, linear map, layer 6 (README): 0.43 at 1.2x (below the naive map's 0.83), 0.88 at
# 2.1x, 0.97 from 4.4x on.
MIN_TOKENS_PER_PARAMETER = 5


def default_loss(mapping: Mapping, distance: Distance) -> Loss | None:
    """``linear``: least squares (closed form, streamed); ``mlp``: the lookup's own distance
    (Brunner et al.'s protocol); ``naive`` fits nothing."""
    if mapping == "naive":
        return None
    if mapping == "linear":
        return "mse"
    return "cosine" if distance == "cosine" else "mse"


def parameters(mapping: Mapping, d_model: int) -> int:
    """Trainable parameters of one map ``d_model -> d_model``."""
    if mapping == "naive":
        return 0
    per_layer = (d_model + 1) * d_model  # weight and bias
    return per_layer if mapping == "linear" else 2 * per_layer  # mlp: two layers of width d


def small_sample(mapping: Mapping, d_model: int, tokens: int) -> bool:
    """Fewer training values (``tokens * d_model``) than `MIN_TOKENS_PER_PARAMETER` times
    the map's parameters."""
    return mapping != "naive" and tokens * d_model < MIN_TOKENS_PER_PARAMETER * parameters(
        mapping, d_model
    )


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


def map_loss(pred: Tensor, target: Tensor, loss: Loss) -> Tensor:
    """Mean ``1 - cos(pred, target)`` or mean squared error per coordinate."""
    if loss == "cosine":
        return 1 - nn.functional.cosine_similarity(pred, target, dim=-1).mean()
    return (pred - target).pow(2).mean()


def _mlp(x: Tensor, y: Tensor, seed: int) -> nn.Module:
    """One hidden layer (width d_model, GELU). Inputs are standardised and outputs start at the
    targets' mean and scale (both folded into the weights)."""
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
    return nn.Sequential(first, nn.GELU(), last)


def _least_squares(x: Tensor, y: Tensor) -> nn.Sequential:
    """The least-squares map on standardised inputs (Adam's steps are then alike for every
    input dimension), as ``Sequential(fixed standardisation, Linear)``."""
    mean, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    fit = LinearFit()
    fit.add((x - mean) / sd, y)
    scale = nn.Linear(x.shape[1], x.shape[1]).to(x).requires_grad_(False)
    with torch.no_grad():
        scale.weight.copy_(torch.diag(1 / sd))
        scale.bias.copy_(-mean / sd)
    return nn.Sequential(scale, fit.fit().requires_grad_(True))


def _fold(net: nn.Module) -> nn.Linear:
    """``Sequential(standardisation, Linear)`` as one ``nn.Linear``."""
    scale, lin = (m for m in net.children() if isinstance(m, nn.Linear))
    out = nn.Linear(lin.in_features, lin.out_features).to(lin.weight).requires_grad_(False)
    out.weight.copy_(lin.weight @ scale.weight)
    out.bias.copy_(lin.weight @ scale.bias + lin.bias)
    return out


def train_map(
    x: Tensor,
    y: Tensor,
    xv: Tensor,
    yv: Tensor,
    mapping: Mapping,
    loss: Loss,
    seed: int,
    max_epochs: int = 50,
    patience: int = 2,
) -> nn.Module:
    """The ``mlp`` map, or the ``linear`` map trained under `loss`: Adam, early stopping on
    the validation loss; an "epoch" is at least 10 steps, so small training sets still fit.

    The linear map starts at the least-squares fit of the same sample and keeps it unless a
    step lowers the validation loss, so under ``cosine`` it is never worse on the validation
    tokens than least squares.
    """
    net = _mlp(x, y, seed) if mapping == "mlp" else _least_squares(x, y)
    # Adam moves every weight by about lr: the linear map starts at its optimum's scale
    weight = next(p for p in net.parameters() if p.requires_grad)  # the linear map's W
    lr = 1e-3 if mapping == "mlp" else 1e-2 * float(weight.detach().pow(2).mean().sqrt())
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = max(-(-len(x) // 256), 10)
    best, best_state, bad = float("inf"), net.state_dict(), 0
    if mapping == "linear":
        with torch.no_grad():
            best = map_loss(net(xv), yv, loss).item()
        best_state = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(max_epochs):
        for _ in range(steps):
            idx = torch.randint(len(x), (min(256, len(x)),), generator=gen)
            opt.zero_grad()
            map_loss(net(x[idx]), y[idx], loss).backward()
            opt.step()
        with torch.no_grad():
            val = map_loss(net(xv), yv, loss).item()
        if val < best * (1 - 1e-3):  # a 0.1% gain counts as progress
            best, bad, best_state = val, 0, {k: v.clone() for k, v in net.state_dict().items()}
        elif (bad := bad + 1) >= patience:
            break
    net.load_state_dict(best_state)
    net = net.requires_grad_(False).eval()
    return _fold(net) if mapping == "linear" else net


def fit_maps(
    train: Iterable[Any],  # identifiability.StateBatch (imports this module)
    n_layers: int,
    mapping: Mapping,
    loss: Loss | None,
    seed: int,
    max_mlp_tokens: int,
) -> tuple[tuple[nn.Module, ...], int]:
    """The maps, one per layer, and the number of training tokens they were fitted on (the
    stored sample for a trained map); warns when that is small for the map's size."""
    if mapping == "naive":
        return tuple(nn.Identity() for _ in range(n_layers)), 0
    closed_form = mapping == "linear" and loss == "mse"
    if not closed_form and distributed.active():
        raise NotImplementedError(
            f"mapping={mapping!r} with loss={loss!r} is not data-parallel (its training sample "
            "is one stream's): run it in one process, or use the linear map with loss='mse'"
        )
    linear = [LinearFit() for _ in range(n_layers)]
    stored = StoredPairs(max_mlp_tokens, seed)
    with distributed.guard():
        for batch in train:
            m = batch.mask.bool()
            if closed_form:
                for k in range(n_layers):
                    linear[k].add(batch.states[k][m], batch.e0[m])
            else:
                stored.add(batch.states, batch.e0, batch.mask)
    if closed_form:
        for lin in linear:
            lin.all_reduce()
        if linear[0].gram is None:
            raise ValueError("the training split holds no tokens")
        maps: tuple[nn.Module, ...] = tuple(lin.fit() for lin in linear)
        _warn_if_small(mapping, linear[0].gram.shape[0] - 1, int(linear[0].gram[-1, -1]))
        return maps, int(linear[0].gram[-1, -1])  # the bias column's sum: the token count
    if not stored.train.seen or not stored.val.seen:
        raise ValueError(
            f"the {mapping} map with loss={loss!r} needs at least 10 training sequences "
            "(every 10th validates)"
        )
    assert loss is not None
    x, y = stored.train.pairs()
    xv, yv = stored.val.pairs()
    _warn_if_small(mapping, x.shape[-1], x.shape[1])
    maps = tuple(train_map(x[k], y, xv[k], yv, mapping, loss, seed + k) for k in range(n_layers))
    return maps, x.shape[1]


def _warn_if_small(mapping: Mapping, d_model: int, tokens: int) -> None:
    if small_sample(mapping, d_model, tokens):
        need = -(-MIN_TOKENS_PER_PARAMETER * parameters(mapping, d_model) // d_model)
        warnings.warn(
            f"the {mapping} map has {parameters(mapping, d_model):,} parameters per layer and "
            f"was fitted on {tokens:,} training tokens ({tokens * d_model:,} target values), "
            f"fewer than {MIN_TOKENS_PER_PARAMETER}x its parameters: it may overfit and score "
            f"below the naive map. Pass a corpus with at least {need:,} training tokens.",
            stacklevel=4,
        )
