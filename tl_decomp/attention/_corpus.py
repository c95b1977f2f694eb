"""Effective attention over a corpus: raw-vs-effective correlation by length and attention on
special tokens [B, Fig. 1]. Each batch is one forward pass caching what effective attention
reads; the projection itself is `tl_decomp.attention`'s.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core import convention, distributed
from tl_decomp._core.results import Result
from tl_decomp._core.spec import ModelSpec
from tl_decomp.attention._effective import BlockOptions, allowed_keys, effective_block


@dataclass(frozen=True, repr=False)
class AttentionCorrelation(Result):
    """Pearson r between raw and effective attention per text, block and head.

    r runs over every entry a query may attend to (valid keys; causal: up to itself;
    sliding-window layers: within the window), and is NaN where a pattern is constant
    (one-token texts). ``r[i]`` belongs to ``texts[i]``.
    """

    blocks: tuple[int, ...]
    lengths: Int[Tensor, " seq"]
    r: Float[Tensor, "seq block head_index"]

    def rows(self) -> list[dict[str, Any]]:
        """One record per text, block and head: ``text`` (its index), ``tokens``, ``block``,
        ``head``, ``r``; `by_length` bins them."""
        n = self.lengths.tolist()
        return [
            {"text": t, "tokens": n[t], "block": L, "head": h, "r": r}
            for t, per_text in enumerate(self.r.tolist())
            for L, per_block in zip(self.blocks, per_text, strict=True)
            for h, r in enumerate(per_block)
        ]

    def by_length(
        self, edges: Sequence[int] = (8, 16, 32, 48, 64, 96, 128, 192, 256, 512)
    ) -> list[dict[str, Any]]:
        """One row per length bin ``lo < tokens <= hi``: r over texts, blocks and heads."""
        bounds = [0, *edges, None]
        rows = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            pick = (self.lengths > lo) & (self.lengths <= (hi or self.lengths.max()))
            r = self.r[pick].flatten()
            r = r[~r.isnan()]
            if r.numel():
                q = torch.quantile(r, torch.tensor([0.25, 0.5, 0.75], dtype=r.dtype)).tolist()
                rows.append(
                    dict(
                        tokens=f"{lo + 1}-{hi or ''}",
                        texts=int(pick.sum()),
                        mean=r.mean().item(),
                        q25=q[0],
                        median=q[1],
                        q75=q[2],
                    )
                )
        return rows


def attention_correlation(
    model: Any,
    texts: Sequence[str],
    *,
    blocks: Sequence[int] | None = None,
    batch_size: int = 16,
    value_bias: bool = True,
    preserve_row_sums: bool = False,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> AttentionCorrelation:
    """Correlation of raw and effective attention, to be read by length [B, Fig. 1a].

    Brunner et al. (BERT-base, d_head 64): r is about 1 up to 64 tokens and about 0.5 at
    100. Texts run in batches of similar length; options as in `effective_attention`. Under
    `torch.distributed` each rank runs its share of the batches; every rank returns all texts.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> corr = attention_correlation(tiny_model("bert"), ["the cat sat", "a " * 20])
        >>> corr.lengths.tolist(), tuple(corr.r.shape)  # d_head 8: the first is exact
        ([5, 22], (2, 3, 4))
        >>> [(row["tokens"], round(row["median"], 6)) for row in corr.by_length((8,))]
        [('1-8', 1.0), ('9-', ...)]
    """
    spec = adapters.model_spec(model)
    Ls = convention.blocks(spec, blocks)
    opts = BlockOptions(value_bias, preserve_row_sums, rtol, dtype)
    texts = adapters.check_corpus(model, spec, texts, batch_size)
    lengths = torch.zeros(len(texts), dtype=torch.long)
    r = torch.zeros((len(texts), len(Ls), spec.n_heads), dtype=dtype)  # a rank's rows, else 0
    with distributed.guard():
        for index, _, mask, cache in _corpus(model, spec, texts, batch_size):
            lengths[index] = mask.sum(-1).cpu()
            for i, L in enumerate(Ls):
                allowed = allowed_keys(
                    mask, spec.causal, spec.blocks[L].window, spec.blocks[L].chunk
                )
                a = cache[spec.blocks[L].pattern].to(dtype).where(allowed, 0.0)
                r[index, i] = _pearson(
                    a, effective_block(cache, spec, L, mask, opts), allowed
                ).cpu()
    # each row has one owner: the sum over ranks copies it exactly (NaN + 0 stays NaN)
    return AttentionCorrelation(tuple(Ls), distributed.all_sum(lengths), distributed.all_sum(r))


@dataclass(frozen=True, repr=False)
class SpecialTokenAttention(Result):
    """Mean attention a query gives to each kind of key token, per layer (averaged over
    queries, heads and texts): raw and effective.

    Attributes:
        categories: ``[CLS]``/``[SEP]`` (encoders) or ``BOS`` (decoders), ``punctuation``
            (tokens made only of Unicode punctuation), ``other``.
        raw, effective: attention mass on each category; raw rows sum to 1 over categories.
        tokens: how many key tokens of each category the texts held.
    """

    blocks: tuple[int, ...]
    categories: tuple[str, ...]
    raw: Float[Tensor, "block category"]
    effective: Float[Tensor, "block category"]
    tokens: Int[Tensor, " category"]

    def rows(self) -> list[dict[str, Any]]:
        """One row per block: ``raw <category>`` and ``effective <category>`` columns."""
        return [
            {"block": L}
            | {f"raw {c}": self.raw[i, j].item() for j, c in enumerate(self.categories)}
            | {f"effective {c}": self.effective[i, j].item() for j, c in enumerate(self.categories)}
            for i, L in enumerate(self.blocks)
        ]


def special_token_attention(
    model: Any,
    texts: Sequence[str],
    *,
    blocks: Sequence[int] | None = None,
    batch_size: int = 16,
    value_bias: bool = True,
    preserve_row_sums: bool = False,
    rtol: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> SpecialTokenAttention:
    """Attention on ``[CLS]``, ``[SEP]``/BOS and punctuation per layer, raw vs effective.

    Brunner et al. (Fig. 1b/c, BERT-base): raw attention on ``[SEP]`` is about 0.5 in the
    middle layers, effective attention on it at most 0.1. Options as in `effective_attention`.
    Under `torch.distributed` each rank runs its share of the batches; the sums are reduced.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> st = special_token_attention(tiny_model("bert"), ["the cat sat .", "a dog ran"])
        >>> st.categories, st.tokens.tolist()
        (('[CLS]', '[SEP]', 'punctuation', 'other'), [2, 2, 1, 6])
        >>> bool(torch.allclose(st.raw.sum(-1), torch.ones(3, dtype=torch.float64)))
        True
    """
    spec = adapters.model_spec(model)
    Ls = convention.blocks(spec, blocks)
    opts = BlockOptions(value_bias, preserve_row_sums, rtol, dtype)
    texts = adapters.check_corpus(model, spec, texts, batch_size)
    names, special = _categories(model, spec)
    raw, eff = torch.zeros(2, len(Ls), len(names), dtype=dtype)
    seen, queries = torch.zeros(len(names), dtype=torch.long), torch.zeros((), dtype=torch.long)
    with distributed.guard():
        for _, tokens, mask, cache in _corpus(model, spec, texts, batch_size):
            kind = _categorise(model, tokens, special, len(names))
            onehot = torch.nn.functional.one_hot(kind, len(names)).to(dtype) * mask[..., None]
            seen += onehot.sum((0, 1)).long().cpu()
            queries += int(mask.sum()) * spec.n_heads
            for i, L in enumerate(Ls):
                allowed = allowed_keys(
                    mask, spec.causal, spec.blocks[L].window, spec.blocks[L].chunk
                )
                a = cache[spec.blocks[L].pattern].to(dtype).where(allowed, 0.0)
                raw[i] += einops.einsum(a, onehot, "b h q k, b k c -> c").cpu()
                eff[i] += einops.einsum(
                    effective_block(cache, spec, L, mask, opts), onehot, "b h q k, b k c -> c"
                ).cpu()
    raw, eff, seen, queries = (distributed.all_sum(t) for t in (raw, eff, seen, queries))
    return SpecialTokenAttention(tuple(Ls), names, raw / queries, eff / queries, seen)


def _corpus(
    model: Any, spec: ModelSpec, texts: Sequence[str], batch_size: int
) -> Iterator[tuple[Tensor, Tensor, Tensor, Any]]:
    """Texts in batches of similar length: (their indices, tokens, bool mask, cache); under
    `torch.distributed`, this rank's share of the batches."""
    tokens, mask = adapters.tokenize(model, list(texts), encoder=not spec.causal)
    lengths = mask.sum(-1)
    device = adapters.model_device(model)
    windows = [b.window for b in spec.blocks if b.window is not None]
    for _, index in distributed.deal(_batches(lengths, batch_size, min(windows, default=None))):
        width = int(lengths[index].max())
        t, m = tokens[index, :width].to(device), mask[index, :width].to(device)
        yield (
            index,
            t,
            m.bool(),
            adapters.run_with_cache(model, t, m, spec.names_filter(attention=True)),
        )


