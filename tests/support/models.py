"""Tiny random models on every TransformerLens class this line of TransformerLens has."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from tl_decomp.models import TINY_ARCHS, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:  # TransformerLens 3.x only
    from transformer_lens import HookedTransformer  # noqa: F401

    KINDS = ("bridge", "hooked")
except ImportError:
    KINDS = ("bridge",)


@functools.cache
def cached_model(
    arch: str, kind: str = "bridge", dtype: torch.dtype = torch.float64, processed: bool = False
):
    """Session-wide models; tests must treat them as read-only."""
    return tiny_model(arch, kind=kind, dtype=dtype, processed=processed)  # type: ignore[arg-type]


def model_params():
    for kind in KINDS:
        for arch in TINY_ARCHS:
            for processed in (False, True):
                if processed and kind == "hooked" and arch == "bert":
                    continue  # HookedEncoder has no weight processing
                yield pytest.param(
                    (arch, kind, processed), id=f"{kind}-{arch}-{'proc' if processed else 'raw'}"
                )
