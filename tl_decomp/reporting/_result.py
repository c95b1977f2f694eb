"""What a report holds: the `Report` result, its tables and the legend of their columns.

Below the page (`_page` renders a `Report`; nothing here imports it at module level).
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from tl_decomp._core import convention
from tl_decomp._core.results import Result, text_table
from tl_decomp.decomposition import Decomposition

COLUMNS = (
    "i, h, f, c: mean share ⟨e,t⟩/‖e‖² of each term over the text's tokens (they sum to 1). "
    "rel. error: |sum of the terms − the model's own state| / |state|. identified: share of "
    "tokens whose state, mapped back to layer 0, is nearest to their own layer-0 vector "
    "(this text, naive map; (corpus): a linear map fitted on the corpus). own: median share "
    "of a token's own input in its state (Hidden Token Attribution); P̃: share of tokens "
    "whose largest contributor is another token. –: not computed at that layer (attribution "
    "runs on the layers asked for). rank(T): rank of the head's value-output vectors over "
    "the keys; null dim: keys − rank(T); ‖A−A_eff‖/‖A‖: the pattern's non-identifiable part."
)


@dataclass(frozen=True, repr=False)
class Report(Result):
    """Everything the page shows, computed by the library's own functions.

    Attributes:
        text, tokens: the input and its token strings (as data; the page escapes them).
        decompositions: `decompose_layers` at every layer (0 .. n_layers, a decoder's final).
        attention_blocks, patterns, effective: raw and effective attention of those blocks,
            ``[block head_index query_pos key_pos]``; `null_space` their diagnostics;
            `norm_based` Kobayashi et al.'s ``‖A[q,k] f(x_k)‖`` of the same heads (None where
            a model's heads are not pattern times values).
        identifiability: token identifiability of the text's own tokens (naive map, cosine).
        corpus_identifiability: a linear map fitted on shipped corpus sentences, or None.
        attribution: Hidden Token Attribution of the text, or None; `query` the position
            whose contributions the page shows token by token.
        flow: `information_flow` into the last token's prediction (an encoder's: `query`),
            or None; `share_layers` the layers the shares view draws token by token.
        left_out: what the defaults did not draw, each with the argument that adds it.
    """

    model_name: str
    text: str
    tokens: tuple[str, ...]
    causal: bool
    decompositions: tuple[Decomposition, ...]
    attention_blocks: tuple[int, ...]
    patterns: Float[Tensor, "block head_index query_pos key_pos"]
    effective: Float[Tensor, "block head_index query_pos key_pos"]
    null_space: Any
    identifiability: Any
    norm_based: Float[Tensor, "block head_index query_pos key_pos"] | None = None
    corpus_identifiability: Any = None
    attribution: Any = None
    query: int = 0
    d_head: int = 0
    seconds: float = 0.0
    flow: Any = None
    share_layers: tuple[Any, ...] = ()
    n_blocks: int = 0
    left_out: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def layer_rows(self) -> list[dict[str, Any]]:
        """One row per layer (residual-stream index): mean shares, error, identifiability,
        attribution.

        Keys (in order): ``layer``, the factor labels, ``rel. error``, ``identified`` (this
        text, naive map), ``identified (corpus)``, ``own`` (median own-token contribution)
        and ``P̃``; None where a method was not run at that layer.
        """
        cells: dict[Any, dict[str, Any]] = {}
        for d in self.decompositions:
            shares = d.shares()[:, 0][:, d.mask()[0]].mean(-1).tolist()
            cell = cells.setdefault(d.layer, {})
            cell.update(zip(d.labels, shares, strict=True), **{"rel. error": d.relative_error})
        columns = [*self.decompositions[0].labels, "rel. error"]
        for key, res in (("identified", self.identifiability),
                         ("identified (corpus)", self.corpus_identifiability)):  # fmt: skip
            if res is not None:
                columns.append(key)
                for L, rate in zip(res.layers, res.rates.tolist(), strict=True):
                    cells.setdefault(L, {})[key] = rate
        if (a := self.attribution) is not None:
            columns += ["own", "P̃"]
            own, p = a.own_token().tolist(), a.p_tilde().tolist()
            for L, o, q in zip(a.layers, own, p, strict=True):
                cells.setdefault(L, {}).update({"own": o, "P̃": q})
        order = sorted(cells, key=lambda L: math.inf if L == "final" else L)
        return [
            {"layer": convention.name(L), **{c: cells[L].get(c) for c in columns}} for L in order
        ]

    def attention_rows(self) -> list[dict[str, Any]]:
        """One row per block, means over heads: rank(T), null-space dimension, and
        ``||A - A_eff||_F / ||A||_F`` (mean and max over heads)."""
        ns = self.null_space
        if ns is None:  # no attention block (a state-space model)
            return []
        return [
            {"block": L, "keys": int(ns.n_keys[0]), "rank(T)": _mean(ns.rank[i, 0]),
             "null dim": _mean(ns.null_dim[i, 0]),
             "‖A−A_eff‖/‖A‖": ns.relative_norm[i, 0].mean().item(),
             "max over heads": ns.relative_norm[i, 0].max().item()}
            for i, L in enumerate(ns.blocks)
        ]  # fmt: skip

    def rows(self) -> list[dict[str, Any]]:
        """`layer_rows`: the page's main table."""
        return self.layer_rows()

    def state_cosines(self) -> list[tuple[Any, float]]:
        """(layer, mean cosine between the states of two different tokens of the text):
        near 1 where every state points one way, which a nearest-neighbour lookup in the
        layer-0 vectors with no map fitted (the naive map) cannot see past."""
        out = []
        for d in self.decompositions:
            e = d.target[0][d.mask()[0]].double()
            e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            n, gram = e.shape[0], e @ e.T
            cos = gram.sum() - gram.diagonal().sum()  # the off-diagonal pairs
            out.append((d.layer, cos.item() / max(n * (n - 1), 1)))
        return out

    def summary(self) -> str:
        """The two tables as plain text, for a terminal."""
        shown = "│".join(map(_printable, self.tokens))
        head = f"{self.model_name}: {len(self.tokens)} tokens: {shown}"
        parts = [head, text_table(self.layer_rows()), text_table(self.attention_rows()),
                 textwrap.fill(COLUMNS, 100)]  # fmt: skip
        if self.left_out:
            parts.append("left out: " + "; ".join(self.left_out))
        return "\n\n".join(parts)

    def html(self) -> str:
        """The page, self-contained (`tl_decomp.reporting`)."""
        from tl_decomp.reporting._page import page

        return page(self)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write `html` to `path` (UTF-8) and return it.

        Atomic: the page goes to a temporary file beside `path`, which then replaces it, so a
        crash or a full disk never leaves half a page. An existing regular file is replaced;
        a symbolic link or a directory is refused (`check_path`). The one writer of reports
        and saved views: `tl_decomp._core.files.atomic_write`.
        """
        from tl_decomp._core import files

        return files.atomic_write(path, self.html(), what="the report")[0]


def _printable(token: str) -> str:
    """A token for a terminal: control characters (a newline token) as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)


def _mean(t: Tensor) -> int | float:
    """A mean over heads, an int where every head agrees (ranks, dimensions)."""
    return int(t[0]) if bool((t == t[0]).all()) else round(t.double().mean().item(), 2)
