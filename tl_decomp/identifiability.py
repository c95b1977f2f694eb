"""Token identifiability (Brunner et al., ICLR 2020, section 4; docs/method.md §7).

Can the input token at position ``t`` be recovered from its hidden vector ``e_t^l``? A map
``g: e^l -> e^0`` is fitted on a training split of sequences, and a test token counts as
identified when the nearest neighbour of ``g(e_t^l)`` among the candidates holds its token id.
Candidates are the layer-0 vectors of the same sequence (``lookup="sequence"``, the paper's
default) or of every vocabulary item at that token's position (``lookup="vocab"``).

Memory does not grow with the corpus: hidden states are gathered a batch at a time, the
linear map is fitted from streamed normal equations (float64), and the test split is scored
as it streams past. The MLP map trains on at most `max_mlp_tokens` stored training vectors.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm import tqdm

from tl_decomp import _adapters, _checks, _distributed, _layers, _running
from tl_decomp._adapters import ModelSpec
from tl_decomp._layers import Layer
from tl_decomp._maps import Distance, Mapping, fit_maps
from tl_decomp._repr import Tabular, short_repr

Lookup = Literal["sequence", "vocab"]
Match = Literal["token", "position"]


class StateBatch(NamedTuple):
    """Hidden states of a batch of sequences, as `identifiability_from_states` reads them.

    `states[k]` is layer ``layers[k]``; `offsets` (vocab lookup only) is each token's
    pre-norm layer-0 input minus its own token embedding: positions, token types.
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]
    e0: Float[Tensor, "batch pos d_model"]
    states: Float[Tensor, "layer batch pos d_model"]
    offsets: Float[Tensor, "batch pos d_model"] | None = None
    sequences: Int[Tensor, " batch"] | None = None


@dataclass(frozen=True)
class Vocab:
    """Candidates for ``lookup="vocab"``: ``c_v = norm(W_E[v] + offset)`` at each token's slot.

    `norm` is ``"LN"`` (``g * (z - mean z) / sigma + b``), ``"RMS"`` or ``"none"``. Scores
    come from inner products with ``W_E``, never materialising ``d_vocab`` vectors per token.
    """

    W_E: Float[Tensor, "d_vocab d_model"]
    norm: Literal["LN", "RMS", "none"] = "none"
    w: Float[Tensor, " d_model"] | None = None
    b: Float[Tensor, " d_model"] | None = None
    eps: float = 0.0

    @classmethod
    def for_model(cls, model: Any, spec: ModelSpec) -> Vocab:
        ln = spec.embed_ln
        norm = "none" if ln is None else ("RMS" if ln.rms else "LN")
        return cls(
            _running.embedding_matrix(model),
            norm,
            ln and ln.w,
            ln and ln.b,
            _running.norm_eps(model),
        )

    def scores(
        self, q: Float[Tensor, "n d_model"], offsets: Float[Tensor, "n d_model"], distance: Distance
    ) -> Float[Tensor, "n d_vocab"]:
        """Higher is nearer: ``cos(q, c_v)``, or ``-||q - c_v||^2 + ||q||^2``."""
        dt = q.dtype
        W, r = self.W_E.to(dt), offsets.to(dt)
        if self.norm == "LN":
            W, r = W - W.mean(-1, keepdim=True), r - r.mean(-1, keepdim=True)
        g = torch.ones_like(r[0]) if self.w is None else self.w.to(dt)
        b = torch.zeros_like(r[0]) if self.b is None else self.b.to(dt)
        zz = (W * W).sum(-1) + 2 * r @ W.T + (r * r).sum(-1, keepdim=True)  # ||W_v + r||^2
        sigma = (zz / W.shape[1] + self.eps).sqrt() if self.norm != "none" else torch.ones_like(zz)
        qc = ((q * g) @ W.T + ((q * g) * r).sum(-1, keepdim=True)) / sigma + (q * b).sum(-1, True)
        gz2 = ((g * W) ** 2).sum(-1) + 2 * (g * g * r) @ W.T + ((g * r) ** 2).sum(-1, True)
        gzb = (g * b) @ W.T + ((g * b) * r).sum(-1, keepdim=True)
        cc = gz2 / sigma**2 + 2 * gzb / sigma + (b * b).sum()
        return qc / cc.clamp_min(1e-30).sqrt() if distance == "cosine" else 2 * qc - cc


