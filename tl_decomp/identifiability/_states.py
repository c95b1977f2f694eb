"""Token identifiability (Brunner et al., ICLR 2020, section 4; docs/method.md §7).

Can the input token at position ``t`` be recovered from its hidden vector ``e_t^l``? A map
``g: e^l -> e^0`` is fitted on a training split of sequences, and a test token counts as
identified when the nearest neighbour of ``g(e_t^l)`` among the candidates holds its token id.
Candidates are the layer-0 vectors of the same sequence (``lookup="sequence"``, the paper's
default) or of every vocabulary item at that token's position (``lookup="vocab"``).

Memory does not grow with the corpus: hidden states are gathered a batch at a time, the
linear map is fitted from streamed normal equations (float64), and the test split is scored
as it streams past. The MLP map trains on at most `max_mlp_tokens` stored training vectors.
This module gathers the states from a model; `tl_decomp.identifiability` scores them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Literal, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from tl_decomp import adapters
from tl_decomp._core import checks, convention, distributed
from tl_decomp._core.convention import Layer
from tl_decomp._core.spec import ModelSpec
from tl_decomp.identifiability._maps import Distance, Loss, Mapping
from tl_decomp.identifiability._scoring import (
    IdentifiabilityResult,
    Match,
    StateBatch,
    Vocab,
    check_loss,
    identifiability_from_states,
)
from tl_decomp.identifiability._stacks import check_stack, gather_stack_states

Lookup = Literal["sequence", "vocab"]


def _capture(store: dict[str, Tensor], site: str, tensor: Tensor, *, hook: Any) -> None:
    store[site] = tensor


def gather_states(
    model: Any,
    spec: ModelSpec,
    corpus: Sequence[str] | Tensor,
    order: Sequence[int],
    layers: Sequence[Layer],
    batch_size: int,
    vocab: bool,
    bar: Any,
) -> Iterator[StateBatch]:
    """Hidden states of `corpus[order]` (texts, or a vision model's images ``[n channels
    height width]``), a batch at a time; the run stops at the deepest layer."""
    deepest = max(layers, key=lambda L: convention.depth(spec, L))
    sites = [spec.layer0] + [convention.site(spec, L) for L in layers if L != 0]
    sites.append(convention.site(spec, deepest))  # the run stops after the last site
    embeds = [h for _, h in spec.embeds] if vocab else []
    W_E = adapters.embedding_matrix(model) if vocab else None
    device = adapters.model_device(model)
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    for _, idx in distributed.deal(batches):  # under torch.distributed: this rank's share
        run_on, tokens, mask = _inputs(model, spec, corpus, idx, device)
        got: dict[str, Tensor] = {}
        hooks = [(s, functools.partial(_capture, got, s)) for s in dict.fromkeys(sites + embeds)]
        with torch.no_grad():
            adapters.run_with_hooks(model, run_on, mask, hooks, stop_after=sites[-1])
        adapters.check_finite({s: got[s] for s in dict.fromkeys(sites)}, mask)
        e0 = got[spec.layer0]
        states = torch.stack([got[convention.site(spec, L)] for L in layers])
        offsets = None if W_E is None else sum(got[h] for h in embeds) - W_E[tokens]
        yield StateBatch(tokens, mask, e0, states, offsets, torch.tensor(idx, device=device))
        bar.update(len(idx))


def _inputs(
    model: Any, spec: ModelSpec, corpus: Sequence[str] | Tensor, idx: list[int], device
) -> tuple[Tensor, Tensor, Tensor]:
    """One batch's model input, token ids and mask. Images have no token ids: each
    position's index (prefix tokens, then patches) stands in for one."""
    if isinstance(corpus, Tensor):
        pixels, mask = adapters.as_tokens(model, spec, corpus[torch.tensor(idx)])
        ids = torch.arange(mask.shape[1]).expand_as(mask)
        return pixels.to(device, next(model.parameters()).dtype), ids.to(device), mask.to(device)
    tokens, mask = adapters.tokenize(model, [corpus[i] for i in idx], encoder=not spec.causal)
    if tokens.shape[1] > spec.n_ctx:
        raise ValueError(f"a sequence has {tokens.shape[1]} tokens; the context is {spec.n_ctx}")
    return tokens.to(device), tokens.to(device), mask.to(device)


