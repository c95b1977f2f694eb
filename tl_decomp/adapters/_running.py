"""Running a model: tokenising, checking input, caching, temporary hooks.

One call signature for every model class `tl_decomp.adapters` describes; like that module,
the only place that knows how TransformerBridge, HookedTransformer and HookedEncoder differ
when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tl_decomp._core import checks
from tl_decomp._core.spec import ModelSpec
from tl_decomp.adapters._common import model_kind
from tl_decomp.adapters._seq2seq import decoder_text_ids, is_seq2seq
from tl_decomp.adapters._state import evaluating, exclusive
from tl_decomp.adapters._vision import Image, image_input


def run_with_cache(
    model: Any,
    tokens: Tensor,
    attention_mask: Tensor | None,
    names_filter: Callable[[str], bool],
    token_type_ids: Tensor | None = None,
) -> Any:
    """Run `model` on token ids (or a vision model's pixel values) and cache what
    `names_filter` selects; no hook survives."""
    kind = model_kind(model)
    kwargs: dict[str, Any] = {"names_filter": names_filter}
    if kind == "HookedEncoder":
        kwargs["one_zero_attention_mask"] = attention_mask
        kwargs["token_type_ids"] = token_type_ids
    elif not tokens.is_floating_point():  # pixel values: an image has no padding to mask
        kwargs["attention_mask"] = attention_mask
        if token_type_ids is not None and kind == "TransformerBridge":
            kwargs["token_type_ids"] = token_type_ids
    with exclusive(model), torch.no_grad(), evaluating(model):
        _, cache = model.run_with_cache(tokens, **kwargs)
    return cache


def check_corpus(
    model: Any, spec: ModelSpec, texts: Any, batch_size: int, arg: str = "texts"
) -> list[str]:
    """The corpus functions' one input check, before any forward pass: a list of non-blank
    texts, a positive batch size, every text within the context."""
    if isinstance(texts, str):
        raise TypeError(f"{arg} must be a list of texts, not one str")
    texts = checks.texts(texts, arg)
    checks.integer(batch_size, "batch_size", least=1)
    check_lengths(model, spec, texts, arg)
    return texts


def check_lengths(model: Any, spec: ModelSpec, texts: Sequence[str], arg: str = "texts") -> None:
    """Every text fits the context, checked before any forward pass (a corpus's last batch
    would otherwise fail deep inside the model after minutes of work)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer: pass token ids instead of text")
    for k, t in enumerate(texts):
        n = len(_ids(model, t, encoder=not spec.causal))
        if n > spec.n_ctx:
            raise ValueError(f"{arg}[{k}] has {n} tokens; the model's context is {spec.n_ctx}")


def _ids(model: Any, text: str, *, encoder: bool) -> list[int]:
    """One text's ids as `tokenize` gives them: the tokenizer's own specials on encoders
    ([CLS] ... [SEP]); on decoders a BOS where TransformerLens would prepend one; on an
    encoder–decoder's decoder its target ids shifted behind the decoder's start token."""
    tok = model.tokenizer
    if encoder:
        return tok(text)["input_ids"]
    if is_seq2seq(model):  # the decoder reads what Hugging Face's training feeds it
        return decoder_text_ids(model, text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if getattr(model.cfg, "default_prepend_bos", True) and bos is not None:
        return [bos, *ids]
    return ids


def tokenize(model: Any, texts: str | Sequence[str], *, encoder: bool) -> tuple[Tensor, Tensor]:
    """Token ids and a 1/0 attention mask, right-padded, with the model's special tokens.

    Encoders get the tokenizer's own specials ([CLS] ... [SEP]); decoders get a BOS token
    where TransformerLens would prepend one; an encoder–decoder's decoder (``encoder=False``)
    gets its targets shifted right behind its start token (`decoder_text_ids`).
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer: pass token ids instead of text")
    texts = checks.texts(texts)
    ids = [_ids(model, t, encoder=encoder) for t in texts]
    width = max(len(i) for i in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    tokens = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    return tokens, mask


def as_tokens(
    model: Any, spec: ModelSpec, input: Any, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Text, texts or token ids -> checked ``(tokens, mask)`` [batch pos], mask 1/0 long.

    Token ids must lie in the vocabulary and every example needs one real token: both would
    otherwise fail deep inside a hooked forward pass. A vision model reads pixel values
    instead: ``(pixels, mask)``, pixels ``[batch channels height width]`` as given, the mask
    all ones over the positions its embedding makes (prefix tokens and patches).
    """
    if checks.is_cache(input):
        raise TypeError(
            "input is an ActivationCache (or a dict), where text or token ids are expected: "
            "decompose(model, cache) and effective_attention(cache, block) read a cache; "
            "this analysis runs the model itself"
        )
    image = image_input(model)
    if image is not None:
        return as_pixels(image, input, attention_mask)
    if isinstance(input, (str, list, tuple)):
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is only accepted with token ids; text is padded for you"
            )
        tokens, mask = tokenize(model, checks.texts(input), encoder=not spec.causal)
        what = "the tokenizer gives id"  # a tokenizer larger than the model's embedding
    else:
        tokens = checks.token_ids(input)
        ones = torch.ones_like(tokens)
        if attention_mask is not None and isinstance(input, Tensor) and input.ndim == 1:
            attention_mask = torch.as_tensor(attention_mask).reshape(1, -1)  # one example
        mask = ones if attention_mask is None else checks.mask(attention_mask, tokens.shape)
        mask = mask.to(tokens.device)
        what = "token id"
    bad = tokens[(tokens < 0) | (tokens >= spec.d_vocab)] if spec.d_vocab > 0 else tokens[:0]
    if bad.numel():
        raise ValueError(f"{what} {int(bad[0])} is outside the vocabulary (0..{spec.d_vocab - 1})")
    if (mask.sum(-1) == 0).any():
        k = int((mask.sum(-1) == 0).nonzero()[0])
        why = "the tokenizer gives it no token" if what != "token id" else "its mask row is all 0"
        raise ValueError(f"example {k} has no real token: {why}")
    if tokens.shape[1] > spec.n_ctx:
        raise ValueError(f"input has {tokens.shape[1]} tokens; the model's context is {spec.n_ctx}")
    return tokens, mask


def as_pixels(image: Image, input: Any, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """A vision model's checked ``(pixels, mask)``: see `as_tokens`."""
    if attention_mask is not None:
        raise ValueError("attention_mask: a vision model's input is whole images, not padded")
    pixels = checks.pixel_values(input, image.shape)
    mask = torch.ones(pixels.shape[0], image.n_pos, dtype=torch.long, device=pixels.device)
    return pixels, mask


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def cache_model(cache: Any) -> Any:
    """The model an `ActivationCache` came from (None for a plain dict)."""
    return getattr(cache, "model", None)


# -- Running a model with temporary hooks (identifiability, attribution) --------------------
# For identifiability and Hidden Token Attribution: one call signature for the
# three model classes, and an early stop so nothing after the last hook needed runs (the
# MLM head or unembedding would otherwise cost as much as a small encoder's blocks).


class _StopRun(Exception):
    """Raised by the hook a run stops after; caught by `run_with_hooks`."""


def _stop(tensor: Tensor, *, hook: Any) -> None:
    raise _StopRun


def run_with_hooks(
    model: Any,
    tokens: Tensor,
    attention_mask: Tensor | None,
    fwd_hooks: Sequence[tuple[str, Callable[..., Any]]],
    *,
    stop_after: str | None = None,
) -> None:
    """Run `model` on token ids with temporary forward hooks, removed even if the run raises.

    Hooks on one name run in the order given; a hook that returns a tensor replaces the
    activation. With `stop_after`, the run ends once that hook's hooks have run.
    """
    hooks = list(fwd_hooks) + ([(stop_after, _stop)] if stop_after else [])
    key = "one_zero_attention_mask" if model_kind(model) == "HookedEncoder" else "attention_mask"
    kwargs = {} if tokens.is_floating_point() else {key: attention_mask}  # pixels: no padding
    try:
        with exclusive(model), model.hooks(fwd_hooks=hooks), evaluating(model):
            model(tokens, **kwargs)
    except _StopRun:
        pass


def check_finite(activations: dict[str, Tensor], mask: Tensor | None = None) -> None:
    """Raise naming the first (in the order given) activation holding NaN or inf at a real
    position: a NaN would otherwise become an argmax that picks position 0, or a silent NaN
    contribution. `mask` [batch pos] marks the real positions of ``[batch pos ...]`` tensors.
    """
    for name, t in activations.items():
        bad = ~torch.isfinite(t)
        if mask is not None and bad.ndim >= 2 and bad.shape[:2] == mask.shape:
            bad = bad & mask.bool().reshape(*mask.shape, *([1] * (bad.ndim - 2)))
        if bad.any():
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"the model's activation {name} contains NaN or inf (at {where})")


def embedding_matrix(model: Any) -> Tensor:
    """The token embedding matrix ``W_E`` [d_vocab d_model] that the embed hook reads from."""
    return model.W_E.detach()


def norm_eps(model: Any) -> float:
    """The epsilon of the model's LayerNorms / RMSNorms (inside sigma, docs/method.md §1.1)."""
    return float(model.cfg.eps)