@dataclass(frozen=True)
class IdentifiabilityResult(Tabular):
    """Identifiability rates per layer, from a map fitted on `train` and scored on `test`.

    Attributes:
        rates: fraction of test tokens identified at each layer of `layers`
            (default layers ``0..n_layers``, so ``rates[l]`` is layer ``l``).
        layers: 0 is the layer-0 input itself, ``l >= 1`` the output of block ``l - 1``.
        correct: per test token and layer, whether it was identified.
        token_ids, positions, sequences: each test token's id, position, and corpus index.
        maps: the fitted ``g_l: e^l -> e^0``, one module per layer (identity for naive).
        cross: ``cross[a, b]``: rate of the map fitted on ``layers[a]`` applied to
            ``layers[b]`` (computed with ``cross_layer=True``).
        train, test: corpus indices of the two splits.
    """

    __repr__ = short_repr

    rates: Float[Tensor, " layer"]
    layers: tuple[Layer, ...]
    correct: Bool[Tensor, "layer token"]
    token_ids: Int[Tensor, " token"]
    positions: Int[Tensor, " token"]
    sequences: Int[Tensor, " token"]
    maps: tuple[nn.Module, ...]
    mapping: str
    distance: str
    lookup: str
    cross: Float[Tensor, "layer layer"] | None = None
    match: str = "token"
    train: tuple[int, ...] = ()
    test: tuple[int, ...] = ()

    def rows(self) -> list[dict[str, Any]]:
        """One record per layer: ``layer``, ``identified`` (the rate)."""
        return [
            {"layer": _layers.name(L), "identified": r}
            for L, r in zip(self.layers, self.rates.tolist(), strict=True)
        ]

    def rate(self, layer: Layer) -> float:
        """The identifiability rate at `layer` (a layer number, not an index into `rates`)."""
        return float(self.rates[self.layers.index(layer)])

    def cross_layer(self) -> Float[Tensor, "layer layer"]:
        """Rates of the map fitted on layer ``layers[a]`` tested on ``layers[b]`` [B Fig. 2b]."""
        if self.cross is None:
            raise ValueError("cross-layer rates were not computed: pass cross_layer=True")
        return self.cross


def _nearest_in_sequence(
    pred: Float[Tensor, "batch pos d_model"],
    e0: Float[Tensor, "batch pos d_model"],
    mask: Tensor,
    distance: Distance,
) -> Int[Tensor, "batch pos"]:
    """Position of the nearest layer-0 vector of the same sequence (real keys only)."""
    if distance == "cosine":
        unit = functools.partial(nn.functional.normalize, dim=-1)
        score = unit(pred) @ unit(e0).transpose(1, 2)
    else:
        score = -torch.cdist(pred, e0)
    return score.masked_fill(~mask.bool()[:, None, :], -torch.inf).argmax(-1)


def _score(
    maps: Sequence[nn.Module],
    x: Tensor,
    batch: StateBatch,
    distance: Distance,
    vocab: Vocab | None,
    match: Match = "token",
) -> Tensor:
    """Whether each real token of `batch` is identified from `x` through each map: [map n].

    ``match="token"``: the nearest layer-0 vector holds the same token id (a repeated token
    counts either occurrence); ``"position"``: it is the token's own position."""
    m = batch.mask.bool()
    out = []
    for g in maps:
        with torch.no_grad():
            pred = g(x)
        if vocab is None:
            idx = _nearest_in_sequence(pred, batch.e0, batch.mask, distance)
            if match == "position":
                hit = idx == torch.arange(idx.shape[1], device=idx.device)
            else:
                hit = batch.tokens.gather(1, idx) == batch.tokens
            out.append(hit[m])
        else:
            assert batch.offsets is not None
            q, r, ids = pred[m], batch.offsets[m], batch.tokens[m]
            hits = [
                vocab.scores(qc, rc, distance).argmax(-1) == ic
                for qc, rc, ic in zip(q.split(256), r.split(256), ids.split(256), strict=True)
            ]
            out.append(torch.cat(hits))
    return torch.stack(out)