def _check(
    spec: ModelSpec,
    corpus: Sequence[str] | Tensor | Sequence[Tensor],
    layers: Sequence[Layer] | None,
    options: dict[str, tuple[str, tuple[str, ...]]],
    test_fraction: float,
) -> tuple[Layer, ...]:
    for name, (value, allowed) in options.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
    layers = convention.resolve_many(spec, layers, default=range(spec.n_layers + 1))
    checks.number(test_fraction, "test_fraction", low=0.0, high=1.0)
    return layers


def _check_images(
    image: adapters.Image, corpus: Any, lookup: str, match: str, batch_size: int
) -> Float[Tensor, "batch channels height width"]:
    """A vision model's corpus, checked: its patches have positions but no vocabulary."""
    if lookup == "vocab":
        raise ValueError(
            "lookup='vocab' looks among vocabulary items: a vision model reads pixels and has "
            "none; use lookup='sequence' (the image's own layer-0 vectors)"
        )
    if match == "token":
        raise ValueError(
            "match='token' compares token ids: a vision model's patches have none; "
            "use match='position'"
        )
    checks.integer(batch_size, "batch_size", least=1)
    return adapters.image_corpus(image, corpus)


def split_corpus(
    corpus: Sequence[str] | Tensor, test_fraction: float, seed: int, mapping: str
) -> tuple[list[int], list[int]]:
    """Random split by sequence (or image); each side sorted by length, which keeps padding
    low."""
    n = len(corpus)
    n_test = max(1, round(n * test_fraction))
    need = 10 if mapping == "mlp" else 1
    if n - n_test < need:
        raise ValueError(
            f"a corpus of {n} sequence(s) is too short for the split: "
            f"{n_test} test and at least {need} training sequence(s) are needed"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    by_length = functools.partial(sorted, key=lambda i: len(corpus[i]))
    return by_length(perm[n_test:]), by_length(perm[:n_test])


def token_identifiability(
    model: Any,
    corpus: Sequence[str] | Tensor | Sequence[Tensor],
    *,
    mapping: Mapping = "linear",
    distance: Distance = "cosine",
    loss: Loss | None = None,
    lookup: Lookup = "sequence",
    layers: Sequence[Layer] | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    batch_size: int = 32,
    cross_layer: bool = False,
    max_mlp_tokens: int = 20_000,
    match: Match | None = None,
    progress: bool = True,
    stack: adapters.StackName | None = None,
    decoder_input: Sequence[str] | None = None,
) -> IdentifiabilityResult:
    """How often each layer's hidden vector still identifies its input token.

    A map ``g_l: e^l -> e^0`` is fitted on a random ``1 - test_fraction`` of the sequences;
    a test token is identified when the nearest candidate to ``g_l(e_t^l)`` has its token id.

    Args:
        model: a TransformerBridge, HookedTransformer or HookedEncoder.
        corpus: texts, one sequence each (the split is by sequence); for a vision model,
            images ``[n_images channels height width]`` or a sequence of ``[channels height
            width]`` (split by image; each position, prefix tokens and patches, is scored).
        mapping: ``naive`` (identity), ``linear`` (an affine map) or ``mlp`` (one hidden
            layer; Adam; early stopping on every 10th training sequence).
        distance: ``cosine`` or ``l2`` for the nearest-neighbour lookup.
        loss: what the map is trained to minimise: ``mse`` or ``cosine`` (mean
            ``1 - cos``). Default: ``mse`` for ``linear`` (least squares, closed form,
            streamed), the lookup's own distance for ``mlp``. Brunner et al. train every map
            with the lookup's distance: ``loss="cosine"`` with a cosine lookup is their
            linear-cosine protocol (trained by Adam from the least-squares fit, on the
            `max_mlp_tokens` sample; never worse on the validation sequences than least
            squares). A map fitted on fewer training values (tokens x d_model) than
            ``MIN_TOKENS_PER_PARAMETER`` (5) times its parameters warns and is flagged in
            the result's table (MiniLM, d_model 384: 1,925 training tokens for the linear
            map, about 100 shipped sentences; twice that for the MLP).
        lookup: among the layer-0 vectors of the token's own sequence (``sequence``) or of
            every vocabulary item at the token's position (``vocab``; costs ``d_vocab`` dot
            products per token and layer).
        layers: residual-stream indices, 0 (the layer-0 input) to ``n_layers`` (negatives
            from the end; ``"final"``: a decoder's final-norm output); default 0..n_layers.
        seed: seeds the split and the MLP.
        test_fraction: share of sequences held out for scoring.
        batch_size: sequences per forward pass (memory is per batch, not per corpus).
        cross_layer: also score every map on every layer (`IdentifiabilityResult.cross_layer`).
        max_mlp_tokens: training tokens a trained map (``mlp``, or ``linear`` with
            ``loss="cosine"``) keeps in memory (a uniform sample of the training split's
            tokens).
        match: ``token`` (default for text): identified when the nearest layer-0 vector
            holds the same token id; ``position``: only when it is the token's own
            position, stricter where a sequence repeats a token (demo 03: MiniLM, 300
            shipped sentences, naive cosine, layer 6: 0.933 by id, 0.862 by position).
            Brunner et al. do not say which they counted. A vision model's patches have no
            ids: ``position`` only (its default; the result's `token_ids` then hold each
            position's index).
        progress: show a progress bar over the corpus.
        stack: on an encoder–decoder, ``"encoder"`` (the corpus's tokens in the encoder's
            states) or ``"decoder"`` (implied by `decoder_input`: the decoder text's tokens
            in the decoder's states, the corpus feeding the encoder); layers count within
            the stack.
        decoder_input: one decoder text per corpus text (split with it).

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("bert", dtype=torch.float64)
        >>> corpus = ["the cat sat on the mat .", "a dog ran", "the big dog is on a mat",
        ...           "a cat and a dog sat", "the mat is big ."]
        >>> res = token_identifiability(model, corpus, mapping="naive", progress=False)
        >>> res.layers, res.rate(0)
        ((0, 1, 2, 3), 1.0)
    """
    stack = "decoder" if stack is None and decoder_input is not None else stack
    decoder = None
    texts = cast("Sequence[str]", corpus)  # checked as texts below, unless images
    if stack is not None:  # an encoder–decoder's stack: its own texts, checked
        spec, texts, decoder = check_stack(model, stack, texts, decoder_input, batch_size, lookup)
    else:
        spec = adapters.model_spec(model)
    image = adapters.image_input(model) if stack is None else None
    match = match if match is not None else ("position" if image is not None else "token")
    options: dict[str, tuple[str, tuple[str, ...]]] = {
        "mapping": (mapping, ("naive", "linear", "mlp")),
        "distance": (distance, ("cosine", "l2")),
        "lookup": (lookup, ("sequence", "vocab")),
        "match": (match, ("token", "position")),
    }
    layers = _check(spec, corpus, layers, options, test_fraction)
    loss = check_loss(mapping, distance, loss)
    images = None if image is None else _check_images(image, corpus, lookup, match, batch_size)
    if match == "position" and lookup == "vocab":
        raise ValueError("match='position' needs lookup='sequence' (vocabulary items have none)")
    if stack is None and image is None:
        texts = adapters.check_corpus(model, spec, texts, batch_size, "corpus")
    data: Sequence[str] | Tensor = texts if images is None else images
    checks.integer(seed, "seed")
    checks.integer(max_mlp_tokens, "max_mlp_tokens", least=1)
    trained = mapping == "mlp" or loss == "cosine"  # every 10th training sequence validates
    train, test = split_corpus(data, test_fraction, seed, "mlp" if trained else mapping)
    vocab = Vocab.for_model(model, spec) if lookup == "vocab" else None
    total = len(test) + (len(train) if mapping != "naive" else 0)
    bar_on = progress and distributed.is_main()
    with tqdm(total=total, disable=not bar_on, desc="sequences") as bar:
        gather = functools.partial(
            gather_states,
            model,
            spec,
            data,
            layers=layers,
            batch_size=batch_size,
            vocab=vocab is not None,
            bar=bar,
        )
        if stack is not None:
            gather = functools.partial(
                gather_stack_states, model, spec, texts, decoder,
                layers=layers, batch_size=batch_size, bar=bar,
            )  # fmt: skip
        result = identifiability_from_states(
            gather(train) if mapping != "naive" else iter(()),
            gather(test),
            layers,
            mapping=mapping,
            distance=distance,
            loss=loss,
            vocab=vocab,
            cross_layer=cross_layer,
            seed=seed,
            max_mlp_tokens=max_mlp_tokens,
            match=match,
        )
    return replace(result, train=tuple(train), test=tuple(test))


def states_names_filter(model: Any, layers: Sequence[Layer] | None = None) -> Any:
    """The ``names_filter`` caching the hidden states `states_from_cache` reads."""
    spec = adapters.model_spec(model)
    layers = convention.resolve_many(spec, layers, default=range(spec.n_layers + 1))
    return frozenset([spec.layer0, *(convention.site(spec, L) for L in layers)]).__contains__


def states_from_cache(
    cache: Any,
    tokens: Int[Tensor, "batch pos"],
    layers: Sequence[Layer] | None = None,
    *,
    attention_mask: Tensor | None = None,
    model: Any = None,
) -> StateBatch:
    """A `StateBatch` of your own run, for `identifiability_from_states`: the hidden states at
    `layers` (default 0..n_layers) of the tokens the cache was run on.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("gpt2", dtype=torch.float64)
        >>> tokens = torch.tensor([[1, 5, 6, 7]])
        >>> _, cache = model.run_with_cache(tokens, names_filter=states_names_filter(model))
        >>> batch = states_from_cache(cache, tokens, layers=[0, -1])
        >>> last = cache["blocks.2.hook_out"]  # layer 3 = -1: block 2's output
        >>> tuple(batch.states.shape), bool(torch.equal(batch.states[1], last))
        ((2, 1, 4, 32), True)
    """
    model = adapters.cache_model(cache) or model
    if model is None:
        raise ValueError("this cache does not record the model it came from: pass model=")
    spec = adapters.model_spec(model)
    layers = convention.resolve_many(spec, layers, default=range(spec.n_layers + 1))
    tokens = checks.token_ids(tokens, "tokens")
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    mask = checks.mask(mask, tokens.shape)
    sites = [spec.layer0, *(convention.site(spec, L) for L in layers)]
    if missing := sorted(set(sites) - set(cache.keys())):
        raise ValueError(
            f"the cache lacks {missing}: run it with names_filter=states_names_filter(model)"
        )
    states = torch.stack([cache[convention.site(spec, L)] for L in layers])
    adapters.check_finite({s: cache[s] for s in sites}, mask.to(states.device))
    return StateBatch(tokens.to(states.device), mask.to(states.device), cache[spec.layer0], states)


__all__ = [
    "IdentifiabilityResult",
    "StateBatch",
    "Vocab",
    "identifiability_from_states",
    "states_from_cache",
    "states_names_filter",
    "token_identifiability",
]
