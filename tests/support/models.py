"""Tiny random models on every TransformerLens class this line of TransformerLens has."""

from __future__ import annotations

import functools
import os
from importlib.metadata import version

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


TL3 = version("transformer-lens").startswith("3.")


def skip_broken(arch: str, kind: str, processed: bool, dtype: torch.dtype) -> None:
    """Skip a case whose own forward pass fails inside TransformerLens."""
    if TL3 and kind == "bridge" and arch == "qwen2" and processed and dtype == torch.float64:
        # compatibility mode adds a float32 o_proj bias to a float64 model
        pytest.skip("TransformerLens 3.9's own compatibility-mode forward fails on float64 Qwen2")


def model_params():
    for kind in KINDS:
        for arch in TINY_ARCHS:
            for processed in (False, True):
                if processed and kind == "hooked" and arch == "bert":
                    continue  # HookedEncoder has no weight processing
                yield pytest.param(
                    (arch, kind, processed), id=f"{kind}-{arch}-{'proc' if processed else 'raw'}"
                )