def _at_least_float32(batches: Iterable[StateBatch]) -> Iterator[StateBatch]:
    """Half-precision states are fitted and scored in float32 (a bf16 least-squares fit is
    meaningless), with one warning."""
    warned = False
    for batch in batches:
        if batch.states.dtype in (torch.float16, torch.bfloat16):
            if not warned:
                warnings.warn(
                    f"hidden states are {batch.states.dtype}; tl_decomp fits and scores "
                    "identifiability in float32",
                    stacklevel=4,
                )
                warned = True
            up = {"e0": batch.e0.float(), "states": batch.states.float()}
            if batch.offsets is not None:
                up["offsets"] = batch.offsets.float()
            batch = batch._replace(**up)
        yield batch


def identifiability_from_states(
    train: Iterable[StateBatch],
    test: Iterable[StateBatch],
    layers: Sequence[Layer],
    *,
    mapping: Mapping = "linear",
    distance: Distance = "cosine",
    vocab: Vocab | None = None,
    cross_layer: bool = False,
    seed: int = 0,
    max_mlp_tokens: int = 20_000,
    match: Match = "token",
) -> IdentifiabilityResult:
    """Fit ``g_l: e^l -> e^0`` on the `train` batches, score the `test` batches.

    For hidden states gathered elsewhere; `token_identifiability` gathers them from a model.
    Each iterable is read once. `vocab` switches to the vocabulary lookup. Under
    `torch.distributed`, each rank passes its `_distributed.deal` share of the batches: the
    linear map's normal equations are summed over ranks and the scored tokens gathered back
    in batch order, so every rank returns the one-process result (the linear map to
    rounding; ``mapping="mlp"`` is refused).
    """
    if match == "position" and vocab is not None:
        raise ValueError("match='position' needs lookup='sequence' (vocabulary items have none)")
    train, test = _at_least_float32(train), _at_least_float32(test)
    maps = fit_maps(train, len(layers), mapping, distance, seed, max_mlp_tokens)
    with _distributed.guard():
        scored = _score_split(test, maps, layers, distance, vocab, cross_layer, match)
    per_batch = scored[0]
    if _distributed.active():  # every rank's batches, back in the batches' order
        per_batch = _distributed.undeal([tuple(t.cpu() for t in b) for b in per_batch])
    cross = None
    if cross_layer:  # a rank without test batches still joins the sum
        zero = torch.zeros(len(layers), len(layers), dtype=torch.long)
        cross = _distributed.all_sum(zero if scored[1] is None else scored[1])
    if not per_batch:
        raise ValueError("the test split holds no tokens")
    hit, ids, pos, seqs = (torch.cat(parts, -1) for parts in zip(*per_batch, strict=True))
    n = hit.shape[1]
    return IdentifiabilityResult(
        rates=hit.double().mean(1),
        layers=tuple(layers),
        correct=hit,
        token_ids=ids,
        positions=pos,
        sequences=seqs,
        maps=maps,
        mapping=mapping,
        distance=distance,
        lookup="sequence" if vocab is None else "vocab",
        cross=None if cross is None else cross.double() / n,
        match=match,
    )


def _score_split(
    test: Iterable[StateBatch],
    maps: Sequence[nn.Module],
    layers: Sequence[Layer],
    distance: Distance,
    vocab: Vocab | None,
    cross_layer: bool,
    match: Match,
) -> tuple[list[tuple[Tensor, Tensor, Tensor, Tensor]], Tensor | None]:
    """Per test batch: (correct [layer n], token ids, positions, sequences); cross hits."""
    per_batch, cross = [], None
    for batch in test:
        if vocab is not None and batch.offsets is None:
            raise ValueError("lookup='vocab' needs StateBatch.offsets")
        m = batch.mask.bool()
        correct = torch.cat(
            [
                _score(maps[k : k + 1], batch.states[k], batch, distance, vocab, match)
                for k in range(len(layers))
            ]
        )
        if cross_layer:
            hits = torch.stack(
                [_score(maps, x, batch, distance, vocab, match).sum(-1) for x in batch.states],
                1,
            )
            cross = hits if cross is None else cross + hits
        pos = torch.arange(m.shape[1], device=m.device).expand_as(m)[m]
        s = batch.sequences if batch.sequences is not None else torch.arange(m.shape[0])
        per_batch.append((correct, batch.tokens[m], pos, s.to(m.device)[:, None].expand_as(m)[m]))
    return per_batch, cross


