"""Type aliases shared by every signature (as ``inseq/utils/typing.py`` does).

TransformerLens's classes differ by line (4.x has only `TransformerBridge`; 3.9 also
`HookedTransformer` / `HookedEncoder`), and the adapters are the only code that asks which it
got, so the math names them by role.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeAlias, runtime_checkable

from torch import Tensor

Model: TypeAlias = Any
"""A TransformerLens model: `TransformerBridge`, `HookedTransformer` or `HookedEncoder`."""


@runtime_checkable
class Cache(Protocol):
    """An `ActivationCache` of one run, or any mapping from hook names to activations."""

    def __getitem__(self, name: str, /) -> Tensor: ...
    def keys(self) -> Iterable[str]: ...


TextInput: TypeAlias = "str | Sequence[str] | Tensor"
"""What a function runs the model on: a text, a list of texts, or token ids ``[batch, pos]``."""

__all__ = ["Cache", "Model", "TextInput"]
