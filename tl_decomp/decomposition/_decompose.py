"""Exact vector-factor decomposition of hidden states (Mickus et al., TACL 2022).

Every hidden state is rewritten as ``e = i + h + f + c``: input embeddings, bias-free
attention heads, bias-free feed-forward outputs, and a correction term holding every bias and
every LayerNorm centering. LayerNorm is linear once the forward pass has fixed mu and sigma,
so each term is carried through every later norm exactly (docs/method.md §1).

The stack is built from raw hooks (``hook_z``, MLP outputs, every norm's input and scale),
never from ``hook_attn_out``/``hook_resid_mid``, which hold no additive terms on BERT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from tl_decomp import adapters
from tl_decomp._core import checks, convention, memory
from tl_decomp._core.convention import Layer
from tl_decomp.adapters import StackName
from tl_decomp.decomposition._algebra import BiasRule, Centering, Granularity
from tl_decomp.decomposition._encoder import check_cross_keys
from tl_decomp.decomposition._recipe import DecompositionRecipe
from tl_decomp.decomposition._result import Decomposition


def cache_for(
    model: Any,
    recipe: DecompositionRecipe,
    input: Any,
    attention_mask: Tensor | None,
    n_stacks: int = 0,
    max_memory: int | None = None,
    layers: Sequence[Layer] | None = None,
    decoder_input: Any = None,
    decoder_attention_mask: Tensor | None = None,
):
    """``(cache, tokens, mask, routing)``: the user's own cache as it is (nothing runs again;
    no tokens, no routing; it must hold what `layers` read), or text / ids tokenised and
    cached exactly as the recipe reads them, in one forward pass. `n_stacks` factor stacks
    must fit in memory (checked first). An encoder–decoder runs both stacks (`input` into
    the encoder, `decoder_input` into the decoder); tokens and mask are the recipe's stack's."""
    if recipe.stack is not None:
        return _seq2seq_cache(
            model, recipe, input, attention_mask, decoder_input, decoder_attention_mask,
            n_stacks, max_memory, layers,
        )  # fmt: skip
    if checks.is_cache(input):
        if getattr(input, "has_batch_dim", True) is False:  # run_with_cache(remove_batch_dim)
            input = {name: t[None] for name, t in input.items()}  # read as a batch of one
        shape = _pos(recipe, input, layers)
        check_memory(recipe, shape, n_stacks, max_memory)
        mask = None if attention_mask is None else checks.mask(attention_mask, shape)
        return input, None, mask, None
    tokens, mask = adapters.as_tokens(model, recipe.spec, input, attention_mask)
    check_memory(recipe, mask.shape, n_stacks, max_memory)  # [batch pos], pixels or ids
    device = adapters.model_device(model)
    tokens, mask = tokens.to(device), mask.to(device)
    moe = list(recipe.moe_layers) if recipe.granularity == "expert" else []
    with adapters.exclusive(model), adapters.capture(model, moe) as routing:
        cache = adapters.run_with_cache(model, tokens, mask, recipe.names_filter)
    return cache, tokens, mask, routing


def _seq2seq_cache(
    model, recipe, input, attention_mask, decoder_input, decoder_mask, n_stacks, max_memory, layers
):
    """`cache_for` on an encoder–decoder: the stack's tokens and mask with the cache."""
    decoder = recipe.stack == "decoder"
    if checks.is_cache(input):
        cache = adapters.rescale(model, input)
        shape = _pos(recipe, cache, layers)
        check_memory(recipe, shape, n_stacks, max_memory)
        if decoder and attention_mask is not None:  # the encoder's, as its cross keys read it
            x = next(b.cross for b in recipe.spec.blocks if b.cross is not None)
            keys = cache[x.pattern].shape
            enc = checks.mask(attention_mask, torch.Size((keys[0], keys[-1])))
            check_cross_keys(recipe.spec, cache, enc)
        mask = decoder_mask if decoder else attention_mask
        return cache, None, None if mask is None else checks.mask(mask, shape), None
    encoder = replace(recipe.spec, causal=False)  # the encoder's input: its own specials
    tokens, mask = adapters.as_tokens(model, encoder, input, attention_mask)
    device = adapters.model_device(model)
    if decoder_input is None:
        dec, dec_mask = adapters.start_tokens(model, tokens.shape[0], device), None
    else:
        ids = replace(recipe.spec, causal=True)
        dec, dec_mask = adapters.as_tokens(model, ids, decoder_input, decoder_mask)
        if dec.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"input has {tokens.shape[0]} examples but decoder_input {dec.shape[0]}"
            )
    check_memory(recipe, (dec if decoder else tokens).shape, n_stacks, max_memory)
    tokens, mask, dec = tokens.to(device), mask.to(device), dec.to(device)
    dec_mask = None if dec_mask is None else dec_mask.to(device)
    cache = adapters.run_seq2seq(model, tokens, mask, dec, dec_mask, recipe.names_filter)
    return (cache, dec, dec_mask, None) if decoder else (cache, tokens, mask, None)


