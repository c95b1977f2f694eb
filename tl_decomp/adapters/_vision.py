"""Vision transformers (ViT, DeiT on a TransformerBridge): what their embedding reads.

A vision model's embedding reads pixel values ``[batch channels height width]``, cuts them
into patches (row-major, as the patch convolution's output is flattened) and puts learned
prefix tokens before them (ViT's CLS; DeiT also a distillation token), a position embedding
added to each: its residual stream has one position per prefix token and patch, and no
padding. Everything here is read from the embedding module the bridge wraps; whether a model
reads pixels at all from its config's ``is_visual_model``. `embedding_terms` splits the
embedding's output into what it sums (``split_input=True``), recomputed from the module's own
parameters and checked against the hooked output before use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from tl_decomp._core import checks
from tl_decomp._core.spec import TOLERANCE
from tl_decomp.adapters._common import unsupported

# The embedding's single-token parameters, in the order Hugging Face prepends them.
_PREFIX = (("cls_token", "CLS"), ("distillation_token", "DIST"))
# The bridge's hook on the embedding's input: the pixel values the split re-reads.
PIXELS_HOOK = "embed.hook_in"
# The split's sum against the hooked embedding, both float64 (one conv's rounding apart).
_SPLIT_TOLERANCE = 1e-12


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


def image_corpus(image: Image, corpus: Any) -> Float[Tensor, "batch channels height width"]:
    """A corpus of images, checked: ``[n channels height width]``, or a sequence of
    ``[channels height width]`` tensors (stacked)."""
    if isinstance(corpus, (list, tuple)) and corpus and all(isinstance(t, Tensor) for t in corpus):
        for k, t in enumerate(corpus):
            if t.ndim != 3:
                raise ValueError(
                    f"corpus[{k}]: one image is [channels height width], not shape {tuple(t.shape)}"
                )
            checks.pixel_values(t, image.shape, f"corpus[{k}]")
        corpus = torch.stack(list(corpus))
    elif isinstance(corpus, Tensor) and corpus.ndim != 4:
        raise ValueError(
            "corpus: images as [n_images channels height width], or a sequence of "
            f"[channels height width], not shape {tuple(corpus.shape)}"
        )
    return checks.pixel_values(corpus, image.shape, "corpus")


def input_labels(model: Any) -> tuple[str, ...] | None:
    """The labels `embedding_terms` gives a vision model's input, or None for a model that
    reads token ids: ``patch``, ``patch_bias``, one per prefix token, ``pos_embed``."""
    image = image_input(model)
    if image is None:
        return None
    emb = model.embed.original_component
    proj = getattr(emb.patch_embeddings, "projection", None)
    if not isinstance(proj, nn.Conv2d):
        raise unsupported(
            "split_input on a vision embedding whose patch projection is no Conv2d", model
        )
    prefix = tuple(attr for attr, _ in _PREFIX if isinstance(getattr(emb, attr, None), Tensor))
    if len(prefix) != len(image.prefix):
        raise unsupported(
            f"split_input on a vision embedding with prefix tokens {image.prefix} "
            "other than its cls_token / distillation_token",
            model,
        )
    bias = ("patch_bias",) if proj.bias is not None else ()
    return ("patch", *bias, *prefix, "pos_embed")


def embedding_terms(
    model: Any,
    pixels: Float[Tensor, "batch channels height width"],
    hooked: Float[Tensor, "batch pos d_model"],
    dtype: torch.dtype,
) -> list[tuple[str, Float[Tensor, "batch pos d_model"]]]:
    """A vision embedding's output `hooked` split into the terms it sums, in `dtype`.

    ``patch``: the patch projection ``W * pixels`` at each patch's position (its bias kept
    apart: ``patch_bias``, the same at every patch, since it does not depend on the image);
    ``cls_token`` (and DeiT's ``distillation_token``) at its own position; ``pos_embed`` at
    every position. Zero elsewhere. Guarantees ``sum(terms) == hooked`` to 1e-12 relative in
    float64 (the dtype's tolerance otherwise), or raises `NotImplementedError` with the error.
    """
    labels = input_labels(model)
    if labels is None:
        raise ValueError("embedding_terms splits a vision model's embedding")
    emb = model.embed.original_component
    proj = emb.patch_embeddings.projection
    x = pixels.to(hooked.device, dtype)
    w = proj.weight.detach().to(x)
    conv = F.conv2d(x, w, None, proj.stride, proj.padding, proj.dilation, proj.groups)
    patches = einops.rearrange(conv, "batch d_model rows cols -> batch (rows cols) d_model")
    n_prefix = hooked.shape[1] - patches.shape[1]
    zeros = x.new_zeros((x.shape[0], hooked.shape[1], hooked.shape[2]))

    def at(value: Tensor, where: slice) -> Tensor:
        term = zeros.clone()
        term[:, where] = value
        return term

    terms = [("patch", at(patches, slice(n_prefix, None)))]
    if proj.bias is not None:
        terms.append(("patch_bias", at(proj.bias.detach().to(x), slice(n_prefix, None))))
    for k, attr in enumerate(labels[len(terms) : -1]):
        terms.append((attr, at(getattr(emb, attr).detach().to(x).reshape(-1), slice(k, k + 1))))
    terms.append(("pos_embed", at(emb.position_embeddings.detach().to(x)[0], slice(None))))
    want = hooked.to(dtype)
    err = ((sum(t for _, t in terms) - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    wide = max(TOLERANCE.get(hooked.dtype, 1e-4), TOLERANCE.get(dtype, 1e-4))
    tol = _SPLIT_TOLERANCE if wide <= TOLERANCE[torch.float64] else wide
    if not err <= tol:
        raise unsupported(
            f"split_input on this vision embedding (its patches, prefix tokens and positions "
            f"sum to its output only to {err:.1e} relative)",
            model,
        )
    return terms


__all__ = [
    "PIXELS_HOOK",
    "Image",
    "embedding_terms",
    "image_corpus",
    "image_input",
    "input_labels",
    "sample_input",
]
