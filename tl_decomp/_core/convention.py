"""One layer convention, TransformerLens's: ``layer`` is a residual-stream index.

As in ``ActivationCache.decompose_resid`` / ``accumulated_resid``: layer 0 is the layer-0
input (what block 0 reads), layer ``l`` the output of block ``l - 1``, layer ``n_layers`` the
last block's output; ``"final"`` is the final embedding the unembedding reads (a decoder's
``ln_final`` output; on encoders, whose final embedding is the last block's output, it is
layer ``n_layers``). Negative indices count from the end as in Python: ``-1`` is
``n_layers``. A ``block`` is a block's own index, ``0 .. n_layers - 1`` (``L3H7`` is head 7
of block 3), for what is about one block's attention.

Every public function normalises its ``layer``/``layers``/``block``/``blocks`` here, before
any work.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal, Union

from tl_decomp._core.spec import ModelSpec

Layer = Union[int, Literal["final"]]  # noqa: UP007  # a runtime alias jaxtyping/beartype read


def _index(value: Any, arg: str, n: int, what: str) -> int:
    """`value` as an int in ``0 .. n - 1``; negatives count from the end."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int ({what}), not {type(value).__name__} {value!r}")
    v = int(value)
    if not -n <= v < n:
        raise ValueError(f"{arg}={v} is out of range: {what} runs 0..{n - 1} (or -{n}..-1)")
    return v % n


def resolve(spec: ModelSpec, layer: Any, arg: str = "layer") -> Layer:
    """A residual-stream index in ``0 .. n_layers``, or ``"final"`` where the final embedding
    is a separate site (a decoder's final norm)."""
    if layer is None:  # the old API's "final embedding": a script of that era must not run on
        raise TypeError(
            f"{arg}=None: ask for the final embedding by name, {arg}='final' (layers are "
            "residual-stream indices: 0 is the layer-0 input, l the output of block l-1)"
        )
    if isinstance(layer, str):
        if layer != "final":
            raise ValueError(f"{arg} must be an int or 'final', not {layer!r}")
        return "final" if has_final(spec) else spec.n_layers
    return _index(layer, arg, spec.n_layers + 1, "the residual-stream index")


def resolve_many(
    spec: ModelSpec, layers: Any, arg: str = "layers", default: Sequence[Layer] | None = None
) -> tuple[Layer, ...]:
    """Each layer of `layers` resolved, in the order given, without duplicates; None gives
    `default` (every layer, and ``"final"`` where it is a separate site)."""
    if layers is None:
        layers = every(spec) if default is None else default
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"{arg} must be a sequence of layers, not {layers!r}")
    got: list[Layer] = []
    for x in layers:
        if (r := resolve(spec, x, arg)) not in got:
            got.append(r)
    if not got:
        raise ValueError(f"{arg} is empty")
    return tuple(got)


def every(spec: ModelSpec) -> tuple[Layer, ...]:
    """0 .. n_layers, then ``"final"`` where it is a separate site."""
    final: tuple[Layer, ...] = ("final",) if has_final(spec) else ()
    indices: tuple[Layer, ...] = tuple(range(spec.n_layers + 1))
    return indices + final


def block(spec: ModelSpec, value: Any, arg: str = "block") -> int:
    return _index(value, arg, spec.n_layers, "the block index")


def blocks(spec: ModelSpec, values: Any, arg: str = "blocks") -> tuple[int, ...]:
    """Indices of attention blocks, in order, without duplicates; None: every one. A block
    whose token mixer is not attention has no pattern: named, it is refused."""
    if values is None:
        got = tuple(L for L, b in enumerate(spec.blocks) if b.pattern)
        if not got:
            raise NotImplementedError(
                f"attention on {spec.architecture}, none of whose blocks is attention (each "
                "mixes tokens without a pattern), is not supported by tl_decomp"
            )
        return got
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{arg} must be a sequence of block indices, not {values!r}")
    got = tuple(dict.fromkeys(block(spec, v, arg) for v in values))
    if not got:
        raise ValueError(f"{arg} is empty")
    for L in got:
        spec.attention(L, "an attention pattern")
    return got


def has_final(spec: ModelSpec) -> bool:
    """Whether the final embedding is its own site (a final norm after the last block)."""
    return spec.final != spec.blocks[-1].out


def site(spec: ModelSpec, layer: Layer) -> str:
    """The hook holding the residual stream at `layer` (resolved)."""
    if layer == "final":
        return spec.final
    return spec.layer0 if layer == 0 else spec.blocks[int(layer) - 1].out


def depth(spec: ModelSpec, layer: Layer) -> int:
    """Blocks run before `layer` is reached, ``"final"`` after all of them: a sort key."""
    return spec.n_layers + 1 if layer == "final" else int(layer)


def name(layer: Layer, *, title: bool = False) -> str:
    """The one layer label: ``"3"`` in tables, ``"layer 3"`` as a `title`; ``"final"`` both."""
    return f"layer {layer}" if title and layer != "final" else str(layer)