def _stack(stack: Any, decoder_input: Any, input: Any) -> Any:
    """The stack asked for: `stack`, else the decoder where `decoder_input` is given (a
    cache of the user's own run holds the decoder's states without it)."""
    if stack is None and decoder_input is not None:
        return "decoder"
    if stack == "decoder" and decoder_input is None and not checks.is_cache(input):
        raise ValueError("stack='decoder' needs decoder_input= (the decoder's token ids)")
    return stack


def check_memory(
    recipe: DecompositionRecipe, shape: torch.Size, n_stacks: int, max_memory: int | None
) -> None:
    """Refuse, before any forward pass, `n_stacks` ``[factor batch pos d_model]`` stacks that
    do not fit (``max_memory`` bytes, or what the model's device has free)."""
    if max_memory is not None:
        checks.integer(max_memory, "max_memory", least=1)
    if n_stacks == 0:
        return
    b, n = shape
    n_factors = n + 1 if recipe.granularity == "token" else len(recipe.layout(n_pos=n))
    itemsize = torch.empty((), dtype=recipe.compute_dtype()).element_size()
    nbytes = n_stacks * n_factors * b * n * recipe.spec.d_model * itemsize
    what = f"{n_stacks} stack(s) of {n_factors} factors x {b} x {n} x {recipe.spec.d_model}"
    hint = (
        "ask for fewer layers, or stream a statistic with reduce= (decompose_layers), or "
        "one layer at a time with DecompositionRecipe.iter_layers, or fewer texts per batch"
    )
    memory.check_fits(nbytes, what, hint, adapters.model_device(recipe.model), max_memory)


def _pos(recipe: DecompositionRecipe, cache: Any, layers: Sequence[Layer] | None) -> torch.Size:
    """``[batch pos]`` of the run a cache holds."""
    recipe.check_cache(cache, layers)
    return cache[recipe.spec.embeds[0][1]].shape[:2]


