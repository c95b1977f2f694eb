"""Weights over key positions, grouped by token class (Brunner et al. 2020, Fig. 1b/c and §5).

A token's class comes from the tokenizer alone: its own special tokens (``all_special_ids``:
``[CLS]``, ``[SEP]``, BOS …, each its own class; the unknown token is not one, it stands for
text), punctuation by kind (a token whose text is only Unicode punctuation, named by that
text, so ``.`` and ``,`` stay apart), and ``word`` for every other token (word-pieces, numbers,
symbols). Any weights ``[*index batch query_pos key_pos]`` reduce this way: Hidden Token
Attribution contributions, raw or effective attention patterns.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_decomp._core import checks
from tl_decomp._core.results import Result

TokenKind = Literal["special", "punctuation", "word"]


def token_classes(
    tokenizer: Any, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None
) -> tuple[Int[Tensor, "batch pos"], tuple[str, ...], tuple[TokenKind, ...]]:
    """Each token's class index, the class names and their kinds.

    Classes are those the real tokens hold: specials in the tokenizer's order, punctuation
    sorted by text, then ``word``. Padding (mask 0) gets index -1.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> tok = tiny_model("bert").tokenizer
        >>> ids = torch.tensor([tok("is . , .")["input_ids"]])
        >>> index, names, kinds = token_classes(tok, ids)
        >>> names, index.tolist()
        (('[SEP]', '[CLS]', ',', '.', 'word'), [[1, 4, 3, 2, 3, 0]])
    """
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: token classes need one")
    tokens = checks.token_ids(tokens, "tokens")
    real = torch.ones_like(tokens, dtype=torch.bool)
    if attention_mask is not None:
        real = checks.mask(attention_mask, tokens.shape).bool().to(tokens.device)
    ids = tokens[real].unique().tolist()
    unk = getattr(tokenizer, "unk_token_id", None)
    special_ids = [i for i in dict.fromkeys(tokenizer.all_special_ids) if i != unk]
    specials = [i for i in special_ids if i in ids]
    punct = {i: t for i in ids if i not in specials and _is_punctuation(t := _text(tokenizer, i))}
    names = (
        *tokenizer.convert_ids_to_tokens(specials),
        *sorted(set(punct.values())),
        "word",
    )
    counts: dict[TokenKind, int] = {
        "special": len(specials),
        "punctuation": len(set(punct.values())),
        "word": 1,
    }
    kinds: tuple[TokenKind, ...] = tuple(k for k, n in counts.items() for _ in range(n))
    of_id = {i: k for k, i in enumerate(specials)} | {i: names.index(t) for i, t in punct.items()}
    index = tokens.cpu().clone().apply_(lambda i: of_id.get(i, len(names) - 1))
    return index.where(real.cpu(), -1).to(tokens.device), names, kinds


def _text(tokenizer: Any, i: int) -> str:
    return tokenizer.decode([i]).strip()


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


@dataclass(frozen=True, repr=False)
class TokenClassShares(Result):
    """Weights over key positions summed by the key's token class, averaged over queries.

    For weights ``w[..., b, i, j]`` (rows: queries ``i``; columns: keys ``j``) and a class
    ``K``, a query's share is ``sum_{real j in K} w[..., b, i, j]``.

    Attributes:
        shares: ``[index query_class key_class]``: the mean share over the real queries of
            each class (every class has a real token, so none is empty).
        overall: ``[index key_class]``: the mean share over every real query.
        uniform: ``[key_class]``: the share a query would give the class if it spread its
            weight evenly over the keys it sees (real keys; causal: up to itself), averaged
            the same way; the baseline an "over-represented" class is read against.
        classes, kinds: class names (``[CLS]``, ``.``, ``word`` …) and their kinds.
        keys: real tokens of each class in the input.
        index: labels of the flattened leading axes (e.g. layers), `index_name` their name.
    """

    shares: Float[Tensor, "index query_class key_class"]
    overall: Float[Tensor, "index key_class"]
    uniform: Float[Tensor, " key_class"]
    classes: tuple[str, ...]
    kinds: tuple[TokenKind, ...]
    keys: Int[Tensor, " key_class"]
    index: tuple[Any, ...]
    index_name: str = "index"

    def rows(self) -> list[dict[str, Any]]:
        """One record per index and key class: ``share`` (over every query), ``uniform``,
        ``keys`` (how many tokens of that class), ``kind``."""
        return [
            {self.index_name: ix, "class": c, "kind": kind, "share": s, "uniform": u, "keys": n}
            for ix, per_index in zip(self.index, self.overall.tolist(), strict=True)
            for c, kind, s, u, n in zip(
                self.classes,
                self.kinds,
                per_index,
                self.uniform.tolist(),
                self.keys.tolist(),
                strict=True,
            )
        ]


def token_class_shares(
    weights: Float[Tensor, "*index batch query_pos key_pos"],
    tokens: Int[Tensor, "batch pos"],
    tokenizer: Any,
    *,
    attention_mask: Tensor | None = None,
    causal: bool = False,
    index: tuple[Any, ...] | None = None,
    index_name: str = "index",
) -> TokenClassShares:
    """Group `weights` over key positions by token class (`token_classes`), per query class.

    Guarantees ``shares[x, q, k] == mean over real queries i of class q of
    sum over real keys j of class k of weights[x, b, i, j]``, and where every row of
    `weights` sums to 1 over real keys, ``overall.sum(-1) == 1``. Padding queries and keys
    are left out; leading axes are flattened (row-major) into `index`.

    Args:
        weights: HTA contributions ``[layer batch query_pos key_pos]``, attention patterns
            ``[batch head_index query_pos key_pos]`` moved to ``[head_index batch ...]``, ….
        tokens: the input's token ids.
        tokenizer: the model's tokenizer (classes come from its special ids and texts).
        attention_mask: the input's 1/0 mask (default: every token real).
        causal: queries see keys up to themselves (only the `uniform` baseline reads it).
        index: labels of the flattened leading axes (default ``0 .. n-1``).
        index_name: their name in `rows` (e.g. ``layer``).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> tok = tiny_model("bert").tokenizer
        >>> ids = torch.tensor([tok("is . is ,")["input_ids"]])  # [CLS] is . is , [SEP]
        >>> w = torch.full((1, 1, 6, 6), 1 / 6)  # uniform attention
        >>> s = token_class_shares(w, ids, tok)
        >>> s.classes, [round(v, 3) for v in s.overall[0].tolist()]
        (('[SEP]', '[CLS]', ',', '.', 'word'), [0.167, 0.167, 0.167, 0.167, 0.333])
        >>> bool(torch.allclose(s.overall[0], s.uniform))
        True
    """
    tokens = checks.token_ids(tokens, "tokens")
    _check(weights, tokens, index)
    cls, classes, kinds = token_classes(tokenizer, tokens, attention_mask)
    real = cls >= 0
    n_classes = len(classes)
    onehot = torch.nn.functional.one_hot(cls.clamp_min(0), n_classes).double() * real[..., None]
    w = einops.rearrange(weights.double(), "... b q k -> (...) b q k").to(onehot.device)
    per_query = einops.einsum(w, onehot, "x b q k, b k c -> x b q c")
    summed = einops.einsum(per_query, onehot, "x b q c, b q d -> x d c")
    n_queries = onehot.sum((0, 1))  # real queries of each class
    seen = real[:, None, :] & real[:, :, None]  # [b q k]
    if causal:
        seen &= torch.ones_like(seen[0]).tril()
    even = seen.double() / seen.sum(-1, keepdim=True).clamp_min(1)
    uniform = einops.einsum(even, onehot, "b q k, b k c -> b q c")[real].mean(0)
    return TokenClassShares(
        shares=summed / n_queries[:, None],
        overall=summed.sum(1) / real.sum(),
        uniform=uniform,
        classes=classes,
        kinds=kinds,
        keys=n_queries.long(),
        index=tuple(range(w.shape[0])) if index is None else tuple(index),
        index_name=index_name,
    )


def _check(weights: Any, tokens: Tensor, index: tuple[Any, ...] | None) -> None:
    if not isinstance(weights, Tensor) or not weights.is_floating_point():
        raise TypeError(f"weights must be a floating tensor, not {type(weights).__name__}")
    if weights.ndim < 3 or weights.shape[-3:] != (*tokens.shape, tokens.shape[1]):
        raise ValueError(
            f"weights shape {tuple(weights.shape)} must end in [batch query_pos key_pos] = "
            f"{(*tokens.shape, tokens.shape[1])}"
        )
    if not torch.isfinite(weights).all():
        raise ValueError("weights hold NaN or infinite values")
    n = weights[..., 0, 0, 0].numel()
    if index is not None and len(index) != n:
        raise ValueError(f"index has {len(index)} labels for {n} leading entries")


__all__ = ["TokenClassShares", "TokenKind", "token_class_shares", "token_classes"]
