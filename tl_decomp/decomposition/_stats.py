"""The paper's statistics over a corpus, streamed (Mickus et al. 2022, section 5).

Per-layer mean and standard deviation of a per-token statistic of each term, accumulated
batch by batch with Chan et al.'s parallel update, so memory does not grow with the corpus;
per-term anisotropy; FF linearity scored on held-out sentences; checkpoint comparisons.
FF linearity lives in `tl_decomp.decomposition`, re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_decomp import adapters
from tl_decomp._core import checks, convention, distributed
from tl_decomp._core.convention import Layer
from tl_decomp._core.results import Result
from tl_decomp.decomposition._algebra import Centering, Granularity, Statistic
from tl_decomp.decomposition._linearity import FFLinearity, ff_linearity
from tl_decomp.decomposition._recipe import DecompositionRecipe
from tl_decomp.decomposition._result import Decomposition


@dataclass(frozen=True, repr=False)
class LayerStats(Result):
    """Mean and std of a statistic per site (rows) and factor (columns), over real tokens.

    ``layers[r]`` is the residual-stream index row ``r`` describes (0 = the layer-0 input,
    ``l`` = the output of block ``l - 1``, ``"final"`` = a decoder's final-norm output).
    """

    statistic: str
    layers: tuple[Layer, ...]
    labels: tuple[str, ...]
    mean: Float[Tensor, "site factor"]
    std: Float[Tensor, "site factor"]
    n_tokens: int
    max_relative_error: float

    def table(self, digits: int = 3) -> str:
        """A plain-text table, ``mean ± std`` per site and factor."""
        width = max(8, 2 * digits + 6) + 2  # two spaces keep a negative mean off its neighbour
        head = "layer  " + "".join(f"{label:>{width}}" for label in self.labels)
        rows = [head]
        for r, layer in enumerate(self.layers):
            cells = "".join(
                f"{f'{m:.{digits}f}±{s:.{digits}f}':>{width}}"
                for m, s in zip(self.mean[r].tolist(), self.std[r].tolist(), strict=False)
            )
            rows.append(f"{convention.name(layer):>5}  {cells}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def rows(self) -> list[dict[str, Any]]:
        """One record per layer and factor: ``layer``, ``factor``, ``mean``, ``std`` (a factor
        a layer does not hold yet is left out)."""
        return [
            {"layer": convention.name(layer), "factor": label, "mean": m, "std": s}
            for r, layer in enumerate(self.layers)
            for label, m, s in zip(self.labels, self.mean[r].tolist(), self.std[r].tolist(),
                                   strict=True)
            if m == m  # not NaN
        ]  # fmt: skip

    def to_pandas(self) -> Any:
        """`rows` as a long `pandas.DataFrame`."""
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=["layer", "factor", "mean", "std"])

    def plot(self, ax: Any = None) -> Any:
        """Mean (± std band) per factor against the layer; returns the matplotlib axes."""
        from tl_decomp.viz import plots

        return plots.layer_stats(self, ax)


class _Moments:
    """Streaming count/mean/M2 per cell (Chan et al. 1979), in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Float[Tensor, "token factor"]) -> None:
        x = x.double()
        if x.shape[0]:
            mean = x.mean(0)
            self.merge(x.shape[0], mean, ((x - mean) ** 2).sum(0))

    def merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        """Fold in another stream's count, mean and M2 (a batch's, or another rank's)."""
        if n_b == 0:
            return
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / n
        self.n = n

    def std(self) -> Tensor:
        assert self.m2 is not None
        return (self.m2 / max(self.n - 1, 1)).sqrt()