def decompose(
    model: Any,
    input: str | Sequence[str] | Tensor | Any,
    *,
    layer: Layer = "final",
    granularity: Granularity = "coarse",
    centering: Centering = "correction",
    attention_mask: Tensor | None = None,
    split_input: bool = False,
    split_correction: bool = False,
    dtype: torch.dtype | None = None,
    bias: BiasRule = "separate",
    max_memory: int | None = None,
    decoder_input: Any = None,
    decoder_attention_mask: Tensor | None = None,
    stack: StackName | None = None,
    cross: Literal["encoder"] | None = None,
) -> Decomposition:
    """Decompose a hidden state of `model` exactly into input, attention, MLP and correction.

    Guarantees ``result.factors.sum(0) == result.target`` (the model's own activation) to
    rounding; the measured error is ``result.max_abs_error``.

    Args:
        model: a TransformerBridge, HookedTransformer or HookedEncoder.
        input: a text, a list of texts (right-padded; padding is masked), token ids, or an
            ``ActivationCache`` of your own run holding the hooks the decomposition reads
            (``names_filter=td.decomposition_names_filter(model, granularity=...)``; give its
            `attention_mask` if the batch was padded). A cache is not run again.
        layer: residual-stream index, as in TransformerLens's ``accumulated_resid``: 0 is the
            layer-0 input, ``l`` the output of block ``l - 1``, negatives count from the end
            (``-1`` = the last block's output); ``"final"`` (default) is the final embedding
            the unembedding reads (decoders: the ``ln_final`` output; encoders: layer
            ``n_layers``, reported so).
        granularity: ``coarse`` (i, h, f, c), ``layer`` (attention and MLP per layer),
            ``head`` (attention per layer and head), ``source`` (each head by key position),
            ``expert`` (as ``layer``, with each mixture-of-experts MLP split into
            ``L_expertE`` terms and ``L_shared_expert``) or ``token``: ``pos0 .. pos{n-1}``,
            what each input position contributed through the whole network, and ``bias``
            (docs/method.md §10).
        max_memory: bytes the factor stack may take (default: what the model's device has
            free); a larger one raises `MemoryError` with its size before any forward pass.
        centering: ``correction`` puts every LayerNorm centering in ``c`` (the paper);
            ``terms`` centres each term so ``c`` holds biases only. The sum is identical.
        attention_mask: 1/0 mask for token-id input.
        split_input: split the input term into ``embed``/``pos_embed``/``token_type_embed``
            (a vision model's: ``patch``/``patch_bias``/``cls_token``/``pos_embed``).
        split_correction: split ``c`` into ``ln_center``, ``ln_bias``, ``attn_bias``, ``mlp_bias``.
        dtype: compute dtype (default: the model's; float32 for half-precision models).
        decoder_input: on an encoder–decoder, the decoder's token ids (or text): the state
            decomposed is then the decoder's, `input` feeding the encoder. Its terms are
            ``i, h, x, f, c``: ``x`` is cross-attention (``{b}_cross_out``, ``X{b}H{h}``,
            ``X{b}H{h}K{k}`` with ``k`` an encoder position), whose values, the encoder's
            output, count as an input the decoder receives.
        decoder_attention_mask: 1/0 mask of `decoder_input` ids.
        stack: ``"encoder"`` decomposes an encoder–decoder's encoder (layers counted within
            it); ``"decoder"`` (implied by `decoder_input`) its decoder.
        cross: ``"encoder"`` splits the decoder's cross-attention term by the encoder's own
            factors, the encoder decomposed at the same granularity: rows ``x.<encoder
            label>`` (``x.i``, ``x.h``, ``x.f``, ``x.c`` at coarse; ``x.L0H1K3``, ...), each
            summed over the decoder's blocks and heads (exact: the term is linear in the
            encoder's final states once the pattern is fixed; ``b_V`` stays in ``c``).
        bias: at ``granularity="token"``, ``separate`` (Oh & Schuler) keeps what no token
            owns in the last factor, ``bias``; ``distribute`` spreads it over the tokens in
            proportion to ``|<t_k, e>|`` at each position, read at the layer asked (DecompX
            spreads each bias where it is added; the sum is the same).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("bert", dtype=torch.float64)
        >>> d = decompose(model, "the cat sat on the mat")
        >>> d.labels
        ('i', 'h', 'f', 'c')
        >>> d.relative_error < 1e-9
        True
        >>> bool(torch.allclose(d.shares().sum(0), torch.ones(1, 8, dtype=torch.float64)))
        True
    """
    options = dict(
        granularity=granularity,
        centering=centering,
        split_input=split_input,
        split_correction=split_correction,
        dtype=dtype,
        bias=bias,
        stack=_stack(stack, decoder_input, input),
        cross=cross,
    )
    recipe = DecompositionRecipe.for_model(model, **options)
    layer = convention.resolve(recipe.spec, layer)
    cache, tokens, mask, routing = cache_for(
        model, recipe, input, attention_mask, n_stacks=1, max_memory=max_memory, layers=[layer],
        decoder_input=decoder_input, decoder_attention_mask=decoder_attention_mask,
    )  # fmt: skip
    return recipe.decompose(cache, layer, tokens=tokens, attention_mask=mask, routing=routing)


