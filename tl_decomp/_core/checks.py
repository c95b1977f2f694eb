"""Every check on what a caller passes, in one place, run before any model load or forward
pass: types, ranges, option strings. Each message names the argument and what was expected;
nothing is coerced silently (a mask value 0.9 is an error, not padding; ``True`` is not a
layer; a dict is not a list of texts).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def _what(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def is_cache(value: Any) -> bool:
    """An ``ActivationCache`` or a plain ``{hook name: tensor}`` mapping."""
    return isinstance(value, Mapping) or type(value).__name__ == "ActivationCache"


def texts(value: Any, arg: str = "input") -> list[str]:
    """A text or a sequence of texts, each non-blank valid Unicode."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        items = list(value)
    else:
        raise TypeError(f"{arg} must be a str or a list of str, not {_what(value)}")
    if not items:
        raise ValueError(f"{arg} is an empty list: pass at least one text")
    for k, t in enumerate(items):
        if not t.strip():
            raise ValueError(f"{arg}[{k}] is empty: every text needs a non-space character")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate: no tokenizer can read it
            raise ValueError(
                f"{arg}[{k}] is not valid Unicode: {err.reason} at character {err.start}"
            ) from None
    return items


def _tensor(value: Any, arg: str, expected: str) -> Tensor:
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{arg} must be {expected}, not {_what(value)}")
    return value


def token_ids(value: Any, arg: str = "input") -> Tensor:
    """Integer ids ``[batch pos]`` (a 1-D tensor is one example) from a tensor or an array."""
    t = _tensor(value, arg, "a text, a list of texts or integer token ids")
    if t.device.type == "meta":  # no values to read (torch's own error names register_meta)
        raise ValueError(f"{arg}: token ids are on the meta device, which holds no values; "
                         "pass them on the model's device (e.g. ids.to('cpu'))")  # fmt: skip
    if t.is_floating_point() and t.ndim == 4:  # an image batch given to a text model
        raise TypeError(f"{arg}: a float tensor of shape {tuple(t.shape)} looks like pixel "
                        "values; this model reads text or token ids, not images")  # fmt: skip
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{arg}: token ids must have an integer dtype, not {t.dtype}")
    t = t.unsqueeze(0) if t.ndim == 1 else t
    if t.ndim != 2:
        raise ValueError(f"{arg}: token ids must be [batch pos], not shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{arg} is empty: no tokens")
    return t.long()


def pixel_values(value: Any, image: tuple[int, int, int], arg: str = "input") -> Tensor:
    """Floating pixel values ``[batch channels height width]`` (3-D: one image) of the
    ``(channels, height, width)`` a vision model's embedding reads."""
    expected = "pixel values, a float tensor [batch channels height width]"
    if isinstance(value, (str, list, tuple)):
        raise TypeError(f"{arg}: this vision model reads {expected}, not text")
    t = _tensor(value, arg, expected)
    if t.device.type == "meta":
        raise ValueError(f"{arg}: pixel values are on the meta device, which holds no values")
    if not t.is_floating_point():
        raise TypeError(
            f"{arg}: this vision model reads {expected}, not {t.dtype} "
            "(token ids, or an integer image: convert it with the model's image processor)"
        )
    t = t.unsqueeze(0) if t.ndim == 3 else t
    if t.ndim != 4:
        raise ValueError(f"{arg}: pixel values must be [batch channels height width], "
                         f"not shape {tuple(value.shape)}")  # fmt: skip
    if t.shape[0] == 0:
        raise ValueError(f"{arg} is empty: no images")
    if tuple(t.shape[1:]) != tuple(image):
        (c, h, w), got = image, tuple(t.shape)
        raise ValueError(f"{arg}: the model reads {c} channels of {h}x{w} pixels, not "
                         f"{got[1]} of {got[2]}x{got[3]} (shape {got})")  # fmt: skip
    return t


def mask(value: Any, shape: torch.Size, arg: str = "attention_mask") -> Tensor:
    """A 1/0 mask of `shape`, as long: bools, or numbers that are exactly 0 or 1."""
    m = _tensor(value, arg, "a tensor of 1 (real token) and 0 (padding)")
    if m.device.type == "meta":
        raise ValueError(f"{arg} is on the meta device, which holds no values")
    if m.shape != shape:
        raise ValueError(f"{arg} shape {tuple(m.shape)} != tokens {tuple(shape)}")
    if m.dtype != torch.bool and not ((m == 0) | (m == 1)).all():
        bad = m[(m != 0) & (m != 1)][0].item()
        raise ValueError(f"{arg} must hold only 1 (real token) and 0 (padding), not {bad}")
    return m.long()


def integer(value: Any, arg: str, least: int | None = None, most: int | None = None) -> int:
    """An int (not a bool) in ``[least, most]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int, not {_what(value)}")
    v = int(value)
    if (least is not None and v < least) or (most is not None and v > most):
        span = f"at least {least}" if most is None else f"in {least}..{most}"
        raise ValueError(f"{arg} must be {span}, not {v}")
    return v


def number(value: Any, arg: str, low: float | None = None, high: float | None = None) -> float:
    """A finite real number in the open interval ``(low, high)`` (a bound of None: none)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a number, not {_what(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{arg} must be finite, not {v}")
    if (low is not None and v <= low) or (high is not None and v >= high):
        raise ValueError(f"{arg} must lie strictly between {low} and {high}, not {v}")
    return v


def choice(value: Any, arg: str, options: Iterable[str]) -> str:
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, options))}, not {value!r}")
    return value


def seeds(value: Any, arg: str = "seeds") -> tuple[int, ...]:
    """A non-empty sequence of ints, no duplicates."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{arg} must be a sequence of ints, not {_what(value)}")
    got = tuple(integer(s, f"{arg}[{k}]") for k, s in enumerate(value))
    if not got:
        raise ValueError(f"{arg} is empty")
    if len(set(got)) != len(got):
        raise ValueError(f"{arg} repeats a seed: {got}")
    return got


def dtype(value: Any, arg: str = "dtype", allowed: Iterable[torch.dtype] | None = None) -> Any:
    """None or a torch floating dtype (in `allowed`, when given)."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{arg} must be a torch floating dtype, not {_what(value)}")
    allowed = tuple(allowed) if allowed is not None else None
    if allowed is not None and value not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{arg} must be one of {names}, not {str(value).removeprefix('torch.')}")
    return value
