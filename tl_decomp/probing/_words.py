"""Word occurrences decomposed into their four factors (Mickus et al., TACL 2022, section 4).

A word occurrence's factors are its word-pieces' factors summed (the paper's choice): each
sentence is fed as its words joined by single spaces, and the tokenizer's character offsets
say which word owns each piece. `tl_decomp.probing` trains its probes on the result.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_decomp import adapters
from tl_decomp._core import convention, distributed
from tl_decomp._core.convention import Layer
from tl_decomp._core.results import Result
from tl_decomp.datasets import as_labelled
from tl_decomp.decomposition import DecompositionRecipe
from tl_decomp.probing._classifiers import check_kinds


@dataclass(frozen=True, repr=False)
class WordFactors(Result):
    """The four factors of each word occurrence, each summed over the word's pieces.

    Attributes:
        factors: ``[factor occurrence d_model]``, factors ``i, h, f, c`` in that order.
        labels: class index of each occurrence into `classes`.
        classes: the distinct labels, sorted.
        layer: the residual-stream index decomposed, or ``"final"``.
        max_relative_error: worst ``|sum of factors - activation|`` over the batches.
    """

    factors: Float[Tensor, "factor occurrence d_model"]
    labels: Int[Tensor, " occurrence"]
    classes: tuple[Hashable, ...]
    layer: Layer
    max_relative_error: float

    def rows(self) -> list[dict[str, Any]]:
        """One row per class: ``class``, ``occurrences``."""
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return [{"class": c, "occurrences": n} for c, n in zip(self.classes, counts, strict=True)]

    def take(self, index: Tensor) -> WordFactors:
        """The occurrences at `index` (integer indices or a boolean mask), same classes."""
        return WordFactors(
            self.factors[:, index], self.labels[index], self.classes, self.layer,
            self.max_relative_error,
        )  # fmt: skip


def _spans(words: Sequence[str]) -> tuple[str, Tensor, Tensor]:
    """The words joined by single spaces, and each word's [start, end) character span."""
    starts, pos = [], 0
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    s = torch.tensor(starts)
    return " ".join(words), s, s + torch.tensor([len(w) for w in words])


def _owners(offsets: Int[Tensor, "batch pos 2"], spans: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Word index (counted over the batch) of each token; -1 for specials and padding."""
    owner = torch.full(offsets.shape[:2], -1, dtype=torch.long)
    base = 0
    for b, (start, end) in enumerate(spans):
        last = offsets[b, :, 1] - 1  # a piece's last character lies inside its word
        k = torch.searchsorted(start, last, right=True) - 1
        ok = (offsets[b, :, 1] > offsets[b, :, 0]) & (k >= 0) & (last < end[k.clamp_min(0)])
        owner[b, ok] = k[ok] + base
        base += len(start)
    return owner


def word_factors(
    model: Any,
    dataset: Any,
    *,
    layer: Layer = "final",
    batch_size: int = 16,
    progress: bool = True,
) -> WordFactors:
    """Decompose every word occurrence of `dataset` into ``i, h, f, c``, in batches.

    Each sentence is fed as its words joined by single spaces; a word split into several
    word-pieces gets the sum of its pieces' factors. Memory: one batch's cache plus
    ``4 * d_model`` numbers per occurrence (what a probe trains on). Under
    `torch.distributed` each rank decomposes its share of the batches and every rank
    returns every occurrence, in dataset order.

    Args:
        model: a TransformerBridge, HookedTransformer or HookedEncoder with a fast tokenizer.
        dataset: ``(words, labels)`` (lists of sentences of words / per-word labels) or a
            `LabelledWords` such as `load_pos()`.
        layer: residual-stream index to decompose (``"final"``: the final embedding).
        batch_size: sentences per forward pass.
        progress: a progress bar over the batches.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> wf = word_factors(tiny_model("bert"), ([["the", "cat."]], [["D", "N"]]),
        ...                   progress=False)
        >>> tuple(wf.factors.shape), wf.classes, wf.labels.tolist()
        ((4, 2, 32), ('D', 'N'), [0, 1])
    """
    data = as_labelled(dataset)
    recipe = DecompositionRecipe.for_model(model)
    check_kinds(recipe.spec)
    layer = convention.resolve(recipe.spec, layer)
    index = {c: k for k, c in enumerate(data.classes)}
    starts = distributed.deal(range(0, len(data), batch_size))  # one process: every batch
    chunks, worst = [], 0.0
    bar = progress and distributed.is_main()
    with distributed.guard():
        for _, start in tqdm(starts, desc="word factors", disable=not bar, unit="batch"):
            chunk, error = _word_batch(model, recipe, layer, data.words[start : start + batch_size])
            chunks.append(chunk)
            worst = max(worst, error)
    chunks = distributed.undeal(chunks)  # under torch.distributed: every rank's, in order
    labels = torch.tensor([index[x] for s in data.labels for x in s])
    return WordFactors(
        torch.cat(chunks, 1), labels, data.classes, layer, distributed.all_max(worst)
    )


def _word_batch(
    model: Any, recipe: DecompositionRecipe, layer: Layer, sentences: Sequence[Sequence[str]]
) -> tuple[Float[Tensor, "factor word d_model"], float]:
    """Each word's factors (its pieces' summed) in one batch of sentences; the batch's error."""
    spec, dev = recipe.spec, adapters.model_device(model)
    texts, spans = zip(*[(t, (s, e)) for t, s, e in map(_spans, sentences)], strict=True)
    tokens, mask, offsets = adapters.tokenize_offsets(model, texts, encoder=not spec.causal)
    if tokens.shape[1] > spec.n_ctx:
        raise ValueError(f"a sentence has {tokens.shape[1]} tokens; context is {spec.n_ctx}")
    cache = adapters.run_with_cache(model, tokens.to(dev), mask.to(dev), recipe.names_filter)
    d = recipe.decompose(cache, layer, tokens=tokens, attention_mask=mask)
    owner = _owners(offsets, list(spans)).to(d.factors.device)
    n = sum(len(s) for s in sentences)
    pieces = torch.bincount(owner[owner >= 0], minlength=n)
    if (pieces == 0).any():
        k = int((pieces == 0).nonzero()[0])
        flat = [w for s in sentences for w in s]
        raise ValueError(f"word {flat[k]!r} produced no token with this tokenizer")
    pooled = d.factors.new_zeros((4, n, spec.d_model))
    return pooled.index_add_(1, owner[owner >= 0], d.factors[:, owner >= 0]).cpu(), d.relative_error


__all__ = ["WordFactors", "word_factors"]
