"""How linear each feed-forward sublayer is, over a corpus (Mickus et al. 2022, Fig. 2).

The best affine map from MLP input to MLP output is fitted from streamed sufficient
statistics, so memory is O(d_model²) per layer whatever the corpus; its R² is scored on
held-out sentences or, under the paper's protocol, in-sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_decomp import adapters
from tl_decomp._core import checks
from tl_decomp._core.results import Result


def _bounds(n: int, size: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """Batches of at most `size` texts that also end at every cut (a curve's sample size)."""
    edges = sorted({*range(0, n, size), *cuts, n})
    return list(zip(edges[:-1], edges[1:], strict=True))


@dataclass(frozen=True, repr=False)
class FFLinearity(Result):
    """R² of the best affine map from MLP input to MLP output, per layer.

    ``protocol="heldout"``: R² pooled over output dimensions, on held-out sentences;
    ``"paper"``: the mean over output dimensions of each dimension's R², in-sample (Mickus et
    al.'s ``learn_ff_lmap.py``). In-sample R² falls as the sample grows (least squares fits
    part of the noise; block 0 of MiniLM: 0.691 / 0.651 / 0.631 at 3002 / 6615 / 12877
    tokens), so an R² is quoted with its token count; `curve` holds it by sample size.

    Attributes:
        r2: per block, on all the texts.
        n_train, n_test: tokens fitted and scored (``paper``: the same tokens).
        held_out: indices of the sentences scored (``paper``: none held out).
        curve: ``[size block]``, the same R² on the first ``sizes[k]`` texts (`sizes`);
            None unless asked for.
        curve_tokens: the tokens fitted at each size.
    """

    r2: Float[Tensor, " n_layers"]
    n_train: int
    n_test: int
    held_out: tuple[int, ...]
    protocol: str = "heldout"
    curve: Float[Tensor, "size n_layers"] | None = None
    sizes: tuple[int, ...] = ()
    curve_tokens: tuple[int, ...] = ()

    def rows(self) -> list[dict[str, Any]]:
        """One record per block: ``block``, ``r2``, and ``r2 @ <tokens>`` per curve size."""
        curve = [] if self.curve is None else self.curve.T.tolist()
        return [
            {"block": L, "r2": r}
            | {f"r2 @ {n}": v for n, v in zip(self.curve_tokens, per_size, strict=True)}
            for L, (r, per_size) in enumerate(
                zip(self.r2.tolist(), curve or [[]] * len(self.r2), strict=True)
            )
        ]


class _Suff:
    """Sufficient statistics of (x, y) pairs for affine least squares and its R²."""

    def __init__(self) -> None:
        self.n = 0
        self.sx: Tensor | Any = 0.0
        self.sy: Tensor | Any = 0.0
        self.xx: Tensor | Any = 0.0
        self.xy: Tensor | Any = 0.0
        self.y2: Tensor | Any = 0.0

    def update(self, x: Tensor, y: Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx = self.sx + x.sum(0)
        self.sy = self.sy + y.sum(0)
        self.xx = self.xx + x.T @ x
        self.xy = self.xy + x.T @ y
        self.y2 = self.y2 + (y * y).sum(0)

    def copy(self) -> _Suff:
        out = _Suff()
        out.__dict__.update(self.__dict__)  # tensors are replaced, never updated in place
        return out


def _fit(train: _Suff, ridge: float) -> tuple[Tensor, Tensor]:
    """Affine least squares on standardised inputs, from sufficient statistics alone."""
    n = train.n
    mx, my = train.sx / n, train.sy / n
    cxx = train.xx / n - torch.outer(mx, mx)
    cxy = train.xy / n - torch.outer(mx, my)
    std = cxx.diagonal().clamp_min(1e-12).sqrt()
    corr = cxx / torch.outer(std, std)
    corr = corr + ridge * torch.eye(len(std), dtype=corr.dtype)
    w_std = torch.linalg.solve(corr, cxy / std[:, None])
    w = w_std / std[:, None]
    return w, my - mx @ w


def _r2(test: _Suff, w: Tensor, b: Tensor, per_dim: bool) -> float:
    """1 - SSE/SST on the test split, expanded in its sufficient statistics: pooled over
    output dimensions, or (`per_dim`) the mean of each dimension's."""
    n = test.n
    sse = (
        test.y2
        - 2 * (w * test.xy).sum(0)
        - 2 * b * test.sy
        + (w * (test.xx @ w)).sum(0)
        + 2 * b * (test.sx @ w)
        + n * b * b
    )
    sst = test.y2 - test.sy * test.sy / n
    if per_dim:
        return float((1 - sse / sst.clamp_min(1e-30)).mean())
    return float(1 - sse.sum() / sst.sum())


def ff_linearity(
    model: Any,
    texts: Sequence[str],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 16,
    ridge: float = 1e-6,
    protocol: Literal["heldout", "paper"] = "heldout",
    sizes: Sequence[int] | None = None,
    progress: bool = True,
) -> FFLinearity:
    """How linear each feed-forward sublayer is (the paper's Fig. 2).

    ``heldout`` (default): fits ``mlp_out ≈ W·standardise(mlp_in) + b`` on the tokens of a
    random ``1 - test_fraction`` of the sentences and reports R² pooled over output
    dimensions on the held-out sentences. ``paper``: the authors' protocol — input and output
    standardised, ordinary least squares on every token, the mean over output dimensions of
    each dimension's R², in-sample. They differ a lot: pooled R² is dominated by a few
    high-variance dimensions (on MiniLM's block 0, demo 01: 0.99 pooled, held out, on 1473
    tokens; 0.631 per dimension, in-sample, on 12877). One pass, memory O(d_model²) per layer.

    `sizes` adds the curve against sample size from the same pass: the same R² on the first
    ``sizes[k]`` texts (with the same held-out sentences), in `FFLinearity.curve`.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> r = ff_linearity(tiny_model("gpt2"), ["the cat sat on the mat"] * 40,
        ...                  sizes=(20, 40), progress=False)
        >>> tuple(r.r2.shape), tuple(r.curve.shape), r.curve_tokens[-1] == r.n_train
        ((3,), (2, 3), True)
        >>> bool((r.curve[-1] == r.r2).all())  # the last size is every text
        True
    """
    spec = adapters.model_spec(model)
    if any(b.mlp_in is None or b.mlp_out is None for b in spec.blocks):
        raise NotImplementedError(f"{spec.model_class} exposes no MLP input hook")
    if protocol not in ("heldout", "paper"):
        raise ValueError(f"protocol must be 'heldout' or 'paper', not {protocol!r}")
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must lie strictly between 0 and 1")
    texts = adapters.check_corpus(model, spec, texts, batch_size)
    if len(texts) < 2:
        raise ValueError("ff_linearity needs at least two texts (one to fit, one to score)")
    is_test = _split(len(texts), test_fraction, seed, protocol)
    cuts = _sizes(sizes, is_test, protocol)
    names = {h for b in spec.blocks for h in (b.mlp_in, b.mlp_out)}
    stats = [(_Suff(), _Suff()) for _ in spec.blocks]
    snapshots = []
    for start, end in tqdm(_bounds(len(texts), batch_size, cuts), desc="FF linearity",
                           disable=not progress, unit="batch"):  # fmt: skip
        tokens, mask = adapters.tokenize(model, texts[start:end], encoder=not spec.causal)
        dev = adapters.model_device(model)
        cache = adapters.run_with_cache(model, tokens.to(dev), mask.to(dev), names.__contains__)
        split = is_test[start:end]
        for L, blk in enumerate(spec.blocks):
            x, y = cache[blk.mlp_in].cpu(), cache[blk.mlp_out].cpu()
            for part, sel in ((0, ~split), (1, split)):
                keep = mask.bool() & sel[:, None]
                stats[L][part].update(x[keep], y[keep])
        if end in cuts:
            snapshots.append([(a.copy(), b.copy()) for a, b in stats])
    r2, n_train, n_test = _score(stats, protocol, ridge)
    curve = [_score(snap, protocol, ridge) for snap in snapshots]
    return FFLinearity(
        r2=r2,
        n_train=n_train,
        n_test=n_test,
        held_out=tuple(int(i) for i in is_test.nonzero().flatten()),
        protocol=protocol,
        curve=torch.stack([c[0] for c in curve]) if curve else None,
        sizes=cuts,
        curve_tokens=tuple(c[1] for c in curve),
    )


def _split(n: int, test_fraction: float, seed: int, protocol: str) -> Tensor:
    """Which texts are scored: a random share, at least one, never all (paper: none)."""
    gen = torch.Generator().manual_seed(seed)
    is_test = torch.rand(n, generator=gen) < test_fraction
    is_test[torch.randint(n, (1,), generator=gen)] = True
    if is_test.all():
        is_test[0] = False
    if protocol == "paper":  # in-sample: every sentence fits and scores
        is_test[:] = False
    return is_test


def _sizes(sizes: Sequence[int] | None, is_test: Tensor, protocol: str) -> tuple[int, ...]:
    """The curve's sample sizes, checked before any forward pass: increasing text counts,
    each prefix with a text to fit and (held out) one to score."""
    if sizes is None:
        return ()
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise TypeError(f"sizes must be a non-empty sequence of text counts, not {sizes!r}")
    got = tuple(checks.integer(k, f"sizes[{i}]", least=1, most=len(is_test))
                for i, k in enumerate(sizes))  # fmt: skip
    if list(got) != sorted(set(got)):
        raise ValueError(f"sizes must increase strictly, not {got}")
    for k in got:
        part = is_test[:k]
        if part.all() or (protocol == "heldout" and not part.any()):
            what = "no text to fit" if part.all() else "no held-out text"
            raise ValueError(f"the first {k} texts hold {what}: pick a larger size")
    return got


def _score(stats: list[tuple[_Suff, _Suff]], protocol: str, ridge: float):
    """R² per block from the (train, test) statistics; tokens fitted; tokens scored."""
    paper = protocol == "paper"
    r2 = []
    for train, test in stats:
        w, b = _fit(train, 0.0 if paper else ridge)  # the authors: plain least squares
        r2.append(_r2(train if paper else test, w, b, per_dim=paper))
    n_test = stats[0][0].n if paper else stats[0][1].n
    return torch.tensor(r2, dtype=torch.float64), stats[0][0].n, n_test


__all__ = ["FFLinearity", "ff_linearity"]
