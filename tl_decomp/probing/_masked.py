"""Masked-token prediction from subsets of vector factors (Mickus et al., TACL 2022, §4).

Corrupt the input, decompose the final embedding into ``i, h, f, c``, and feed the sum of
each subset at the corrupted positions to the model's own masked-LM head
(`adapters.mlm_logits`). ``corruption="bert15"`` is the paper's: BERT's 15% of positions, special
ones included, of which 80% become ``[MASK]``, 10% a random token and 10% stay; ``"single"``
masks one ordinary token per text. Only models with an MLM head qualify (BERT as
``BertForMaskedLM``, HookedEncoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_decomp import adapters
from tl_decomp._core import checks
from tl_decomp._core.results import Result
from tl_decomp.decomposition import DecompositionRecipe
from tl_decomp.probing._classifiers import check_kinds, selector, subset_names


@dataclass(frozen=True, repr=False)
class MaskedPrediction(Result):
    """Top-1 masked-token prediction from each subset's sum, through the model's MLM head.

    Attributes:
        subsets: row names.
        accuracy: share of masked positions where the subset predicts the original token.
        agreement: share where it predicts what the model itself (all factors) predicts.
        model_accuracy: the model's own accuracy on the same positions.
        n_masked: corrupted positions predicted (``single``: one per text).
        corruption: ``single`` or ``bert15``.
    """

    subsets: tuple[str, ...]
    accuracy: Float[Tensor, " subset"]
    agreement: Float[Tensor, " subset"]
    model_accuracy: float
    n_masked: int
    corruption: str = "single"

    def rows(self) -> list[dict[str, Any]]:
        """One record per subset: ``subset``, ``accuracy``, ``agreement``."""
        return [
            {"subset": s, "accuracy": a, "agreement": g}
            for s, a, g in zip(self.subsets, self.accuracy.tolist(), self.agreement.tolist(),
                               strict=True)
        ]  # fmt: skip

    def __str__(self) -> str:
        rows = [f"{'subset':<9}{'accuracy %':>12}{'agrees with model %':>22}"]
        for s, a, g in zip(self.subsets, self.accuracy, self.agreement, strict=True):
            rows.append(f"{s:<9}{a * 100:>12.1f}{g * 100:>22.1f}")
        rows.append(f"{'model':<9}{self.model_accuracy * 100:>12.1f}   ({self.n_masked} masked)")
        return "\n".join(rows)


def _pick_positions(tokens: Tensor, mask: Tensor, specials: set[int], gen) -> Tensor:
    """One random non-special real position per sentence."""
    ok = mask.bool() & ~torch.isin(tokens, torch.tensor(sorted(specials), dtype=tokens.dtype))
    if not ok.any(1).all():
        raise ValueError("a text has no ordinary token to mask")
    return torch.multinomial(ok.float(), 1, generator=gen).squeeze(1)


def corrupt(
    tokens: Tensor, mask: Tensor, tok: Any, d_vocab: int, corruption: str, gen
) -> tuple[Tensor, Tensor, Tensor]:
    """The corrupted ids, and the (row, position) pairs to predict.

    ``bert15``: per text, round(15%) of its real positions (at least one, special ones
    included) chosen uniformly; each becomes [MASK] with probability 0.8, a uniformly random
    token with 0.1, and stays with 0.1 (Devlin et al.). ``single``: one ordinary token, masked.
    """
    corrupted = tokens.clone()
    if corruption == "single":
        pos = _pick_positions(tokens, mask, set(tok.all_special_ids), gen)
        rows = torch.arange(len(pos))
        corrupted[rows, pos] = tok.mask_token_id
        return corrupted, rows, pos
    picked = []
    for b, n in enumerate(mask.sum(1).tolist()):
        k = max(1, round(0.15 * n))
        picked += [(b, int(p)) for p in torch.randperm(n, generator=gen)[:k]]
    rows, pos = torch.tensor(picked).T
    fate = torch.rand(len(rows), generator=gen)
    random_ids = torch.randint(d_vocab, (len(rows),), generator=gen)
    new = torch.where(fate < 0.8, tok.mask_token_id, torch.where(fate < 0.9, random_ids, -1))
    keep = new >= 0
    corrupted[rows[keep], pos[keep]] = new[keep].to(tokens.dtype)
    return corrupted, rows, pos


def masked_prediction(
    model: Any,
    texts: Sequence[str],
    *,
    subsets: str | Sequence[str] = "all",
    corruption: Literal["single", "bert15"] = "single",
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> MaskedPrediction:
    """Corrupt the texts; predict the original tokens from each subset of ``{i, h, f, c}``.

    ``corruption="bert15"`` is the paper's protocol [M §4]: BERT-style corruption of 15% of
    the positions (special ones included; 80% ``[MASK]``, 10% random, 10% unchanged),
    accuracy over every corrupted position. ``"single"`` (default, ours before the paper's
    was added): one ordinary (non-special) token per text, masked.

    The subset's sum at the masked position goes through the model's own masked-LM head
    (dense, activation, LayerNorm, unembedding); the sum of all four is the model's final
    embedding, so that row reproduces the model's own prediction. Only models with an MLM
    head qualify: a tiny random BERT has one; the bundled MiniLM's is random (its checkpoint
    ships none), so its numbers mean nothing.

    Raises:
        NotImplementedError: the model has no masked-LM head (decoders).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> m = masked_prediction(tiny_model("bert"), ["the cat sat on the mat", "a dog ran"],
        ...                       progress=False)
        >>> m.subsets[-1], m.agreement[-1].item()
        ('i+h+f+c', 1.0)
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of texts, not one str")
    texts = checks.texts(texts, "texts")
    checks.choice(corruption, "corruption", ("single", "bert15"))
    checks.integer(batch_size, "batch_size", least=1)
    checks.integer(seed, "seed")
    subsets = subset_names(subsets)
    recipe = DecompositionRecipe.for_model(model)
    check_kinds(recipe.spec)
    if recipe.spec.causal:
        raise NotImplementedError("masked-token prediction needs a masked-LM (encoder) model")
    adapters.check_lengths(model, recipe.spec, texts)
    tok, dev = model.tokenizer, adapters.model_device(model)
    gen, sel = torch.Generator().manual_seed(seed), selector(subsets)
    hits, same, own, n = torch.zeros(len(subsets)), torch.zeros(len(subsets)), 0.0, 0
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="masked prediction", disable=not progress, unit="batch"):
        tokens, mask = adapters.tokenize(model, texts[start : start + batch_size], encoder=True)
        d_vocab = recipe.spec.d_vocab
        masked, rows, pos = corrupt(tokens, mask, tok, d_vocab, corruption, gen)
        original = tokens[rows, pos]
        cache = adapters.run_with_cache(model, masked.to(dev), mask.to(dev), recipe.names_filter)
        d = recipe.decompose(cache, "final")
        vecs = einops.einsum(sel.to(d.factors), d.factors[:, rows, pos], "s f, f b d -> s b d")
        pred = adapters.mlm_logits(model, vecs.to(d.target.dtype)).argmax(-1).cpu()
        mine = adapters.mlm_logits(model, d.target[rows, pos]).argmax(-1).cpu()
        hits += (pred == original).sum(1)
        same += (pred == mine).sum(1)
        own += float((mine == original).sum())
        n += len(pos)
    return MaskedPrediction(subsets, hits / n, same / n, own / n, n, corruption)


__all__ = ["MaskedPrediction", "masked_prediction"]