def decompose_layers(
    model: Any,
    input: str | Sequence[str] | Tensor | Any,
    *,
    layers: Sequence[Layer] | None = None,
    granularity: Granularity = "coarse",
    centering: Centering = "correction",
    attention_mask: Tensor | None = None,
    split_input: bool = False,
    split_correction: bool = False,
    dtype: torch.dtype | None = None,
    bias: BiasRule = "separate",
    reduce: Any = None,
    max_memory: int | None = None,
    decoder_input: Any = None,
    decoder_attention_mask: Tensor | None = None,
    stack: StackName | None = None,
    cross: Literal["encoder"] | None = None,
) -> list[Any]:
    """The decomposition at every layer from one forward pass.

    Returns one `Decomposition` per residual-stream index in `layers`, in depth order: by
    default 0 (the layer-0 input) .. ``n_layers`` (the last block's output), then ``"final"``
    where the final embedding is a separate site (a decoder's ``ln_final``), as
    TransformerLens's ``accumulated_resid`` orders them. For corpora,
    `DecompositionRecipe.iter_layers` yields the same one layer at a time.

    With `reduce` (``"shares"``, ``"norm_ratios"``, ``"cosines"``, ``("logit", tokens)``),
    returns instead one `tl_decomp.Reduced` per layer: that statistic of every factor
    (``[factor batch pos]``, labels as the decomposition's), computed without the factor
    stack, one chunk of heads at a time (`DecompositionRecipe.iter_reduced`).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> ds = decompose_layers(tiny_model("gpt2"), ["the cat", "a dog sat"])
        >>> [d.layer for d in ds]
        [0, 1, 2, 3, 'final']
        >>> max(d.relative_error for d in ds) < 1e-4
        True
        >>> rs = decompose_layers(tiny_model("gpt2"), "a dog", granularity="head", reduce="shares")
        >>> rs[-1].labels[:2], tuple(rs[-1].values.shape)
        (('input', 'L0H0'), (17, 1, 3))
    """
    options = dict(
        granularity=granularity,
        centering=centering,
        split_input=split_input,
        split_correction=split_correction,
        dtype=dtype,
        bias=bias,
        stack=_stack(stack, decoder_input, input),
        cross=cross,
    )
    recipe = DecompositionRecipe.for_model(model, **options)
    layers = convention.resolve_many(recipe.spec, layers)
    if reduce is not None:
        recipe.check_statistic(reduce)  # before the forward pass
    stacks = 0 if reduce is not None else len(layers) + 1  # the list, and the walk's buffer
    cache, tokens, mask, routing = cache_for(
        model, recipe, input, attention_mask, n_stacks=stacks, max_memory=max_memory,
        layers=layers, decoder_input=decoder_input, decoder_attention_mask=decoder_attention_mask,
    )  # fmt: skip
    if reduce is not None:
        return list(
            recipe.iter_reduced(cache, reduce, layers, attention_mask=mask, routing=routing)
        )
    it = recipe.iter_layers(cache, layers, tokens=tokens, attention_mask=mask, routing=routing)
    return list(it)


def names_filter(model: Any, **options: Any) -> Any:
    """The ``names_filter`` caching exactly what `decompose` reads with these options
    (``granularity``, ``split_input``, ...), for ``model.run_with_cache``."""
    return DecompositionRecipe.for_model(model, **options).names_filter


__all__ = ["decompose", "decompose_layers", "names_filter"]
