"""Word pieces and the masked-LM head, as `tl_decomp.probing` needs them.

Where each token of a text came from (to sum a word's pieces), and the masked-LM head
applied to any final-embedding vectors (to predict from a subset of factors). Both differ by
model class; nothing else in the probing module does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tl_decomp.adapters._common import architecture, model_kind
from tl_decomp.adapters._running import tokenize


def tokenize_offsets(
    model: Any, texts: Sequence[str], *, encoder: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """`tokenize`, plus each token's character span ``[batch pos 2]`` in its text.

    The ids and mask are exactly `tokenize`'s; specials, the prepended BOS and padding get
    the span ``(0, 0)``. Needs a fast (Rust) tokenizer, which reports offsets.
    """
    tok = model.tokenizer
    if tok is None or not getattr(tok, "is_fast", False):
        raise ValueError("word alignment needs the model's fast tokenizer (offsets mapping)")
    tokens, mask = tokenize(model, texts, encoder=encoder)
    spans = torch.zeros((*tokens.shape, 2), dtype=torch.long)
    for b, text in enumerate(texts):
        enc = tok(text, add_special_tokens=encoder, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = int(mask[b].sum()) - len(ids)  # 1 when a BOS was prepended, else 0
        if tokens[b, start : start + len(ids)].tolist() != ids:
            raise ValueError("the tokenizer's offsets do not match its own ids")
        special = set(tok.all_special_ids) if encoder else set()
        for p, (i, (s, e)) in enumerate(zip(ids, offsets, strict=True)):
            if i not in special:
                spans[b, start + p] = torch.tensor([s, e])
    return tokens, mask, spans


def mlm_logits(model: Any, resid: Tensor) -> Tensor:
    """The model's own masked-LM head on final-embedding vectors ``[... d_model]``.

    HookedEncoder: ``unembed(mlm_head(x))``, the two steps of its forward. Bridge (BERT): the
    wrapped Hugging Face ``cls.predictions`` module (dense, activation, LayerNorm, decoder),
    whose bridged submodules are the ``mlm_head``, ``ln_final`` and ``unembed`` components.

    Raises:
        NotImplementedError: the model has no masked-LM head.
    """
    kind, head = model_kind(model), None
    if kind == "TransformerBridge" and hasattr(model, "mlm_head"):
        hf = getattr(model, "original_model", None)
        head = getattr(getattr(hf, "cls", None), "predictions", None)
    if kind != "HookedEncoder" and head is None:
        raise NotImplementedError(
            f"{type(model).__name__} ({architecture(model)}) has no masked-LM head"
        )
    flat = resid.reshape(1, -1, resid.shape[-1])  # HookedEncoder's modules want [batch pos d]
    with torch.no_grad():
        out = model.unembed(model.mlm_head(flat)) if head is None else head(flat)
    return out.reshape(*resid.shape[:-1], out.shape[-1])
