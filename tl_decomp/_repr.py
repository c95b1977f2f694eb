"""Short reprs for result dataclasses: shapes, labels and scalars, never a tensor's values.

A notebook's repr of a result should fit on a few lines (tuned-lens and SAELens do the
same); the numbers live in the tensors, the tables in ``str`` / ``to_pandas``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

_MAX_ITEMS = 6


def brief(value: Any, nested: bool = False) -> str:
    """One field, briefly: a tensor as ``[2x6x32] float64``, long sequences cut, sequences
    inside sequences as their length."""
    if isinstance(value, torch.Tensor):
        dims = "x".join(map(str, value.shape)) or "scalar"
        return f"[{dims}] {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (tuple, list)) and nested:
        return f"<{len(value)} items>"
    if isinstance(value, (tuple, list)) and len(value) > _MAX_ITEMS:
        head = ", ".join(brief(v, True) for v in value[:_MAX_ITEMS])
        return f"({head}, ... {len(value)} in all)"
    if isinstance(value, (tuple, list)):
        items = [brief(v, True) for v in value]
        return "(" + ", ".join(items) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return f"{{{len(value)} entries}}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__name__
    return repr(value)


def short_repr(self: Any) -> str:
    """``Name(field=brief, ...)`` over the fields a dataclass shows in its repr."""
    shown = [f for f in dataclasses.fields(self) if f.repr]
    body = ", ".join(f"{f.name}={brief(getattr(self, f.name))}" for f in shown)
    return f"{type(self).__name__}({body})"


class Tabular:
    """A result that is a table: `rows` gives records (one dict per row); `to_pandas` the
    `pandas.DataFrame` of them (pandas comes with TransformerLens), and `str` prints it."""

    def rows(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows())

    def __str__(self) -> str:
        return self.to_pandas().to_string(index=False, float_format=lambda v: f"{v:.4g}")
