"""Vision transformers (ViT, DeiT on a TransformerBridge): what their embedding reads.

A vision model's embedding reads pixel values ``[batch channels height width]``, cuts them
into patches (row-major, as the patch convolution's output is flattened) and puts learned
prefix tokens before them (ViT's CLS; DeiT also a distillation token), a position embedding
added to each: its residual stream has one position per prefix token and patch, and no
padding. Everything here is read from the embedding module the bridge wraps; whether a model
reads pixels at all from its config's ``is_visual_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_decomp.adapters._common import unsupported

# The embedding's single-token parameters, in the order Hugging Face prepends them.
_PREFIX = (("cls_token", "CLS"), ("distillation_token", "DIST"))


@dataclass(frozen=True)
class Image:
    """What a vision model's embedding reads and the positions it makes of it."""

    channels: int
    height: int
    width: int
    patch: tuple[int, int]  # patch height, width (the patch convolution's stride)
    prefix: tuple[str, ...]  # labels of the learned tokens before the patches

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        return (self.channels, self.height, self.width)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row."""
        return (self.height // self.patch[0], self.width // self.patch[1])

    @property
    def n_pos(self) -> int:
        """Residual-stream positions: the prefix tokens, then one per patch."""
        rows, cols = self.grid
        return len(self.prefix) + rows * cols

    def labels(self) -> list[str]:
        """One label per position: ``CLS`` (and ``DIST``), then ``patch{k} (r{row},c{col})``."""
        cols = self.grid[1]
        n = self.n_pos - len(self.prefix)
        return [*self.prefix, *(f"patch{k} (r{k // cols},c{k % cols})" for k in range(n))]


def image_input(model: Any) -> Image | None:
    """The image a vision model reads, or None for a model that reads token ids."""
    if not getattr(getattr(model, "cfg", None), "is_visual_model", False):
        return None
    emb = getattr(getattr(model, "embed", None), "original_component", None)
    patches = getattr(emb, "patch_embeddings", None)
    pos = getattr(emb, "position_embeddings", None)
    try:
        c = int(patches.num_channels)  # None raises: refused below
        h, w = (int(s) for s in patches.image_size)
        ph, pw = (int(s) for s in patches.patch_size)
    except (AttributeError, TypeError, ValueError) as err:
        raise unsupported(
            "a vision embedding that does not expose its patch embeddings' num_channels, "
            "image_size and patch_size",
            model,
        ) from err
    n_patches = (h // ph) * (w // pw)
    if not isinstance(pos, Tensor) or pos.ndim != 3 or pos.shape[1] < n_patches:
        raise unsupported("a vision embedding without one learned position per patch", model)
    n_prefix = pos.shape[1] - n_patches
    names = tuple(label for attr, label in _PREFIX if isinstance(getattr(emb, attr, None), Tensor))
    prefix = names if len(names) == n_prefix else tuple(f"prefix{k}" for k in range(n_prefix))
    return Image(c, h, w, (ph, pw), prefix)


def sample_input(model: Any, n_tokens: int, *, random: bool = False) -> Tensor:
    """A fixed input for a probe run: `n_tokens` token ids ``[1 pos]`` (``0 .. n-1``, or a
    seeded random draw), or, for a vision model, one seeded random image."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    image = image_input(model)
    if image is not None:
        dtype = next(model.parameters()).dtype
        return torch.randn((1, *image.shape), generator=gen, dtype=torch.float64).to(device, dtype)
    if random:
        return torch.randint(0, model.cfg.d_vocab, (1, n_tokens), generator=gen).to(device)
    return (torch.arange(n_tokens)[None] % model.cfg.d_vocab).to(device)


__all__ = ["Image", "image_input", "sample_input"]