def corpus_statistics(
    model: Any,
    texts: Sequence[str],
    *,
    statistic: Statistic = "shares",
    granularity: Granularity = "coarse",
    centering: Centering = "correction",
    layers: Sequence[Layer] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> LayerStats:
    """Mean ± std per layer of a per-token statistic of each term, over a corpus.

    At each residual-stream index in `layers` (default: 0 .. ``n_layers`` and, decoders,
    ``"final"``); padding excluded. Memory is one batch's run and one chunk of heads, whatever
    the corpus size or the number of heads (`DecompositionRecipe.iter_reduced`). Texts run in
    batches of similar length. Under an initialised `torch.distributed` process group
    (``torchrun``), each rank decomposes its share of the batches and every rank returns the
    merged result, equal to one process's to rounding (about 1e-15).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> s = corpus_statistics(tiny_model("bert"), ["the cat sat", "a dog ran ."],
        ...                       progress=False)
        >>> s.labels, tuple(s.mean.shape)
        (('i', 'h', 'f', 'c'), (4, 4))
        >>> bool(torch.allclose(s.mean.nansum(1), torch.ones(4, dtype=torch.float64)))
        True
    """
    checks.choice(statistic, "statistic", ("shares", "norm_ratios", "cosines"))
    recipe = DecompositionRecipe.for_model(model, granularity=granularity, centering=centering)
    layers = convention.resolve_many(recipe.spec, layers)
    texts = adapters.check_corpus(model, recipe.spec, texts, batch_size)
    moments: dict[Layer, _Moments] = {}
    site_labels: dict[Layer, tuple[str, ...]] = {}
    worst = 0.0
    batches = distributed.deal(distributed.length_batches([len(t) for t in texts], batch_size))
    bar = progress and distributed.is_main()
    with distributed.guard():
        for _, index in tqdm(batches, desc=f"decomposing ({statistic})", disable=not bar):
            batch = [texts[i] for i in index]
            tokens, mask = adapters.tokenize(model, batch, encoder=not recipe.spec.causal)
            device = adapters.model_device(model)
            cache = adapters.run_with_cache(
                model, tokens.to(device), mask.to(device), recipe.names_filter
            )
            # Streamed: one chunk of heads at a time, never the whole factor stack.
            for r in recipe.iter_reduced(cache, statistic, layers, attention_mask=mask):
                keep = r.mask().to(r.values.device)
                moments.setdefault(r.layer, _Moments()).update(r.values[:, keep].T)
                site_labels[r.layer] = r.labels
                worst = max(worst, r.relative_error)
            del cache
    moments, site_labels, worst = _merge_ranks(moments, site_labels, worst)
    return _finish(statistic, moments, site_labels, worst)


def _merge_ranks(moments, site_labels, worst):
    """Every rank's moments merged by Chan's formula in rank order (identity in one process)."""
    if not distributed.active():
        return moments, site_labels, worst
    mine = {k: (m.n, m.mean.cpu(), m.m2.cpu()) for k, m in moments.items() if m.mean is not None}
    merged: dict[Layer, _Moments] = {}
    labels: dict[Layer, tuple[str, ...]] = {}
    for theirs, their_labels, their_worst in distributed.all_gather((mine, site_labels, worst)):
        for k, (n, mean, m2) in theirs.items():
            merged.setdefault(k, _Moments()).merge(n, mean, m2)
        labels |= their_labels
        worst = max(worst, their_worst)
    return merged, labels, worst  # every rank lists the layers in one order


def _finish(statistic, moments, site_labels, worst) -> LayerStats:
    layers = tuple(moments)
    labels = max(site_labels.values(), key=len)  # the last site holds every factor

    def align(layer, t: Tensor) -> Tensor:  # earlier layers lack later layers' factors: NaN
        out = torch.full((len(labels),), float("nan"), dtype=torch.float64)
        out[[labels.index(label) for label in site_labels[layer]]] = t
        return out

    return LayerStats(
        statistic=statistic,
        layers=layers,
        labels=labels,
        mean=torch.stack([align(k, moments[k].mean) for k in layers]),
        std=torch.stack([align(k, moments[k].std()) for k in layers]),
        n_tokens=next(iter(moments.values())).n if moments else 0,
        max_relative_error=worst,
    )


@dataclass(frozen=True, repr=False)
class CheckpointComparison(Result):
    """The same statistic for two checkpoints on the same inputs; ``delta = b - a``."""

    a: LayerStats
    b: LayerStats

    @property
    def delta(self) -> Tensor:
        return self.b.mean - self.a.mean

    def rows(self) -> list[dict[str, Any]]:
        """One record per layer and factor: the two means and their difference."""
        return [
            {"layer": a["layer"], "factor": a["factor"], "a": a["mean"], "b": b["mean"],
             "delta": b["mean"] - a["mean"]}
            for a, b in zip(self.a.rows(), self.b.rows(), strict=True)
        ]  # fmt: skip

    def table(self, digits: int = 3) -> str:
        rows = ["layer  " + "".join(f"{'Δ' + label:>10}" for label in self.a.labels)]
        for r, layer in enumerate(self.a.layers):
            cells = "".join(f"{v:>+10.{digits}f}" for v in self.delta[r].tolist())
            rows.append(f"{convention.name(layer):>5}  {cells}")
        return "\n".join(rows)


def compare_checkpoints(
    model_a: Any, model_b: Any, texts: Sequence[str], **kwargs: Any
) -> CheckpointComparison:
    """`corpus_statistics` of two checkpoints (e.g. pretrained vs fine-tuned) on one corpus.

    Raises:
        ValueError: the two models tokenize the corpus differently or differ in shape.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> c = compare_checkpoints(tiny_model("bert"), tiny_model("bert", processed=True),
        ...                         ["the cat sat"], progress=False)
        >>> tuple(c.delta.shape)
        (4, 4)
    """
    sa, sb = adapters.model_spec(model_a), adapters.model_spec(model_b)
    if (sa.n_layers, sa.d_model) != (sb.n_layers, sb.d_model):
        raise ValueError("the checkpoints differ in shape: compare checkpoints of one model")
    probe = list(texts[: min(len(texts), 8)])
    ta = adapters.tokenize(model_a, probe, encoder=not sa.causal)[0]
    tb = adapters.tokenize(model_b, probe, encoder=not sb.causal)[0]
    if ta.shape != tb.shape or not torch.equal(ta, tb):
        raise ValueError("the checkpoints tokenize the corpus differently")
    return CheckpointComparison(
        corpus_statistics(model_a, texts, **kwargs), corpus_statistics(model_b, texts, **kwargs)
    )


def anisotropy(d: Decomposition) -> Float[Tensor, " factor"]:
    """Mean pairwise cosine between the real tokens' vectors of each factor.

    Uses ``sum_{i != j} u_i.u_j = ||sum u||^2 - N`` for unit vectors, so it is O(N d).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> from tl_decomp import decompose
        >>> a = anisotropy(decompose(tiny_model("gpt2"), ["the cat sat", "a dog ran"]))
        >>> tuple(a.shape)
        (4,)
    """
    vecs = d.factors[:, d.mask()]  # [factor token d_model]
    n = vecs.shape[1]
    if n < 2:
        raise ValueError("anisotropy needs at least two real tokens")
    unit = torch.nn.functional.normalize(vecs.double(), dim=-1)
    total = unit.sum(1).pow(2).sum(-1)
    return (total - (unit.norm(dim=-1) ** 2).sum(1)) / (n * (n - 1))


__all__ = [
    "CheckpointComparison",
    "FFLinearity",
    "LayerStats",
    "anisotropy",
    "compare_checkpoints",
    "corpus_statistics",
    "ff_linearity",
]