def _capture(store: dict[str, Tensor], site: str, tensor: Tensor, *, hook: Any) -> None:
    store[site] = tensor


def _gather(
    model: Any,
    spec: ModelSpec,
    corpus: Sequence[str],
    order: Sequence[int],
    layers: Sequence[Layer],
    batch_size: int,
    vocab: bool,
    bar: Any,
) -> Iterator[StateBatch]:
    """Hidden states of `corpus[order]`, a batch at a time; the run stops at the deepest layer."""
    deepest = max(layers, key=lambda L: _layers.depth(spec, L))
    sites = [spec.layer0] + [_layers.site(spec, L) for L in layers if L != 0]
    sites.append(_layers.site(spec, deepest))  # the run stops after the last site
    embeds = [h for _, h in spec.embeds] if vocab else []
    W_E = _running.embedding_matrix(model) if vocab else None
    device = _running.model_device(model)
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    for _, idx in _distributed.deal(batches):  # under torch.distributed: this rank's share
        tokens, mask = _running.tokenize(model, [corpus[i] for i in idx], encoder=not spec.causal)
        if tokens.shape[1] > spec.n_ctx:
            raise ValueError(
                f"a sequence has {tokens.shape[1]} tokens; the context is {spec.n_ctx}"
            )
        tokens, mask = tokens.to(device), mask.to(device)
        got: dict[str, Tensor] = {}
        hooks = [(s, functools.partial(_capture, got, s)) for s in dict.fromkeys(sites + embeds)]
        with torch.no_grad():
            _running.run_with_hooks(model, tokens, mask, hooks, stop_after=sites[-1])
        _running.check_finite({s: got[s] for s in dict.fromkeys(sites)}, mask)
        e0 = got[spec.layer0]
        states = torch.stack([got[_layers.site(spec, L)] for L in layers])
        offsets = None if W_E is None else sum(got[h] for h in embeds) - W_E[tokens]
        yield StateBatch(tokens, mask, e0, states, offsets, torch.tensor(idx, device=device))
        bar.update(len(idx))


def _check(
    spec: ModelSpec,
    corpus: Sequence[str],
    layers: Sequence[Layer] | None,
    options: dict[str, tuple[str, tuple[str, ...]]],
    test_fraction: float,
) -> tuple[Layer, ...]:
    for name, (value, allowed) in options.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
    layers = _layers.resolve_many(spec, layers, default=range(spec.n_layers + 1))
    _checks.number(test_fraction, "test_fraction", low=0.0, high=1.0)
    return layers


