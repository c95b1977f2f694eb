"""matplotlib figures of tl_decomp results: the ones the HTML report draws, one implementation.

Each function draws on `ax` (a new figure's axes when None) and returns the axes. Layers sit
at their residual-stream index; ``"final"`` one step past the deepest. matplotlib is the
``plots`` extra: ``pip install 'tl-decomp[plots]'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _axes(ax: Any, height: float = 3.0) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7.5, height), layout="constrained")[1]


def _x(layers: Sequence[Any]) -> list[int]:
    last = max((int(L) for L in layers if L != "final"), default=-1)
    return [last + 1 if L == "final" else int(L) for L in layers]


def _layer_axis(ax: Any, layers: Sequence[Any]) -> None:
    ax.set_xticks(_x(layers), [str(L) for L in layers])
    ax.set_xlabel("layer")


def shares(decompositions: Sequence[Any], ax: Any = None, batch: int = 0) -> Any:
    """Mean share ``<e, t> / |e|^2`` of each factor over one example's real tokens, by layer
    (`decompose_layers`' output).

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from tl_decomp import decompose_layers, tiny_model
        >>> ax = shares(decompose_layers(tiny_model("gpt2"), "the cat sat"))
        >>> [t.get_text() for t in ax.get_xticklabels()], len(ax.get_lines())  # 4 terms + y=0
        (['0', '1', '2', '3', 'final'], 5)
    """
    ax, ds = _axes(ax), list(decompositions)
    layers = [d.layer for d in ds]
    for label in ds[-1].labels:
        pts = [(x, d.shares()[d.labels.index(label), batch][d.mask()[batch]].mean().item())
               for x, d in zip(_x(layers), ds, strict=True) if label in d.labels]  # fmt: skip
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.axhline(0, color="#999", lw=0.8)
    ax.set(ylabel="mean share")
    _layer_axis(ax, layers)
    ax.legend(ncols=4)
    return ax


def layer_stats(stats: Any, ax: Any = None) -> Any:
    """`corpus_statistics`: mean per factor by layer, with a ± std band."""
    ax = _axes(ax)
    x = _x(stats.layers)
    for k, label in enumerate(stats.labels):
        m, s = stats.mean[:, k], stats.std[:, k]
        ax.plot(x, m.tolist(), marker="o", label=label)
        ax.fill_between(x, (m - s).tolist(), (m + s).tolist(), alpha=0.15)
    ax.set(ylabel=f"{stats.statistic} (mean ± std, {stats.n_tokens} tokens)")
    _layer_axis(ax, stats.layers)
    ax.legend(ncols=4)
    return ax


def identifiability(results: Any, ax: Any = None) -> Any:
    """Rate of identified tokens by layer; `results` is one `IdentifiabilityResult` or a
    ``{label: result}`` mapping (the report's: this text vs the corpus map)."""
    ax = _axes(ax, 2.6)
    named = results if isinstance(results, Mapping) else {"identified": results}
    for label, res in named.items():
        if res is not None:
            ax.plot(_x(res.layers), res.rates.tolist(), marker="o", label=label)
            _layer_axis(ax, res.layers)
    ax.set(ylabel="identified", ylim=(-0.05, 1.05))
    ax.legend()
    return ax


def attribution(result: Any, ax: Any = None) -> Any:
    """Hidden Token Attribution by layer: the median own-token share and P̃ (the share of
    queries whose top contributor is another token)."""
    ax = _axes(ax, 2.6)
    x = _x(result.layers)
    ax.plot(x, result.own_token().tolist(), marker="o", label="median own-token share")
    ax.plot(x, result.p_tilde().tolist(), marker="s", label="P̃: top contributor not self")
    ax.set(ylim=(-0.05, 1.05))
    _layer_axis(ax, result.layers)
    ax.legend()
    return ax


def attribution_by_offset(result: Any, ax: Any = None, max_offset: int = 10) -> Any:
    """Mean contribution by relative position of the key (``key - query``), one line per
    layer [B, Fig. 4]."""
    ax = _axes(ax)
    offsets, total = result.by_offset(max_offset)
    for i, L in enumerate(result.layers):
        ax.plot(offsets.tolist(), total[i].tolist(), marker=".", label=f"layer {L}")
    ax.set(xlabel="key position − query position", ylabel="mean contribution")
    ax.legend(ncols=3)
    return ax


def correlation_by_length(corr: Any, ax: Any = None, edges: Sequence[int] = (8, 16, 32, 64)) -> Any:
    """Pearson r of raw vs effective attention by text length [B, Fig. 1a]: the median with
    its interquartile range, per length bin."""
    ax = _axes(ax, 2.6)
    rows = corr.by_length(edges)
    x = range(len(rows))
    med = [r["median"] for r in rows]
    err = [[m - r["q25"] for m, r in zip(med, rows, strict=True)],
           [r["q75"] - m for m, r in zip(med, rows, strict=True)]]  # fmt: skip
    ax.errorbar(x, med, yerr=err, marker="o", capsize=3)
    ax.set_xticks(list(x), [r["tokens"] for r in rows])
    ax.set(xlabel="tokens", ylabel="r(A, A_eff)", ylim=(-0.05, 1.05))
    return ax


__all__ = [
    "attribution",
    "attribution_by_offset",
    "correlation_by_length",
    "identifiability",
    "layer_stats",
    "shares",
]
