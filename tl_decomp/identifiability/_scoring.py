"""Token identifiability scored on hidden states already gathered (docs/method.md §7).

The states arrive as `StateBatch` es; a map ``g_l: e^l -> e^0`` is fitted on the training
batches (`_maps`) and each test token is looked up among its candidates by nearest neighbour:
the layer-0 vectors of its own sequence, or every vocabulary item at its position (`Vocab`).
`_states` gathers the states from a model.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tl_decomp import adapters
from tl_decomp._core import convention, distributed
from tl_decomp._core.convention import Layer
from tl_decomp._core.results import Result, text_table
from tl_decomp._core.spec import ModelSpec
from tl_decomp.identifiability._maps import (
    MIN_TOKENS_PER_PARAMETER,
    Distance,
    Loss,
    Mapping,
    default_loss,
    fit_maps,
    parameters,
    small_sample,
)

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


@dataclass(frozen=True, repr=False)
class Vocab(Result):
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
            adapters.embedding_matrix(model),
            norm,
            ln and ln.w,
            ln and ln.b,
            adapters.norm_eps(model),
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


@dataclass(frozen=True, repr=False)
class IdentifiabilityResult(Result):
    """Identifiability rates per layer, from a map fitted on `train` and scored on `test`.

    Attributes:
        rates: fraction of test tokens identified at each layer of `layers`
            (default layers ``0..n_layers``, so ``rates[l]`` is layer ``l``).
        layers: 0 is the layer-0 input itself, ``l >= 1`` the output of block ``l - 1``.
        correct: per test token and layer, whether it was identified.
        token_ids, positions, sequences: each test token's id, position, and corpus index.
        maps: the fitted ``g_l: e^l -> e^0``, one module per layer (identity for naive).
        mapping, distance, lookup, match: the protocol (`token_identifiability`).
        loss: what the maps were trained to minimise: ``mse`` (for ``linear``: least squares,
            closed form), ``cosine`` (mean ``1 - cos``), or None for ``naive``.
        cross: ``cross[a, b]``: rate of the map fitted on ``layers[a]`` applied to
            ``layers[b]`` (computed with ``cross_layer=True``).
        train, test: corpus indices of the two splits.
        train_tokens: tokens each map was fitted on (0 for naive; a trained map's stored
            sample, at most ``max_mlp_tokens``).
        parameters: trainable parameters of each map.
        small_sample: the maps had fewer training values (``train_tokens * d_model``) than
            `MIN_TOKENS_PER_PARAMETER` times their parameters: they may overfit (a warning
            was raised; the table says so).
    """

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
    loss: str | None = None
    train_tokens: int = 0
    parameters: int = 0
    small_sample: bool = False

    def rows(self) -> list[dict[str, Any]]:
        """One record per layer: ``layer``, ``identified`` (the rate), and the ``map``:
        mapping and training loss (``linear/mse``, ``linear/cosine``, ``mlp/cosine``…)."""
        how = self.mapping if self.loss is None else f"{self.mapping}/{self.loss}"
        return [
            {"layer": convention.name(L), "identified": r, "map": how}
            for L, r in zip(self.layers, self.rates.tolist(), strict=True)
        ]

    def __str__(self) -> str:
        head = f"{self.distance} lookup over the {self.lookup}, match by {self.match}"
        if self.mapping != "naive":
            head += f"; {self.train_tokens:,} training tokens, {self.parameters:,} parameters"
        if self.small_sample:
            head += (
                f"\nsmall sample: fewer than {MIN_TOKENS_PER_PARAMETER}x the map's "
                "parameters in training values (tokens x d_model); it may overfit"
            )
        return head + "\n" + text_table(self.rows())

    def rate(self, layer: Layer) -> float:
        """The identifiability rate at `layer`, one of `layers` as scored (a residual-stream
        index or ``"final"``, not a position in `rates`)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} was not scored; the scored layers are {self.layers}")
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
    loss: Loss | None = None,
    vocab: Vocab | None = None,
    cross_layer: bool = False,
    seed: int = 0,
    max_mlp_tokens: int = 20_000,
    match: Match = "token",
) -> IdentifiabilityResult:
    """Fit ``g_l: e^l -> e^0`` on the `train` batches, score the `test` batches.

    For hidden states gathered elsewhere; `token_identifiability` gathers them from a model
    (and documents `loss`). Each iterable is read once. `vocab` switches to the vocabulary
    lookup. Under
    `torch.distributed`, each rank passes its `distributed.deal` share of the batches: the
    linear map's normal equations are summed over ranks and the scored tokens gathered back
    in batch order, so every rank returns the one-process result (the linear map to
    rounding; a trained map, ``mlp`` or ``loss="cosine"`` linear, is refused).
    """
    if match == "position" and vocab is not None:
        raise ValueError("match='position' needs lookup='sequence' (vocabulary items have none)")
    loss = check_loss(mapping, distance, loss)
    train, test = _at_least_float32(train), _at_least_float32(test)
    maps, n_train = fit_maps(train, len(layers), mapping, loss, seed, max_mlp_tokens)
    with distributed.guard():
        scored = _score_split(test, maps, layers, distance, vocab, cross_layer, match)
    per_batch = scored[0]
    if distributed.active():  # every rank's batches, back in the batches' order
        per_batch = distributed.undeal([tuple(t.cpu() for t in b) for b in per_batch])
    cross = None
    if cross_layer:  # a rank without test batches still joins the sum
        zero = torch.zeros(len(layers), len(layers), dtype=torch.long)
        cross = distributed.all_sum(zero if scored[1] is None else scored[1])
    if not per_batch:
        raise ValueError("the test split holds no tokens")
    hit, ids, pos, seqs = (torch.cat(parts, -1) for parts in zip(*per_batch, strict=True))
    n, d = hit.shape[1], _d_model(maps)
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
        loss=loss,
        train_tokens=n_train,
        parameters=parameters(mapping, d),
        small_sample=small_sample(mapping, d, n_train),
    )


def _d_model(maps: Sequence[nn.Module]) -> int:
    """The maps' input width (0 for the parameter-free naive map)."""
    weights = list(maps[0].parameters()) if maps else []
    return weights[0].shape[1] if weights else 0


def check_loss(mapping: Mapping, distance: Distance, loss: Loss | None) -> Loss | None:
    """`loss` checked against `mapping`, or the mapping's default (`default_loss`)."""
    if loss is None:
        return default_loss(mapping, distance)
    if loss not in get_args(Loss):
        raise ValueError(f"loss must be one of {get_args(Loss)} or None, not {loss!r}")
    if mapping == "naive":
        raise ValueError("mapping='naive' fits nothing: loss does not apply (leave it None)")
    return loss


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


__all__ = [
    "IdentifiabilityResult",
    "StateBatch",
    "Vocab",
    "identifiability_from_states",
]