def _batches(lengths: Tensor, batch_size: int, window: int | None) -> list[Tensor]:
    """Text indices by length, `batch_size` at most a batch, and with a sliding window, no
    text padded by `window` tokens or more: a padded query whose window then holds no valid
    key gets a NaN row from Hugging Face's eager attention, which spreads over its whole
    example in the next layer."""
    order, n = lengths.argsort(stable=True).tolist(), lengths.tolist()
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        last = i == len(order) or i - start == batch_size
        if last or (window and n[order[i]] - n[order[start]] >= window):
            batches.append(torch.tensor(order[start:i]))
            start = i
    return batches


def _pearson(a: Tensor, b: Tensor, allowed: Tensor) -> Tensor:
    w = allowed.to(a.dtype)
    count = w.sum((-2, -1))
    da = (a - (a * w).sum((-2, -1), keepdim=True) / count[..., None, None]) * w
    db = (b - (b * w).sum((-2, -1), keepdim=True) / count[..., None, None]) * w
    cov = (da * db).sum((-2, -1))
    return cov / (da.square().sum((-2, -1)) * db.square().sum((-2, -1))).sqrt()


def _categories(model: Any, spec: ModelSpec) -> tuple[tuple[str, ...], dict[int, int]]:
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer: token categories need one")
    named = (
        [("BOS", tok.bos_token_id)]
        if spec.causal
        else [("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)]
    )
    named = [(name, i) for name, i in named if i is not None]
    names = (*(name for name, _ in named), "punctuation", "other")
    return names, {i: c for c, (_, i) in enumerate(named)}


def _categorise(model: Any, tokens: Tensor, special: dict[int, int], n: int) -> Tensor:
    """Category index per token: a special token, punctuation (n - 2) or other (n - 1)."""
    kind = {}
    for i in tokens.unique().tolist():
        text = model.tokenizer.decode([i]).strip()
        punct = bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)
        kind[i] = special.get(i, n - 2 if punct else n - 1)
    return tokens.cpu().apply_(kind.__getitem__).to(tokens.device)


__all__ = [
    "AttentionCorrelation",
    "SpecialTokenAttention",
    "attention_correlation",
    "special_token_attention",
]