def _split(
    corpus: Sequence[str], test_fraction: float, seed: int, mapping: str
) -> tuple[list[int], list[int]]:
    """Random split by sequence; each side sorted by length, which keeps padding low."""
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
    corpus: Sequence[str],
    *,
    mapping: Mapping = "linear",
    distance: Distance = "cosine",
    lookup: Lookup = "sequence",
    layers: Sequence[Layer] | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    batch_size: int = 32,
    cross_layer: bool = False,
    max_mlp_tokens: int = 20_000,
    match: Match = "token",
    progress: bool = True,
) -> IdentifiabilityResult:
    """How often each layer's hidden vector still identifies its input token.

    A map ``g_l: e^l -> e^0`` is fitted on a random ``1 - test_fraction`` of the sequences;
    a test token is identified when the nearest candidate to ``g_l(e_t^l)`` has its token id.

    Args:
        model: a TransformerBridge, HookedTransformer or HookedEncoder.
        corpus: texts, one sequence each (the split is by sequence).
        mapping: ``naive`` (identity), ``linear`` (least squares with bias, closed form) or
            ``mlp`` (one hidden layer; Adam; early stopping on every 10th training sequence;
            trained with the loss of `distance`).
        distance: ``cosine`` or ``l2`` for the nearest-neighbour lookup.
        lookup: among the layer-0 vectors of the token's own sequence (``sequence``) or of
            every vocabulary item at the token's position (``vocab``; costs ``d_vocab`` dot
            products per token and layer).
        layers: residual-stream indices, 0 (the layer-0 input) to ``n_layers`` (negatives
            from the end; ``"final"``: a decoder's final-norm output); default 0..n_layers.
        seed: seeds the split and the MLP.
        test_fraction: share of sequences held out for scoring.
        batch_size: sequences per forward pass (memory is per batch, not per corpus).
        cross_layer: also score every map on every layer (`IdentifiabilityResult.cross_layer`).
        max_mlp_tokens: training tokens the MLP map keeps in memory (a uniform sample of
            the training split's tokens).
        match: ``token`` (default): identified when the nearest layer-0 vector holds the
            same token id; ``position``: only when it is the token's own position, stricter
            where a sequence repeats a token (MiniLM, 500 shipped sentences, naive cosine, last
            layer: 0.925 by id, 0.857 by position). Brunner et al. do not say which they
            counted.
        progress: show a progress bar over the corpus.

    Example:
        >>> from tl_decomp.models import tiny_model
        >>> model = tiny_model("bert", dtype=torch.float64)
        >>> corpus = ["the cat sat on the mat .", "a dog ran", "the big dog is on a mat",
        ...           "a cat and a dog sat", "the mat is big ."]
        >>> res = token_identifiability(model, corpus, mapping="naive", progress=False)
        >>> res.layers, res.rate(0)
        ((0, 1, 2, 3), 1.0)
    """
    spec = _adapters.model_spec(model)
    layers = _check(
        spec,
        corpus,
        layers,
        {
            "mapping": (mapping, ("naive", "linear", "mlp")),
            "distance": (distance, ("cosine", "l2")),
            "lookup": (lookup, ("sequence", "vocab")),
            "match": (match, ("token", "position")),
        },
        test_fraction,
    )
    if match == "position" and lookup == "vocab":
        raise ValueError("match='position' needs lookup='sequence' (vocabulary items have none)")
    corpus = _running.check_corpus(model, spec, corpus, batch_size, "corpus")
    _checks.integer(seed, "seed")
    _checks.integer(max_mlp_tokens, "max_mlp_tokens", least=1)
    train, test = _split(corpus, test_fraction, seed, mapping)
    vocab = Vocab.for_model(model, spec) if lookup == "vocab" else None
    total = len(test) + (len(train) if mapping != "naive" else 0)
    bar_on = progress and _distributed.is_main()
    with tqdm(total=total, disable=not bar_on, desc="sequences") as bar:
        gather = functools.partial(
            _gather,
            model,
            spec,
            corpus,
            layers=layers,
            batch_size=batch_size,
            vocab=vocab is not None,
            bar=bar,
        )
        result = identifiability_from_states(
            gather(train) if mapping != "naive" else iter(()),
            gather(test),
            layers,
            mapping=mapping,
            distance=distance,
            vocab=vocab,
            cross_layer=cross_layer,
            seed=seed,
            max_mlp_tokens=max_mlp_tokens,
            match=match,
        )
    return replace(result, train=tuple(train), test=tuple(test))


def states_names_filter(model: Any, layers: Sequence[Layer] | None = None) -> Any:
    """The ``names_filter`` caching the hidden states `states_from_cache` reads."""
    spec = _adapters.model_spec(model)
    layers = _layers.resolve_many(spec, layers, default=range(spec.n_layers + 1))
    return frozenset([spec.layer0, *(_layers.site(spec, L) for L in layers)]).__contains__


def states_from_cache(
    cache: Any,
    tokens: Int[Tensor, "batch pos"],
    layers: Sequence[Layer] | None = None,
    *,
    attention_mask: Tensor | None = None,
    model: Any = None,
) -> StateBatch:
    """A `StateBatch` of your own run, for `identifiability_from_states`: the hidden states at
    `layers` (default 0..n_layers) of the tokens the cache was run on."""
    model = _running.cache_model(cache) or model
    if model is None:
        raise ValueError("this cache does not record the model it came from: pass model=")
    spec = _adapters.model_spec(model)
    layers = _layers.resolve_many(spec, layers, default=range(spec.n_layers + 1))
    tokens = _checks.token_ids(tokens, "tokens")
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    mask = _checks.mask(mask, tokens.shape)
    sites = [spec.layer0, *(_layers.site(spec, L) for L in layers)]
    if missing := sorted(set(sites) - set(cache.keys())):
        raise ValueError(
            f"the cache lacks {missing}: run it with names_filter=states_names_filter(model)"
        )
    states = torch.stack([cache[_layers.site(spec, L)] for L in layers])
    _running.check_finite({s: cache[s] for s in sites}, mask.to(states.device))
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
