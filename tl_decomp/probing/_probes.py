"""Probing subsets of vector factors (Mickus et al., TACL 2022, sections 4-6).

A word occurrence's feature for a subset of ``{i, h, f, c}`` is the sum of those factors,
summed over the word's word-pieces (the paper's choice). Three probes (multinomial logistic
regression, a one-hidden-layer MLP, k-NN with k=5 and cosine similarity) are trained on an
80/10/10 split of the occurrences per seed; the 10% validation split picks the
regularisation from a small grid (`C` / `alpha`; no early stopping), the last 10% is scored.
The probes themselves live in `_classifiers`; masked-token prediction from subsets (section
4) in `tl_decomp.probing`.
Word factors are gathered by `tl_decomp.probing`, re-exported here.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_decomp._core import checks
from tl_decomp._core.convention import Layer
from tl_decomp._core.results import Result
from tl_decomp.probing._classifiers import (
    SUBSETS,
    agreement,
    fit_predict,
    macro_f1,
    selector,
    subset_names,
)
from tl_decomp.probing._classifiers import split as split_occurrences
from tl_decomp.probing._words import WordFactors, word_factors

Probe = Literal["linear", "mlp", "knn"]
Agreement = Literal["same_label", "macro_f1"]


@dataclass(frozen=True, repr=False)
class ProbeTable(Result):
    """Test-split scores per subset and seed, and how often two subsets' probes agree.

    Attributes:
        probe: ``linear``, ``mlp`` or ``knn``.
        subsets: names such as ``"h"`` or ``"i+h+f+c"``; row ``k`` of every tensor.
        accuracy, macro_f1: ``[subset seed]``, fractions in [0, 1].
        pairwise_agreement: ``[subset subset]``, the share of test occurrences on which two
            subsets' probes predict the same label, averaged over seeds (diagonal: 1).
        pairwise_macro_f1: ``[subset subset]``, the macro-F1 of one subset's test
            predictions scored against the other's (the authors' agreement matrix;
            symmetric), averaged over seeds (diagonal: 1).
        seeds: the seeds, one per column.
        classes: the label set.
        n_occurrences: word occurrences split into train / validation / test.
        chance: the most frequent class's share of all occurrences.
        layer: the residual-stream index probed, or ``"final"``.
        split: ``per_seed`` (a new 80/10/10 split per seed) or ``fixed`` (the paper's).
    """

    probe: str
    subsets: tuple[str, ...]
    accuracy: Float[Tensor, "subset seed"]
    macro_f1: Float[Tensor, "subset seed"]
    pairwise_agreement: Float[Tensor, "subset subset"]
    pairwise_macro_f1: Float[Tensor, "subset subset"]
    seeds: tuple[int, ...]
    classes: tuple[Hashable, ...]
    n_occurrences: int
    chance: float
    layer: Layer
    split: str = "per_seed"

    def _metric(self, metric: str) -> Tensor:
        if metric not in ("accuracy", "macro_f1"):
            raise ValueError(f"metric must be 'accuracy' or 'macro_f1', not {metric!r}")
        return getattr(self, metric)

    def mean(self, metric: str = "accuracy") -> Float[Tensor, " subset"]:
        """Mean over seeds of ``accuracy`` or ``macro_f1``."""
        return self._metric(metric).mean(1)

    def std(self, metric: str = "accuracy") -> Float[Tensor, " subset"]:
        """Sample standard deviation over seeds (0 for a single seed)."""
        m = self._metric(metric)
        return m.std(1) if m.shape[1] > 1 else torch.zeros(m.shape[0])

    def agreement(self, metric: Agreement = "same_label") -> Float[Tensor, "subset subset"]:
        """Pairwise agreement between subsets' predictions (rows and columns: `subsets`):
        ``same_label`` (the share of words labelled alike) or ``macro_f1`` (the authors')."""
        checks.choice(metric, "metric", get_args(Agreement))
        return self.pairwise_agreement if metric == "same_label" else self.pairwise_macro_f1

    def rows(self) -> list[dict[str, Any]]:
        """One record per subset: mean and std over seeds of accuracy and macro-F1."""
        cols = {f"{m} {k}": getattr(self, k)(m).tolist() for m in ("accuracy", "macro_f1")
                for k in ("mean", "std")}  # fmt: skip
        return [{"subset": s} | {c: v[i] for c, v in cols.items()}
                for i, s in enumerate(self.subsets)]  # fmt: skip

    def table(self, digits: int = 1) -> str:
        """Mean ± std over seeds per subset, in percent."""
        head = f"{'subset':<9}{'accuracy %':>16}{'macro-F1 %':>16}"
        split = ", one fixed split" if self.split == "fixed" else ""
        rows = [f"{self.probe} probe, {len(self.seeds)} seed(s){split}, {self.n_occurrences} words"]
        rows.append(head)
        cols = [(self.mean(m) * 100, self.std(m) * 100) for m in ("accuracy", "macro_f1")]
        for k, s in enumerate(self.subsets):
            cells = "".join(f"{f'{m[k]:.{digits}f} ± {sd[k]:.{digits}f}':>16}" for m, sd in cols)
            rows.append(f"{s:<9}{cells}")
        rows.append(f"{'chance':<9}{self.chance * 100:>16.{digits}f}  (most frequent class)")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def plot(self, ax: Any = None, metric: str = "accuracy") -> Any:
        """Bars of mean ± std per subset with the chance level; returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(8, 3))[1]
        x = range(len(self.subsets))
        ax.bar(x, self.mean(metric) * 100, yerr=self.std(metric) * 100, capsize=2)
        ax.axhline(self.chance * 100, color="grey", ls="--", lw=1, label="most frequent class")
        ax.set_xticks(list(x), self.subsets, rotation=60)
        ax.set_ylabel(f"{metric.replace('_', '-')} %")
        ax.set_title(f"{self.probe} probe per subset of factors")
        ax.legend(loc="lower right")
        return ax

    def plot_agreement(self, ax: Any = None, metric: Agreement = "same_label") -> Any:
        """Heat map of `agreement(metric)`; returns the matplotlib axes."""
        import matplotlib.pyplot as plt

        matrix = self.agreement(metric)
        ax = ax or plt.subplots(figsize=(5.5, 4.5))[1]
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ticks = list(range(len(self.subsets)))
        ax.set_xticks(ticks, self.subsets, rotation=90)
        ax.set_yticks(ticks, self.subsets)
        label = "same label" if metric == "same_label" else "macro-F1 between subsets"
        ax.figure.colorbar(im, ax=ax, label=label)
        return ax


def _options(probe, seeds, subsets, split, hidden, C, alpha, max_iter, n_jobs):
    """Every probing option checked (before any model run, in `probe_subsets`)."""
    checks.choice(probe, "probe", get_args(Probe))
    checks.choice(split, "split", ("per_seed", "fixed"))
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        seeds = range(checks.integer(seeds, "seeds", least=1))
    seeds = checks.seeds(seeds)
    max_iter = max_iter if max_iter is not None else 20 if probe == "mlp" else 300
    checks.integer(max_iter, "max_iter", least=1)
    checks.integer(n_jobs, "n_jobs")
    if n_jobs == 0:
        raise ValueError("n_jobs must be a positive count or negative (joblib), not 0")
    if hidden is not None:
        checks.integer(hidden, "hidden", least=1)
    C = tuple(checks.number(c, "C", low=0.0) for c in C)
    alpha = tuple(checks.number(a, "alpha", low=0.0) for a in alpha)
    if not C or not alpha:
        raise ValueError("C and alpha need at least one candidate each")
    opts = dict(hidden=hidden, C=C, alpha=alpha, max_iter=max_iter, n_jobs=n_jobs)
    return subset_names(subsets), seeds, opts


def probe_factors(
    wf: WordFactors,
    *,
    probe: Probe = "linear",
    seeds: int | Sequence[int] = 5,
    subsets: str | Sequence[str] = "all",
    split: Literal["per_seed", "fixed"] = "per_seed",
    hidden: int | None = None,
    C: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    alpha: Sequence[float] = (1e-4, 1e-2, 1.0),
    max_iter: int | None = None,
    n_jobs: int = 1,
    progress: bool = True,
) -> ProbeTable:
    """Train one probe per subset and seed on precomputed `WordFactors` (scikit-learn).

    Per seed: an 80/10/10 split of the occurrences (``split="per_seed"``: a new shuffle per
    seed; ``"fixed"``: the paper's one split, seed 0's, reused by every seed, which then only
    changes the MLP's initialisation). Each subset's probe is chosen on the validation split
    and scored on the test split:

    - ``linear``: standardised features, `LogisticRegression` with the inverse regularisation
      in `C` that scores best on validation;
    - ``mlp``: standardised features, `MLPClassifier` (Adam) with one hidden ReLU layer of
      `hidden` units (default ``d_model``: the paper's width), `max_iter` epochs (default 20,
      the paper's),
      the L2 penalty in `alpha` that scores best on validation (the paper tuned with 100
      trials; this is a small grid);
    - ``knn``: `KNeighborsClassifier`, k = 5, cosine, raw features (the paper's).

    Args:
        wf: the occurrences' factors and labels (`word_factors`).
        probe: ``linear``, ``mlp`` or ``knn``.
        seeds: a number of seeds (``0 .. n-1``) or the seeds themselves.
        subsets: ``"all"`` (the 15 non-empty subsets) or names such as ``["h", "i+h"]``.
        split: ``per_seed`` or ``fixed`` (see above).
        hidden: the MLP's hidden units (None: ``d_model``).
        C: the linear probe's inverse regularisations tried on the validation split.
        alpha: the MLP's L2 penalties tried on the validation split.
        max_iter: iterations of the solver (linear; default 300) or epochs (MLP; default 20,
            the paper's; a few hundred training words need more).
        n_jobs: subsets fitted in parallel (joblib).
        progress: a progress bar over seeds.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.arange(400) % 2
        >>> x = torch.randn(4, 400, 8, generator=g)
        >>> x[1, :, 0] += 4 * y  # only h carries the label
        >>> t = probe_factors(WordFactors(x, y, ("a", "b"), "final", 0.0), probe="knn",
        ...                   seeds=2, subsets=["i", "h"], progress=False)
        >>> [a > 0.8 for a in t.mean().tolist()]  # accuracy: i at chance, h far above
        [False, True]
    """
    options = (probe, seeds, subsets, split, hidden, C, alpha, max_iter, n_jobs)
    subsets, seeds, opts = _options(*options)
    n, n_classes = wf.labels.shape[0], len(wf.classes)
    if n < 10:
        raise ValueError(f"{n} word occurrences: an 80/10/10 split needs at least 10")
    sel, x = selector(subsets), wf.factors.float()
    acc, f1 = [], []
    agree, agree_f1 = (torch.zeros(len(subsets), len(subsets), dtype=torch.float64) for _ in "ab")
    for seed in tqdm(seeds, desc=f"{probe} probes", disable=not progress, unit="seed"):
        idxs = split_occurrences(n, 0 if split == "fixed" else seed)
        parts = [einops.einsum(sel, x[:, idx], "s f, f n d -> s n d") for idx in idxs]
        y_tr, y_va, y_te = (wf.labels[idx] for idx in idxs)
        pred = fit_predict(probe, parts[0], y_tr, parts[1], y_va, parts[2], n_classes, seed, opts)
        acc.append((pred == y_te).float().mean(1))
        f1.append(macro_f1(pred, y_te, n_classes))
        same, between = agreement(pred, n_classes)
        agree += same / len(seeds)
        agree_f1 += between / len(seeds)
    counts = torch.bincount(wf.labels, minlength=n_classes)
    return ProbeTable(
        probe=probe,
        subsets=subsets,
        accuracy=torch.stack(acc, 1),
        macro_f1=torch.stack(f1, 1).float(),
        pairwise_agreement=agree.float(),
        pairwise_macro_f1=agree_f1.float(),
        seeds=seeds,
        classes=wf.classes,
        n_occurrences=n,
        chance=float(counts.max() / n),
        layer=wf.layer,
        split=split,
    )


def probe_subsets(
    model: Any,
    dataset: Any,
    *,
    probe: Probe = "linear",
    layer: Layer = "final",
    seeds: int | Sequence[int] = 5,
    subsets: str | Sequence[str] = "all",
    batch_size: int = 16,
    progress: bool = True,
    **options: Any,
) -> ProbeTable:
    """Probe each subset of ``{i, h, f, c}`` for the word labels of `dataset` [M §4-6].

    `word_factors` then `probe_factors` (whose keyword `options` pass through: `split`,
    `hidden`, `C`, `alpha`, `max_iter`, `n_jobs`). To compare probes on the same
    occurrences, compute `word_factors` once and call `probe_factors` per probe.

    Args:
        model: any model `decompose` supports, with a fast tokenizer.
        dataset: ``(words, labels)``: a list of sentences, each a list of words, and a
            parallel list of per-word labels; or `load_pos()`.
        probe: ``linear``, ``mlp`` or ``knn``.
        layer: residual-stream index to probe (``"final"``: the final embedding).
        seeds: a number of seeds or the seeds themselves.
        subsets: ``"all"`` or names such as ``["h", "i+h+f+c"]``.
        batch_size: sentences per forward pass.
        progress: progress bars.
        **options: passed to `probe_factors`.

    Raises:
        ValueError: an empty dataset, labels not aligned with words, a single class, fewer
            than 10 occurrences, a word the tokenizer drops.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> words = [["the", "cat", "sat"], ["a", "dog", "ran", "."]] * 4
        >>> labels = [["D", "N", "V"], ["D", "N", "V", "P"]] * 4
        >>> t = probe_subsets(tiny_model("bert"), (words, labels), probe="knn", seeds=1,
        ...                   progress=False)
        >>> len(t.subsets), t.subsets[-1], t.agreement().diagonal().tolist() == [1.0] * 15
        (15, 'i+h+f+c', True)
    """
    keys = ("split", "hidden", "C", "alpha", "max_iter", "n_jobs")
    defaults = dict(split="per_seed", hidden=None, C=(0.01, 0.1, 1.0, 10.0),
                    alpha=(1e-4, 1e-2, 1.0), max_iter=None, n_jobs=1)  # fmt: skip
    if unknown := set(options) - set(keys):
        raise TypeError(f"probe_subsets got unknown options {sorted(unknown)}")
    _options(probe, seeds, subsets, *(options.get(k, defaults[k]) for k in keys))
    wf = word_factors(model, dataset, layer=layer, batch_size=batch_size, progress=progress)
    return probe_factors(
        wf, probe=probe, seeds=seeds, subsets=subsets, progress=progress, **options
    )


__all__ = ["SUBSETS", "ProbeTable", "WordFactors", "probe_factors", "probe_subsets", "word_factors"]
