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


class Result:
    """The contract every result shares: a short ``repr`` (shapes, labels, the measured error),
    `rows()` as records (one dict per row), `to_pandas()` their `pandas.DataFrame` (pandas
    comes with TransformerLens), and ``str`` the same table as text.

    Subclasses are ``@dataclass(frozen=True, repr=False)`` so this ``repr`` is kept, and
    define `rows`.
    """

    __repr__ = short_repr

    def rows(self) -> list[dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} defines no rows")

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows())

    def __str__(self) -> str:
        return text_table(self.rows())


Tabular = Result  # the name results used before the contract had one base


def format_cell(v: Any, column: str = "") -> str:
    """One table cell: 4 significant digits, small magnitudes in scientific notation."""
    if v is None:
        return "–"
    if column in ("rank(T)", "null dim"):  # ints where every head agrees, else a mean
        return str(v) if isinstance(v, int) else f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4g}"
    return str(v)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key any row has, in first-seen order."""
    return list(dict.fromkeys(k for row in rows for k in row))


def text_table(rows: list[dict[str, Any]]) -> str:
    """The one text-table printer: right-aligned columns, two spaces apart."""
    if not rows:
        return "(no rows)"
    cols = columns(rows)
    cells = [[format_cell(r.get(c), c) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, width, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, width, strict=True)) for row in cells]
    return "\n".join(lines)
